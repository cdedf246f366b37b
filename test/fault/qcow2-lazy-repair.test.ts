/**
 * Images with lazy refcounts that a crash left dirty (qemu-io aborted, qemu-storage-daemon killed
 * with SIGKILL, or crafted with wrong refcounts): `qemu-img check` finds refcount errors first; a
 * writable `drivetap serve` repairs them at open (as QEMU does), serves, and after a clean stop
 * `qemu-img check` finds nothing and the dirty bit is clear. Metadata the repair cannot count is
 * refused with the qemu-img command, and the image is left as it was.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { CLI, startDaemon, stopAfter, unixUri } from "../helpers/daemon.js";
import { pollUntil } from "../helpers/jobs.js";
import {
  assertChecks,
  assertSame,
  dirtyFlag,
  patchImage,
  qemuImgCheck,
  qemuImgCreate,
  qemuIo,
  readOffsetAt,
  setDirtyBit,
} from "../helpers/qcow2.js";
import { startQsdProcess } from "../helpers/qsd.js";
import { run, runOk, tempDir } from "../helpers/run.js";

/** qemu-img check's exit code for an image with errors (not only leaks). */
const CHECK_CORRUPT = 2;
const REPAIRED = /refcounts rebuilt, (\d+) refcount error\(s\) and (\d+) leaked cluster\(s\) fixed/;

/** What the guest writes after the repair: new clusters, partial ones, zeroes and discards. */
const AFTER_OPS = [
  "write -P 0xb1 0 4k",
  "write -P 0xb2 3M 1M",
  "write -P 0xb3 9M 100k",
  "write -z 4M 512k",
  "discard 5M 1M",
  "write -P 0xb4 30M 64k",
];

/** Serves `image` writable and returns the repair's counts from the log. */
async function serveRepaired(t: Parameters<typeof stopAfter>[0], image: string) {
  const daemon = await startDaemon({ image });
  stopAfter(t, daemon);
  let errors = -1;
  let leaks = -1;
  await daemon.waitForStderr((s) => {
    const m = REPAIRED.exec(s);
    if (m) [errors, leaks] = [Number(m[1]), Number(m[2])];
    return m !== null;
  });
  return { daemon, errors, leaks };
}

/** The disk as QEMU reads the crashed image (read-only: QEMU does not repair then). */
async function diskOf(image: string, raw: string): Promise<void> {
  await runOk("qemu-img", ["convert", "-U", "-O", "raw", image, raw]);
}

