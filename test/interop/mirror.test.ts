/**
 * blockdev-mirror and drive-mirror through the real daemon: to a qemu-nbd target (nbd node) and to a
 * file, write-blocking and background, under overlapping qemu-io + fio load. The target must equal the
 * source after a cancel that follows READY (which ends in BLOCK_JOB_COMPLETED, as QEMU's), discards
 * must reach the target (QEMU's mirror drops them), and block-job-complete must move the served disk
 * onto the target.
 */
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { makeImage, readImage } from "../helpers/daemon.js";
import {
  assertExit,
  assertQmpError,
  blockJob,
  jobEvent,
  MiB,
  pollUntil,
  prng,
  qemuIo,
  qemuIoPlan,
  runWriters,
  seededBytes,
  serveWithQmp,
  testSeed,
  type QmpDaemon,
} from "../helpers/jobs.js";
import {
  assertIdentical,
  cancelInSync,
  startNbdkit,
  startQemuNbd,
  untilReady,
  type RemoteTarget,
} from "../helpers/remote.js";
import { runOk } from "../helpers/run.js";

const DISK_BYTES = 32 * MiB;

async function withQemuNbdTarget(
  t: Parameters<typeof serveWithQmp>[0] & { after: (fn: () => unknown) => void },
  d: QmpDaemon,
): Promise<{ image: string; remote: RemoteTarget }> {
  const image = join(d.dir, "target.img");
  makeImage(image, DISK_BYTES);
  const remote = await startQemuNbd(t, image, join(d.dir, "target.sock"));
  await d.qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "tgt",
    server: { type: "unix", path: remote.socket },
    export: "",
  });
  return { image, remote };
}

for (const copyMode of ["write-blocking", "background"] as const) {
  test(`blockdev-mirror ${copyMode} to qemu-nbd: READY, writes under load, cancel leaves target == source`, async (t) => {
    const seed = testSeed(t);
    const d = await serveWithQmp(t, { content: seededBytes(seed, DISK_BYTES) });
    const { image } = await withQemuNbdTarget(t, d);
    await d.qmp.execute("blockdev-mirror", {
      "job-id": "m0",
      device: "disk0",
      target: "tgt",
      sync: "full",
      "copy-mode": copyMode,
    });
    await untilReady(d, "m0");
    const rnd = prng(seed);
    await runWriters(
      { uri: d.uri, commands: qemuIoPlan(rnd, { regionOffset: 0, regionBytes: 8 * MiB, count: 400 }) },
      { uri: d.uri, offset: 8 * MiB, sizeBytes: 16 * MiB, ioBytes: 24 * MiB, seed, iodepth: 32 },
    );
    const info = await blockJob(d.qmp, "m0");
    assert.equal(info.status, "ready");
    await cancelInSync(d, "m0");
    await assertIdentical(d.image, image);
  });
}

test("a write-blocking mirror forwards discards: the target range is deallocated too", async (t) => {
  const d = await serveWithQmp(t, { content: Buffer.alloc(DISK_BYTES, 0x5a) });
  const { image } = await withQemuNbdTarget(t, d);
  await d.qmp.execute("blockdev-mirror", {
    "job-id": "m0",
    device: "disk0",
    target: "tgt",
    sync: "full",
    "copy-mode": "write-blocking",
  });
  await untilReady(d, "m0");
  assert.ok(
    readImage(image, 4 * MiB, 1 * MiB).every((b) => b === 0x5a),
    "the bulk copy reached the target",
  );
  assertExit("discard", await qemuIo(d.uri, ["discard 4M 1M", "flush"]));
  // The target's file has a hole there now: qemu-img map reports no data for the range.
  const map = JSON.parse(
    (await runOk("qemu-img", ["map", "--output=json", "-f", "raw", image])).stdout,
  ) as Array<{ start: number; length: number; data: boolean }>;
  const covering = map.filter((e) => e.start < 5 * MiB && e.start + e.length > 4 * MiB);
  assert.ok(
    covering.length > 0 && covering.every((e) => !e.data),
    `4M..5M is a hole: ${JSON.stringify(covering)}`,
  );
  assert.ok(readImage(image, 4 * MiB, 1 * MiB).every((b) => b === 0));
  await cancelInSync(d, "m0");
  await assertIdentical(d.image, image);
});

