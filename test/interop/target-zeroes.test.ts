/**
 * A job's target reads what the source reads, also where the target ignores discards: qemu-nbd started
 * without --discard=unmap (its default) advertises TRIM and keeps the data. A guest discard on the
 * served disk punches a hole in the source, so the target must read zeros there too, whether the
 * discard reaches it through a write-blocking mirror, a background mirror's forward or a stream job.
 * The bulk copies (mirror sync=full, backup sync=full) over a source with holes onto a target full of
 * other data must leave the target equal to the source, also on a target without write-zeroes.
 */
import assert from "node:assert/strict";
import { closeSync, openSync, writeSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { makeImage, readImage, unixUri } from "../helpers/daemon.js";
import {
  assertExit,
  jobEvent,
  MiB,
  pollUntil,
  blockJob,
  qemuIo,
  seededBytes,
  serveWithQmp,
  testSeed,
  waitInSync,
  type QmpDaemon,
} from "../helpers/jobs.js";
import { assertIdentical, cancelInSync, startNbdkit, startQemuNbd, untilReady } from "../helpers/remote.js";

const DISK_BYTES = 16 * MiB;
/** Where the tests write and then discard: 2 MiB at 4 MiB, so whole qemu-nbd and job clusters. */
const AT = 4 * MiB;
const SPAN = 2 * MiB;

/** A qemu-nbd target that ignores discards, as an nbd node "tgt"; `content` is the image's start. */
async function ignoringTarget(t: TestContext, d: QmpDaemon, content?: Buffer): Promise<string> {
  const image = join(d.dir, "target.img");
  makeImage(image, DISK_BYTES, content);
  const remote = await startQemuNbd(t, image, join(d.dir, "target.sock"), { discard: "ignore" });
  await d.qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "tgt",
    server: { type: "unix", path: remote.socket },
    export: "",
  });
  return image;
}

function assertAll(image: string, byte: number, what: string): void {
  const got = readImage(image, AT, SPAN);
  const bad = got.findIndex((b) => b !== byte);
  assert.equal(bad, -1, `${what}: byte ${AT + bad} of the target is ${got[bad]}, not ${byte}`);
}

/** Writes a pattern over [AT, AT+SPAN) through the served disk, waits for it on the target, discards it. */
async function writeThenDiscard(
  d: QmpDaemon,
  image: string,
  waitForTarget: () => Promise<void>,
): Promise<void> {
  assertExit("write", await qemuIo(d.uri, [`write -P 0x5a ${AT} ${SPAN}`, "flush"]));
  await waitForTarget();
  assertAll(image, 0x5a, "the write reached the target");
  assertExit("discard", await qemuIo(d.uri, [`discard ${AT} ${SPAN}`, "flush"]));
  // The source's file driver punched a hole: it reads zeros now.
  assert.ok(
    readImage(d.image, AT, SPAN).every((b) => b === 0),
    "the source reads zeros after the discard",
  );
  await waitForTarget();
  assertAll(image, 0, "the target reads what the source reads after the discard");
}

/** Background forwards land after the guest is answered: wait until nothing is in flight or dirty. */
async function mirrorSettled(d: QmpDaemon): Promise<void> {
  await pollUntil(
    "mirror m0 has nothing dirty or in flight",
    async () => {
      const j = (await blockJob(d.qmp, "m0")) as unknown as Record<string, number>;
      return j["x-dirty-bytes"] === 0 && j["x-lag-bytes"] === 0;
    },
    20_000,
  );
}

for (const copyMode of ["write-blocking", "background"] as const) {
  test(`a ${copyMode} mirror to a qemu-nbd that ignores discards: the target reads zeros where the source was discarded`, async (t) => {
    const seed = testSeed(t);
    const d = await serveWithQmp(t, { content: seededBytes(seed, DISK_BYTES) });
    const image = await ignoringTarget(t, d);
    await d.qmp.execute("blockdev-mirror", {
      "job-id": "m0",
      device: "disk0",
      target: "tgt",
      sync: "full",
      "copy-mode": copyMode,
    });
    await untilReady(d, "m0");
    await writeThenDiscard(d, image, () => mirrorSettled(d));
    await assertIdentical(d.image, image);
    await cancelInSync(d, "m0");
    await assertIdentical(d.image, image);
  });
}

test("a stream job to a qemu-nbd that ignores discards: the target reads zeros where the source was discarded", async (t) => {
  const seed = testSeed(t);
  const content = seededBytes(seed, DISK_BYTES);
  const d = await serveWithQmp(t, { content });
  const image = await ignoringTarget(t, d, content); // a copy taken before the stream starts
  await d.qmp.execute("blockdev-backup", { "job-id": "s0", device: "disk0", target: "tgt", sync: "stream" });
  // A stream job writes the target before the guest is answered.
  await writeThenDiscard(d, image, async () => void (await waitInSync(d.qmp, "s0")));
  await assertIdentical(d.image, image);
  await d.qmp.execute("block-job-cancel", { device: "s0" });
  const e = await d.qmp.waitForEvent(jobEvent("s0", "BLOCK_JOB_CANCELLED"), 60_000);
  assert.equal(e.data.error, undefined);
  await assertIdentical(d.image, image);
});

