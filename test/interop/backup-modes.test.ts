/**
 * Each backup mode's defining property, under concurrent overlapping I/O through the NBD export: a
 * seeded qemu-io script (overlapping aio_write patterns, aio_write -z, discards, flushes) and fio
 * randwrite at QD32 run at the same time while the job runs. The stream writers talk to the daemon
 * directly (a proxy would spread their requests out and hide ordering bugs; the disk node's x-stats
 * say what they wrote); for none, a sniffing proxy records every request, so the test knows exactly
 * which clusters were touched.
 *
 * - stream: the target starts as a copy of the disk; after the writers and a cancel it equals the disk
 *   byte for byte, and progress counts exactly the bytes the writers changed.
 * - none: the target ends holding the start-of-job data of every cluster any writer touched, and zeros
 *   in every cluster no writer touched.
 * - full / top: the target equals the disk as it was at job start, although the writers ran while the
 *   (rate-limited) background copy was still going; top copies only the allocated clusters.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { closeSync, copyFileSync, ftruncateSync, openSync, writeSync } from "node:fs";
import { dirname, join } from "node:path";
import type { QmpClient } from "../../src/qmp/client.js";
import {
  assertSameImage,
  blockJob,
  CLUSTER_BYTES,
  isZero,
  jobEvent,
  KiB,
  MiB,
  planBytes,
  pollUntil,
  prng,
  qemuIoPlan,
  readFile,
  recordingProxy,
  runWriters,
  seededBytes,
  serveWithQmp,
  testSeed,
  streamPlan,
  touchedClusters,
  type BlockJobInfo,
} from "../helpers/jobs.js";

async function nodeStats(qmp: QmpClient, nodeName: string): Promise<Record<string, number>> {
  const nodes = (await qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
  const node = nodes.find((n) => n["node-name"] === nodeName);
  assert.ok(node, `node ${nodeName} exists`);
  return node["x-stats"] as Record<string, number>;
}

/** Bytes a node has written, zeroed and discarded (its x-stats). */
async function changedOn(qmp: QmpClient, nodeName: string): Promise<number> {
  const s = await nodeStats(qmp, nodeName);
  return s.writeBytes + s.zeroBytes + s.discardBytes;
}

async function cancelAndWait(qmp: QmpClient, id: string): Promise<Record<string, unknown>> {
  await qmp.execute("block-job-cancel", { device: id });
  const e = await qmp.waitForEvent(jobEvent(id, "BLOCK_JOB_CANCELLED"));
  assert.ok(!qmp.events.some(jobEvent(id, "BLOCK_JOB_COMPLETED")), `job ${id} was cancelled, not completed`);
  return e.data;
}

test("stream: target == source after concurrent overlapping qemu-io and fio QD32 writes and a cancel", async (t) => {
  const DISK = 64 * MiB;
  const seed = testSeed(t);
  const rnd = prng(seed);
  const original = seededBytes(seed, DISK);
  let target = "";
  const d = await serveWithQmp(t, {
    content: original,
    // The target starts as a copy of the disk: stream keeps it one.
    prepare: (image) => copyFileSync(image, (target = join(dirname(image), "target.img"))),
  });
  await d.qmp.execute("drive-backup", {
    "job-id": "s",
    device: "disk0",
    target,
    sync: "stream",
    mode: "existing",
  });
  const at0 = await blockJob(d.qmp, "s");
  assert.equal(at0.status, "running");
  assert.equal(at0.offset, 0);

  // The writers talk to the daemon directly: a proxy in between would spread their requests out and
  // hide ordering bugs.
  const script = streamPlan(rnd, 0, 16 * MiB);
  await runWriters(
    { uri: d.uri, commands: script },
    { uri: d.uri, sizeBytes: DISK, ioBytes: 128 * MiB, seed },
  );

  // Progress counts the bytes duplicated: exactly what the disk node wrote, zeroed and discarded.
  const changedBytes = await changedOn(d.qmp, "disk0");
  assert.ok(changedBytes >= planBytes(script) + 128 * MiB, `the writers changed ${changedBytes} bytes`);
  const inSync = await blockJob(d.qmp, "s");
  assert.equal(inSync.offset, changedBytes, "offset == bytes written through the export");
  assert.equal(inSync.len, inSync.offset, "len == offset: nothing left to repair");
  // Every request reached the target once, and every guest flush was forwarded.
  const disk = await nodeStats(d.qmp, "disk0");
  const stats = await nodeStats(d.qmp, "#backup-target-s");
  assert.equal(
    stats.writeOps + stats.zeroOps + stats.discardOps,
    disk.writeOps + disk.zeroOps + disk.discardOps,
  );
  assert.ok(disk.flushOps > 0, "the writers flushed");
  assert.ok(stats.flushOps >= disk.flushOps, `target flushes ${stats.flushOps} >= guest's ${disk.flushOps}`);

  const cancelled = await cancelAndWait(d.qmp, "s");
  assert.equal(cancelled.offset, changedBytes);
  const source = readFile(d.image);
  assert.ok(!source.equals(original), "the writers changed the disk");
  assertSameImage(readFile(target), source, `stream target vs source (seed ${seed})`);
});