test("block-job-complete pivots: afterwards the served disk reads and writes the target", async (t) => {
  const seed = testSeed(t);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK_BYTES) });
  const targetFile = join(d.dir, "moved.img");
  await d.qmp.execute("drive-mirror", {
    "job-id": "m0",
    device: "disk0",
    target: targetFile,
    "node-name": "moved",
    sync: "full",
    "copy-mode": "write-blocking",
  });
  await untilReady(d, "m0");
  // Writes keep coming while the pivot happens: distinct blocks, each with its own pattern, so that
  // afterwards every acknowledged one can be checked on the target.
  const blocks = Array.from({ length: 160 }, (_, i) => i);
  const pattern = (i: number): number => 1 + ((i * 7 + (seed & 0xff)) % 250);
  const during = qemuIo(
    d.uri,
    blocks.map((i) => `aio_write -P ${pattern(i)} ${i * 128 * 1024} 64k`).concat(["aio_flush"]),
  );
  await d.qmp.execute("block-job-complete", { device: "m0" });
  const e = await d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_COMPLETED"), 60_000);
  assert.equal(e.data.error, undefined);
  assertExit("qemu-io", await during);
  for (const i of blocks) {
    const got = readImage(targetFile, i * 128 * 1024, 64 * 1024);
    assert.ok(
      got.every((b) => b === pattern(i)),
      `block ${i} written around the pivot is on the target`,
    );
  }
  // Everything else is the source's content from before.
  const source = seededBytes(seed, DISK_BYTES);
  const tail = readImage(targetFile, 20 * MiB, 4 * MiB);
  assert.ok(tail.equals(source.subarray(20 * MiB, 24 * MiB)), "the bulk copy is on the target");

  // From now on writes go to the target only.
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0xee 16M 64k", "flush", "read -P 0xee 16M 64k"]));
  assert.ok(
    readImage(targetFile, 16 * MiB, 64 * 1024).every((b) => b === 0xee),
    "the target has the write",
  );
  assert.ok(!readImage(d.image, 16 * MiB, 64 * 1024).every((b) => b === 0xee), "the old source does not");
  const exports = (await d.qmp.execute("query-block-exports")) as Array<Record<string, unknown>>;
  assert.equal(exports[0]["node-name"], "moved");
});

test("drive-mirror background to a file, sync=top and sync=none, and bad arguments", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: DISK_BYTES });
  assertExit("seed", await qemuIo(d.uri, ["write -P 0x21 0 1M", "write -P 0x22 20M 1M"]));
  const top = join(d.dir, "top.img");
  await d.qmp.execute("drive-mirror", { "job-id": "mt", device: "disk0", target: top, sync: "top" });
  await untilReady(d, "mt");
  assertExit("write", await qemuIo(d.uri, ["write -P 0x23 10M 64k"]));
  await cancelInSync(d, "mt");
  await assertIdentical(d.image, top);

  const none = join(d.dir, "none.img");
  writeFileSync(none, Buffer.alloc(DISK_BYTES));
  await d.qmp.execute("drive-mirror", {
    "job-id": "mn",
    device: "disk0",
    target: none,
    sync: "none",
    mode: "existing",
  });
  await untilReady(d, "mn");
  assertExit("write", await qemuIo(d.uri, ["write -P 0x24 12M 64k"]));
  await cancelInSync(d, "mn");
  assert.ok(
    readImage(none, 12 * MiB, 64 * 1024).every((b) => b === 0x24),
    "new writes reach a sync=none target",
  );
  assert.ok(
    readImage(none, 0, 1 * MiB).every((b) => b === 0),
    "old data is not copied with sync=none",
  );

  await assertQmpError(
    d.qmp.execute("blockdev-mirror", { device: "disk0", target: "nosuch", sync: "full" }),
    "GenericError",
    "Cannot find device='nosuch' nor node-name='nosuch'",
  );
  await assertQmpError(
    d.qmp.execute("drive-mirror", {
      device: "disk0",
      target: join(d.dir, "g.img"),
      sync: "full",
      granularity: 3000,
    }),
    "GenericError",
    "Parameter 'granularity' expects a power of 2",
  );
  await d.qmp.execute("blockdev-add", { driver: "memory", "node-name": "small", size: 1 * MiB });
  await assertQmpError(
    d.qmp.execute("blockdev-mirror", { device: "disk0", target: "small", sync: "full" }),
    "GenericError",
    `Source and target image have different sizes (${DISK_BYTES} and ${1 * MiB})`,
  );
});