function sha(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

for (const cluster of ["4k", "64k"]) {
  test(`lazy refcounts, qemu-io aborted (${cluster} clusters, with an internal snapshot): drivetap repairs at open, serves, and qemu-img check is clean`, async (t) => {
    const dir = tempDir(t, "drivetap-lazy-");
    const image = join(dir, "lazy.qcow2");
    const expected = join(dir, "expected.raw");
    const snapshot = join(dir, "snapshot.raw");
    await qemuImgCreate(image, "64M", { options: ["lazy_refcounts=on", `cluster_size=${cluster}`] });
    await qemuIo(image, "qcow2", ["write -P 0xa0 0 2M", "write -P 0xa1 8M 64k"]);
    await runOk("qemu-img", ["snapshot", "-c", "s1", image]);
    await diskOf(image, snapshot);
    // After the snapshot every write un-shares clusters; `abort` leaves refcounts behind.
    const crash = await run("qemu-io", [
      "-f",
      "qcow2",
      image,
      "-c",
      "write -P 0xa2 1M 2M",
      "-c",
      "flush",
      "-c",
      "write -P 0xa3 12M 1M",
      "-c",
      "write -P 0xa4 40M 300k",
      "-c",
      "abort",
    ]);
    assert.equal(crash.signal, "SIGABRT");
    const before = await qemuImgCheck(image);
    assert.equal(before.code, CHECK_CORRUPT, before.text);
    assert.match(before.text, /refcount=0 reference=1/);
    assert.equal(await dirtyFlag(image), true);
    await diskOf(image, expected);

    const { daemon, errors } = await serveRepaired(t, image);
    assert.ok(errors > 0, `the log counts the refcount errors the check found (${errors})`);
    await qemuIo(daemon.uri, "raw", AFTER_OPS);
    await qemuIo(expected, "raw", AFTER_OPS);
    await assertSame(daemon.uri, expected);
    assert.equal(await daemon.stop(), 0);
    await assertChecks(image);
    assert.equal(await dirtyFlag(image), false);
    await assertSame(image, expected);
    // The snapshot's clusters survived the rebuild and the writes after it.
    const snapNow = join(dir, "snapshot-after.raw");
    await runOk("qemu-img", ["convert", "-O", "raw", "-l", "snapshot.name=s1", image, snapNow]);
    assert.equal(sha(snapNow), sha(snapshot));
  });
}

test("lazy refcounts, qemu-storage-daemon killed with SIGKILL while serving writes: drivetap repairs, every write QSD acknowledged reads back, qemu-img check is clean", async (t) => {
  const dir = tempDir(t, "drivetap-lazy-qsd-");
  const image = join(dir, "lazy.qcow2");
  await qemuImgCreate(image, "64M", { options: ["lazy_refcounts=on"] });
  const nbd = join(dir, "qsd-nbd.sock");
  const qsd = await startQsdProcess(t, [
    "--blockdev",
    `driver=file,node-name=f,filename=${image}`,
    "--blockdev",
    "driver=qcow2,node-name=q,file=f",
    "--nbd-server",
    `addr.type=unix,addr.path=${nbd}`,
    "--export",
    "type=nbd,id=e,node-name=q,name=,writable=on",
  ]);
  // qemu-io sends FUA with each write, so each is durable when acknowledged.
  const writes = ["write -P 0xc1 0 1M", "write -P 0xc2 4M 512k", "write -P 0xc3 20M 64k"];
  await qemuIo(unixUri(nbd), "raw", writes);
  process.kill(qsd.pid, "SIGKILL");
  await pollUntil("qemu-storage-daemon to exit", async () => {
    try {
      process.kill(qsd.pid, 0);
      return false;
    } catch {
      return true;
    }
  });
  const before = await qemuImgCheck(image);
  assert.equal(before.code, CHECK_CORRUPT, before.text);

  const { daemon, errors } = await serveRepaired(t, image);
  assert.ok(errors > 0, `refcount errors counted: ${errors}`);
  await qemuIo(
    daemon.uri,
    "raw",
    writes.map((w) => w.replace("write", "read")),
  );
  await qemuIo(daemon.uri, "raw", AFTER_OPS);
  assert.equal(await daemon.stop(), 0);
  await assertChecks(image);
  assert.equal(await dirtyFlag(image), false);
});

test("a crafted dirty lazy image (a missing refcount, an over-referenced cluster, a leaked one): qemu-img check's errors and leaks are what drivetap fixes", async (t) => {
  const dir = tempDir(t, "drivetap-lazy-crafted-");
  const image = join(dir, "crafted.qcow2");
  await qemuImgCreate(image, "16M", { options: ["lazy_refcounts=on"] });
  // Clusters 0-3 hold header, refcount table, refcount block and L1; data and L2 follow.
  await qemuIo(image, "qcow2", ["write -P 0xd1 0 64k", "write -P 0xd2 1M 64k", "write -P 0xd3 2M 64k"]);
  await qemuIo(image, "qcow2", ["discard 2M 64k"]); // its cluster is free but stays in the file
  const map = JSON.parse((await runOk("qemu-img", ["map", "--output=json", image])).stdout) as Array<{
    start: number;
    offset?: number;
    data: boolean;
  }>;
  const hostOf = (guest: number): number => map.find((e) => e.start === guest && e.data)!.offset!;
  const cb = 64 * 1024;
  const block = readOffsetAt(image, readOffsetAt(image, 48));
  const setRefcount = (host: number, v: number): void => {
    const b = Buffer.alloc(2);
    b.writeUInt16BE(v);
    patchImage(image, block + (host / cb) * 2, b);
  };
  const freed = Math.max(hostOf(0), hostOf(1024 * 1024)) + cb; // the discarded cluster came last
  setRefcount(hostOf(0), 0); // in use, refcount 0: the dangerous kind
  setRefcount(hostOf(1024 * 1024), 2); // COPIED but refcount 2
  setRefcount(freed, 1); // referenced by nothing
  setDirtyBit(image);
  const before = await qemuImgCheck(image);
  assert.equal(before.code, CHECK_CORRUPT, before.text);
  assert.match(before.text, new RegExp(`ERROR cluster ${hostOf(0) / cb} refcount=0 reference=1`));
  assert.match(before.text, /ERROR OFLAG_COPIED data cluster.*refcount=2/);
  assert.match(before.text, new RegExp(`Leaked cluster ${freed / cb} refcount=1 reference=0`));
  assert.match(before.text, /3 errors were found on the image/);
  assert.match(before.text, /2 leaked clusters were found/);

  const { daemon, errors, leaks } = await serveRepaired(t, image);
  assert.equal(errors, 1);
  assert.equal(leaks, 2, "the over-referenced and the leaked cluster");
  await qemuIo(daemon.uri, "raw", ["read -P 0xd1 0 64k", "read -P 0xd2 1M 64k", "read -P 0 2M 64k"]);
  // The repaired refcounts are what allocation uses: new clusters must not land on old data.
  await qemuIo(daemon.uri, "raw", ["write -P 0xd4 8M 256k", "write -P 0xd5 1M 4k"]);
  await qemuIo(daemon.uri, "raw", ["read -P 0xd1 0 64k", "read -P 0xd5 1M 4k", "read -P 0xd4 8M 256k"]);
  assert.equal(await daemon.stop(), 0);
  await assertChecks(image);
});

test("a dirty lazy image whose metadata cannot be counted (an L2 entry, or a snapshot's L1 table, beyond the end of the file) is refused writable with the repair command and left untouched", async (t) => {
  const dir = tempDir(t, "drivetap-lazy-bad-");
  for (const what of ["l2", "snapshot"]) {
    const image = join(dir, `${what}.qcow2`);
    await qemuImgCreate(image, "16M", { options: ["lazy_refcounts=on"] });
    await qemuIo(image, "qcow2", ["write -P 0xe1 0 64k"]);
    if (what === "l2") {
      const l2 = readOffsetAt(image, readOffsetAt(image, 40));
      const entry = Buffer.alloc(8);
      entry.writeBigUInt64BE((1n << 63n) | (1n << 40n)); // COPIED, 1 TiB into a tiny file
      patchImage(image, l2 + 8, entry);
    } else {
      await runOk("qemu-img", ["snapshot", "-c", "s1", image]);
      // The snapshot table's first entry: its L1 table offset, moved far past the end.
      const table = readOffsetAt(image, 64);
      const off = Buffer.alloc(8);
      off.writeBigUInt64BE(1n << 40n);
      patchImage(image, table, off);
    }
    setDirtyBit(image);
    const sum = sha(image);
    const r = await run(process.execPath, [CLI, "serve", image, "--socket", join(dir, `${what}.sock`)]);
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /cannot be repaired here: .*beyond the end of the file.*qemu-img check -r all/);
    assert.equal(sha(image), sum, "a refused repair writes nothing");
  }
});