test("stream: two stream jobs to two targets at once both end equal to the source", async (t) => {
  const DISK = 64 * MiB;
  const seed = testSeed(t);
  const rnd = prng(seed);
  let targetA = "";
  let targetB = "";
  const d = await serveWithQmp(t, {
    content: seededBytes(seed, DISK),
    prepare: (image) => {
      copyFileSync(image, (targetA = join(dirname(image), "a.img")));
      copyFileSync(image, (targetB = join(dirname(image), "b.img")));
    },
  });
  // One target by file name, the other as a node added first.
  await d.qmp.execute("drive-backup", {
    "job-id": "a",
    device: "disk0",
    target: targetA,
    sync: "stream",
    mode: "existing",
  });
  await d.qmp.execute("blockdev-add", {
    driver: "raw",
    "node-name": "tb",
    file: { driver: "file", filename: targetB },
  });
  await d.qmp.execute("blockdev-backup", { "job-id": "b", device: "disk0", target: "tb", sync: "stream" });
  assert.deepEqual(
    ((await d.qmp.execute("query-block-jobs")) as BlockJobInfo[]).map((j) => [j.device, j.status]),
    [
      ["a", "running"],
      ["b", "running"],
    ],
  );

  await runWriters(
    { uri: d.uri, commands: streamPlan(rnd, 4 * MiB, 32 * MiB) },
    { uri: d.uri, sizeBytes: DISK, ioBytes: 48 * MiB, seed },
  );
  const changedBytes = await changedOn(d.qmp, "disk0");
  for (const id of ["a", "b"]) {
    const j = await blockJob(d.qmp, id);
    assert.ok(j.offset > 0, `job ${id} made progress`);
    assert.equal(j.offset, changedBytes, `job ${id}: offset == bytes written`);
    assert.equal(j.len, j.offset, `job ${id} in sync`);
  }
  await Promise.all([cancelAndWait(d.qmp, "a"), cancelAndWait(d.qmp, "b")]);
  const source = readFile(d.image);
  assertSameImage(readFile(targetA), source, `target a (seed ${seed})`);
  assertSameImage(readFile(targetB), source, `target b (seed ${seed})`);
});

test("none: the target holds the old data of exactly the clusters writers touched, zeros elsewhere", async (t) => {
  // sync=none is copy-before-write only: before a cluster of the disk is first changed after the job
  // started (by a write, write-zeroes or discard touching any byte of it), the whole 64 KiB cluster as
  // it was at the start is copied to the target. Nothing else is ever copied. So after the writers and
  // a cancel, for every cluster: touched by some request -> target == snapshot (the disk before the
  // job); never touched -> target still zero (drive-backup created it sparse).
  const DISK = 64 * MiB;
  const seed = testSeed(t);
  const rnd = prng(seed);
  const snapshot = seededBytes(seed, DISK);
  const d = await serveWithQmp(t, { content: snapshot });
  const rec = await recordingProxy(t, d);
  const target = join(d.dir, "none.img");
  await d.qmp.execute("drive-backup", { "job-id": "n", device: "disk0", target, sync: "none" });
  // qemu-io in [0, 16M), fio in [32M, 48M): [16M, 32M) and [48M, 64M) stay untouched, and parts of
  // both write regions too.
  await runWriters(
    { uri: rec.uri, commands: qemuIoPlan(rnd, { regionOffset: 0, regionBytes: 16 * MiB, count: 120 }) },
    { uri: rec.uri, offset: 32 * MiB, sizeBytes: 16 * MiB, ioBytes: 8 * MiB, seed },
  );
  const touched = touchedClusters(rec.requests, DISK);
  const touchedCount = touched.filter(Boolean).length;
  assert.ok(touchedCount > 100 && touchedCount < touched.length / 2, `${touchedCount} clusters touched`);

  const j = await blockJob(d.qmp, "n");
  assert.equal(j.offset, touchedCount * CLUSTER_BYTES, "each touched cluster was copied exactly once");
  assert.equal(j.len, DISK, "len is the disk's size, as QEMU 7.2 reports for sync=none");
  await cancelAndWait(d.qmp, "n");

  const got = readFile(target);
  const source = readFile(d.image);
  let changed = 0;
  for (let c = 0; c < touched.length; c++) {
    const range = [c * CLUSTER_BYTES, (c + 1) * CLUSTER_BYTES] as const;
    const cluster = got.subarray(...range);
    if (touched[c]) {
      assert.ok(
        cluster.equals(snapshot.subarray(...range)),
        `cluster ${c} (byte ${range[0]}) was overwritten: target must hold its old data (seed ${seed})`,
      );
      if (!source.subarray(...range).equals(snapshot.subarray(...range))) changed++;
    } else {
      assert.ok(
        isZero(cluster),
        `cluster ${c} (byte ${range[0]}) was never written: target must be zero (seed ${seed})`,
      );
      assert.ok(
        source.subarray(...range).equals(snapshot.subarray(...range)),
        `cluster ${c} unchanged on disk`,
      );
    }
  }
  assert.ok(changed > 100, `the writers really changed ${changed} clusters`);
});