test("background mirror after READY: forwarded bytes in flight stay under buf-size, the rest falls back to the bitmap", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 8 * MiB });
  // A slow target (every write waits 50 ms), so forwards pile up.
  const slow = await startNbdkit(t, join(d.dir, "slow.sock"), [
    "--filter=delay",
    "memory",
    `${8 * MiB}`,
    "wdelay=50ms",
  ]);
  await d.qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "tgt",
    server: { type: "unix", path: slow.socket },
  });
  const bufSize = 256 * 1024;
  await d.qmp.execute("blockdev-mirror", {
    "job-id": "m0",
    device: "disk0",
    target: "tgt",
    sync: "full",
    "copy-mode": "background",
    "buf-size": bufSize,
  });
  await untilReady(d, "m0");
  const writes = Array.from({ length: 64 }, (_, i) => `aio_write -P ${1 + (i % 200)} ${i * 64 * 1024} 64k`);
  const started = Date.now();
  assertExit("qemu-io", await qemuIo(d.uri, [...writes, "aio_flush"]));
  t.diagnostic(`64 writes of 64 KiB took ${Date.now() - started} ms against a 50 ms target`);
  const info = (await blockJob(d.qmp, "m0")) as unknown as Record<string, number>;
  assert.ok(info["x-lag-bytes-max"] > 0, "some writes were forwarded");
  assert.ok(info["x-lag-bytes-max"] <= bufSize, `lag stayed under buf-size: ${info["x-lag-bytes-max"]}`);
  assert.ok(info["x-lag-fallbacks"] > 0, "writes past the bound fell back to the bitmap");
  await cancelInSync(d, "m0");
  const r = await runOk("qemu-img", [
    "compare",
    "-f",
    "raw",
    "-F",
    "raw",
    d.image,
    `nbd+unix:///?socket=${slow.socket}`,
  ]);
  assert.match(r.stdout, /Images are identical/);
});

test("a paused mirror records writes (standby) and copies them after resume", async (t) => {
  const seed = testSeed(t);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK_BYTES) });
  const { image } = await withQemuNbdTarget(t, d);
  await d.qmp.execute("blockdev-mirror", {
    "job-id": "m0",
    device: "disk0",
    target: "tgt",
    sync: "full",
    "copy-mode": "write-blocking",
  });
  await untilReady(d, "m0");
  await d.qmp.execute("block-job-pause", { device: "m0" });
  assert.equal((await blockJob(d.qmp, "m0")).status, "standby");
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x71 3M 128k", "write -z 5M 64k", "flush"]));
  const paused = (await blockJob(d.qmp, "m0")) as unknown as Record<string, number>;
  assert.equal(paused["x-dirty-bytes"], 192 * 1024, "the writes made while paused are recorded");
  assert.ok(!readImage(image, 3 * MiB, 128 * 1024).every((b) => b === 0x71), "and not yet on the target");
  await d.qmp.execute("block-job-resume", { device: "m0" });
  await pollUntil("the mirror caught up", async () => {
    const j = (await blockJob(d.qmp, "m0")) as unknown as Record<string, number>;
    return j["x-dirty-bytes"] === 0;
  });
  assert.ok(
    readImage(image, 3 * MiB, 128 * 1024).every((b) => b === 0x71),
    "copied after resume",
  );
  await cancelInSync(d, "m0");
  await assertIdentical(d.image, image);
});
