/**
 * `drivetap mirror` against a running daemon: to a qemu-nbd export by URI (returns at READY with the
 * job keeping the target in sync), to a file with --complete (the served disk moves onto the file),
 * and a bad URI (exit 1 with the reason).
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { CLI, makeImage, readImage } from "../helpers/daemon.js";
import { assertExit, blockJob, MiB, qemuIo, seededBytes, serveWithQmp, testSeed } from "../helpers/jobs.js";
import { assertIdentical, cancelInSync, startQemuNbd } from "../helpers/remote.js";
import { run } from "../helpers/run.js";

const DISK_BYTES = 16 * MiB;

test("drivetap mirror to an NBD URI returns at READY; the job keeps the target in sync", async (t) => {
  const seed = testSeed(t);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK_BYTES) });
  const image = join(d.dir, "remote.img");
  makeImage(image, DISK_BYTES);
  const remote = await startQemuNbd(t, image, join(d.dir, "remote.sock"));
  const r = await run(process.execPath, [
    CLI,
    "mirror",
    "--target",
    `nbd+unix:///?socket=${remote.socket}`,
    "--socket",
    d.qmpPath,
  ]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /mirror disk0 ready/);
  assert.equal((await blockJob(d.qmp, "disk0")).status, "ready");
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x66 1M 64k", "discard 2M 1M", "flush"]));
  await cancelInSync(d, "disk0");
  await assertIdentical(d.image, image);
});

test("drivetap mirror --complete moves the served disk onto a new file", async (t) => {
  const seed = testSeed(t);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK_BYTES) });
  const moved = join(d.dir, "moved.img");
  const r = await run(process.execPath, [
    CLI,
    "mirror",
    "--target",
    moved,
    "--job-id",
    "move",
    "--complete",
    "--socket",
    d.qmpPath,
  ]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /mirror move completed: disk0 now reads and writes the target/);
  await assertIdentical(d.image, moved);
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x67 0 64k", "flush"]));
  assert.ok(
    readImage(moved, 0, 64 * 1024).every((b) => b === 0x67),
    "writes now land in the new file",
  );
});

test("drivetap mirror with an nbd+unix URI without a socket fails with the reason", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: DISK_BYTES });
  const r = await run(process.execPath, [CLI, "mirror", "--target", "nbd+unix:///x", "--socket", d.qmpPath]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /drivetap mirror: an nbd\+unix URI needs \?socket=PATH/);
  assert.deepEqual(await d.qmp.execute("query-block-jobs"), []);
});