/** Slow enough that the writers always finish long before the background copy would. */
const LOW_SPEED = 512 * KiB;

/**
 * Starts a full or top backup at a low speed, runs the writers while the background copy is still
 * going, then lifts the limit and waits for the job to complete. Returns the info seen at the start.
 */
async function pointInTime(
  t: TestContext,
  sync: "full" | "top",
  diskBytes: number,
  build: (seed: number) => Buffer,
  seed: number,
): Promise<{ snapshot: Buffer; target: Buffer; source: Buffer; first: BlockJobInfo }> {
  const rnd = prng(seed);
  const snapshot = build(seed);
  const d = await serveWithQmp(t, {
    sizeBytes: diskBytes,
    // Write only the data clusters, so zero clusters stay holes in the file (matters for top).
    prepare: (image) => {
      const fd = openSync(image, "r+");
      try {
        for (let off = 0; off < diskBytes; off += CLUSTER_BYTES) {
          const c = snapshot.subarray(off, off + CLUSTER_BYTES);
          if (!isZero(c)) writeSync(fd, c, 0, c.length, off);
        }
        ftruncateSync(fd, diskBytes);
      } finally {
        closeSync(fd);
      }
    },
  });
  const target = join(d.dir, `${sync}.img`);
  const id = `${sync}0`;
  await d.qmp.execute("drive-backup", { "job-id": id, device: "disk0", target, sync, speed: LOW_SPEED });
  const first = await pollUntil("the job to know its length", async () => {
    const j = await blockJob(d.qmp, id);
    return j.len > 0 ? j : undefined;
  });
  assert.ok(
    first.offset < first.len,
    `the background copy is still going when the writers start: ${JSON.stringify(first)}`,
  );

  // CBW copies count as progress too: the writers stay in [0, 8M) and [16M, 24M), so at most half
  // of the disk is copied by them.
  await runWriters(
    {
      uri: d.uri,
      commands: qemuIoPlan(rnd, { regionOffset: 0, regionBytes: 8 * MiB, count: 100, lengthMax: 64 * KiB }),
    },
    { uri: d.uri, offset: 16 * MiB, sizeBytes: 8 * MiB, ioBytes: 8 * MiB, seed },
  );
  const during = await blockJob(d.qmp, id);
  assert.equal(during.status, "running");
  assert.ok(
    during.offset < during.len,
    `writers finished before the background copy: ${JSON.stringify(during)}`,
  );
  assert.equal(during.speed, LOW_SPEED);
  assert.ok((await nodeStats(d.qmp, "disk0")).writeOps > 100, "the writers sent their requests");

  await d.qmp.execute("block-job-set-speed", { device: id, speed: 0 });
  const done = await d.qmp.waitForEvent(jobEvent(id, "BLOCK_JOB_COMPLETED"));
  assert.equal(done.data.error, undefined, `job failed: ${String(done.data.error)}`);
  assert.equal(done.data.offset, done.data.len);
  assert.equal(done.data.len, first.len, "len does not change while the job runs");
  return { snapshot, target: readFile(target), source: readFile(d.image), first };
}

test("full: with speed 512 KiB/s and concurrent writes, the target equals the disk at job start", async (t) => {
  const DISK = 32 * MiB;
  const seed = testSeed(t);
  const r = await pointInTime(t, "full", DISK, (s) => seededBytes(s, DISK), seed);
  assert.equal(r.first.len, DISK);
  assert.ok(!r.source.equals(r.snapshot), "the writers changed the disk");
  assertSameImage(r.target, r.snapshot, `full target vs snapshot (seed ${seed})`);
});

test("top: only allocated clusters are copied; the target equals the disk at job start, holes zero", async (t) => {
  const DISK = 32 * MiB;
  const seed = testSeed(t);
  let allocated = 0;
  const build = (s: number): Buffer => {
    const data = seededBytes(s, DISK);
    const pick = prng(s ^ 0x5eed);
    for (let off = 0; off < DISK; off += CLUSTER_BYTES) {
      if (pick() < 0.5) data.fill(0, off, off + CLUSTER_BYTES);
      else allocated++;
    }
    return data;
  };
  const r = await pointInTime(t, "top", DISK, build, seed);
  assert.ok(allocated > 0 && allocated < DISK / CLUSTER_BYTES);
  assert.equal(r.first.len, allocated * CLUSTER_BYTES, "top copies the allocated clusters only");
  assert.ok(!r.source.equals(r.snapshot), "the writers changed the disk");
  assertSameImage(r.target, r.snapshot, `top target vs snapshot (seed ${seed})`);
});