/** A sparse source: data in every other MiB (with a partial hole inside one), holes elsewhere. */
function sparseSource(seed: number): (image: string) => void {
  return (image) => {
    const fd = openSync(image, "r+");
    try {
      for (let mb = 0; mb < DISK_BYTES / MiB; mb += 2)
        writeSync(fd, seededBytes(seed + mb, MiB), 0, MiB, mb * MiB);
      // A hole inside a copy's range: 64 KiB of data in the middle of an otherwise empty MiB.
      writeSync(fd, seededBytes(seed - 1, 64 * 1024), 0, 64 * 1024, 7 * MiB + 512 * 1024);
    } finally {
      closeSync(fd);
    }
  };
}

test("mirror sync=full over a source with holes onto a qemu-nbd target full of other data: target == source", async (t) => {
  const seed = testSeed(t);
  const d = await serveWithQmp(t, { sizeBytes: DISK_BYTES, prepare: sparseSource(seed) });
  const image = await ignoringTarget(t, d, Buffer.alloc(DISK_BYTES, 0xee));
  await d.qmp.execute("blockdev-mirror", {
    "job-id": "m0",
    device: "disk0",
    target: "tgt",
    sync: "full",
    "copy-mode": "background",
  });
  await untilReady(d, "m0");
  await assertIdentical(d.image, image);
  await cancelInSync(d, "m0");
  await assertIdentical(d.image, image);
});

test("backup sync=full over a source with holes onto a qemu-nbd target full of other data: target == source", async (t) => {
  const seed = testSeed(t);
  const d = await serveWithQmp(t, { sizeBytes: DISK_BYTES, prepare: sparseSource(seed) });
  const image = await ignoringTarget(t, d, Buffer.alloc(DISK_BYTES, 0xee));
  await d.qmp.execute("blockdev-backup", { "job-id": "b0", device: "disk0", target: "tgt", sync: "full" });
  const e = await d.qmp.waitForEvent(jobEvent("b0", "BLOCK_JOB_COMPLETED"), 60_000);
  assert.equal(e.data.error, undefined);
  await assertIdentical(d.image, image);
});

test("mirror sync=full onto an nbdkit target without write-zeroes, full of other data: zeros are written", async (t) => {
  const seed = testSeed(t);
  const d = await serveWithQmp(t, { sizeBytes: DISK_BYTES, prepare: sparseSource(seed) });
  // nozero zeromode=none: the server does not offer NBD_CMD_WRITE_ZEROES at all.
  const remote = await startNbdkit(t, join(d.dir, "nozero.sock"), [
    "--filter=nozero",
    "memory",
    `${DISK_BYTES}`,
    "zeromode=none",
  ]);
  const uri = unixUri(remote.socket);
  assertExit("fill", await qemuIo(uri, [`write -P 0xee 0 ${DISK_BYTES}`]));
  await d.qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "tgt",
    server: { type: "unix", path: remote.socket },
  });
  await d.qmp.execute("blockdev-mirror", {
    "job-id": "m0",
    device: "disk0",
    target: "tgt",
    sync: "full",
    "copy-mode": "write-blocking",
  });
  await untilReady(d, "m0");
  assertExit(
    "discard",
    await qemuIo(d.uri, [`write -P 0x33 ${AT} ${SPAN}`, `discard ${AT} ${SPAN}`, "flush"]),
  );
  await cancelInSync(d, "m0");
  await assertIdentical(d.image, uri);
});

test("the reported case: write-blocking mirror to a qemu-nbd that ignores discards, discards before and during an outage, resync, target == source", async (t) => {
  const seed = testSeed(t);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK_BYTES) });
  const image = join(d.dir, "target.img");
  makeImage(image, DISK_BYTES);
  const remote = await startQemuNbd(t, image, join(d.dir, "target.sock"), { discard: "ignore" });
  await d.qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "tgt",
    server: { type: "unix", path: remote.socket },
  });
  await d.qmp.execute("blockdev-mirror", {
    "job-id": "m0",
    device: "disk0",
    target: "tgt",
    sync: "full",
    "copy-mode": "write-blocking",
  });
  await untilReady(d, "m0");
  // fstrim while the target is up ...
  assertExit("discard", await qemuIo(d.uri, ["discard 1M 1M", "flush"]));
  await remote.kill();
  // ... and while it is down: the job records the range and copies it (zeros) when it is back.
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x77 8M 1M", "discard 10M 2M", "flush"]));
  await d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_DEGRADED"), 30_000);
  const resynced = d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_RESYNCED"), 60_000);
  await remote.restart();
  await resynced;
  await cancelInSync(d, "m0");
  await assertIdentical(d.image, image);
});