test("a dirty lazy image with a persistent bitmap: the rebuilt refcounts count the bitmap directory, table and clusters (qemu-img check is clean, the bitmap kept)", async (t) => {
  const dir = tempDir(t, "drivetap-lazy-bitmap-");
  const image = join(dir, "bitmap.qcow2");
  await qemuImgCreate(image, "64M", { options: ["lazy_refcounts=on"] });
  await runOk("qemu-img", ["bitmap", "--add", image, "b0"]);
  await qemuIo(image, "qcow2", ["write -P 0xf1 0 1M"]); // the bitmap gets data clusters
  await run("qemu-io", ["-f", "qcow2", image, "-c", "write -P 0xf2 2M 1M", "-c", "abort"]);
  const before = await qemuImgCheck(image);
  assert.equal(before.code, CHECK_CORRUPT, before.text);
  const { daemon, errors } = await serveRepaired(t, image);
  assert.ok(errors > 0);
  // Nothing written yet: the header keeps the bitmaps' autoclear bit, so QEMU counts their clusters.
  const repaired = await qemuImgCheck(image, true);
  assert.equal(repaired.code, 0, repaired.text);
  await qemuIo(daemon.uri, "raw", ["read -P 0xf1 0 1M", "read -P 0xf2 2M 1M"], true);
  assert.equal(await daemon.stop(), 0);
  await assertChecks(image);
  const info = (await runOk("qemu-img", ["info", image])).stdout;
  assert.match(info, /name: b0/);
});
