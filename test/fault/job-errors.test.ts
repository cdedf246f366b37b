/**
 * Error policies of backup jobs, with an error-inject filter node as the target whose writes are made to
 * fail and recover at run time (QMP x-error-inject). Whatever the target does, the guest's writes
 * through the NBD export must succeed; what the job does follows on-target-error:
 * report ends it with an error, stop pauses it (io-status failed) until resume repairs what it missed,
 * ignore keeps it going (with rate-limited error events) and repairs by itself. A failed
 * copy-before-write breaks a point-in-time backup whatever the policy.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync } from "node:fs";
import { dirname, join } from "node:path";
import { makeImage, readImage } from "../helpers/daemon.js";
import {
  assertExit,
  assertSameImage,
  blockJob,
  eventAfter,
  jobEvent,
  KiB,
  MiB,
  qemuIo,
  readFile,
  runWriters,
  seededBytes,
  serveWithQmp,
  statusEvent,
  testSeed,
  waitInSync,
  type QmpDaemon,
} from "../helpers/jobs.js";
import type { QmpEvent } from "../../src/qmp/client.js";

const DISK = 16 * MiB;

/** Serves a random disk and adds node "bad": error-inject over a file that starts as a copy of it. */
async function setup(
  t: TestContext,
  bad: { copy?: boolean; failWrites?: boolean } = {},
): Promise<QmpDaemon & { targetFile: string }> {
  const seed = testSeed(t);
  let targetFile = "";
  const d = await serveWithQmp(t, {
    content: seededBytes(seed, DISK),
    prepare: (image) => {
      targetFile = join(dirname(image), "target.img");
      if (bad.copy ?? true) copyFileSync(image, targetFile);
      else makeImage(targetFile, DISK);
    },
  });
  await d.qmp.execute("blockdev-add", {
    driver: "error-inject",
    "node-name": "bad",
    "fail-writes": bad.failWrites ?? false,
    file: { driver: "file", filename: targetFile },
  });
  return { ...d, targetFile };
}

async function failWrites(d: QmpDaemon, on: boolean): Promise<number> {
  const r = (await d.qmp.execute("x-error-inject", { "node-name": "bad", "fail-writes": on })) as {
    injected: number;
  };
  return r.injected;
}

/** A guest write through NBD, read back through NBD: both must succeed and find the data. */
async function guestWrite(d: QmpDaemon, pattern: number, offset: number, length: number): Promise<void> {
  const p = `0x${pattern.toString(16)}`;
  assertExit(
    "qemu-io",
    await qemuIo(d.uri, [`write -P ${p} ${offset} ${length}`, `read -P ${p} ${offset} ${length}`]),
  );
  assert.ok(
    readImage(d.image, offset, length).equals(Buffer.alloc(length, pattern)),
    "the data is on the disk",
  );
}

function errorEvents(d: QmpDaemon, id: string): QmpEvent[] {
  return d.qmp.events.filter(jobEvent(id, "BLOCK_JOB_ERROR"));
}

test("on-target-error=report: the guest write succeeds, the stream job ends with an error", async (t) => {
  const d = await setup(t);
  await d.qmp.execute("blockdev-backup", {
    "job-id": "rep",
    device: "disk0",
    target: "bad",
    sync: "stream",
    "on-target-error": "report",
  });
  await guestWrite(d, 0x21, 0, 64 * KiB); // duplicated fine
  assert.equal(await failWrites(d, true), 0);
  await guestWrite(d, 0x5a, 1 * MiB, 64 * KiB);
  const done = await d.qmp.waitForEvent(jobEvent("rep", "BLOCK_JOB_COMPLETED"));
  assert.match(String(done.data.error), /injected EIO/);
  assert.deepEqual(
    errorEvents(d, "rep").map((e) => e.data),
    [{ device: "rep", operation: "write", action: "report" }],
  );
  assert.ok((await failWrites(d, false)) >= 1, "the target write was really failed");
  await d.qmp.waitForEvent(statusEvent("rep", "null"));
  // Guest writes go on after the job is gone, and the failed job released its target.
  await guestWrite(d, 0x5b, 2 * MiB, 64 * KiB);
  await d.qmp.execute("blockdev-del", { "node-name": "bad" });
  // The target got the first write but not the one that failed.
  assert.ok(readImage(d.targetFile, 0, 64 * KiB).equals(Buffer.alloc(64 * KiB, 0x21)));
  assert.ok(!readImage(d.targetFile, 1 * MiB, 64 * KiB).equals(Buffer.alloc(64 * KiB, 0x5a)));
});

test("on-target-error=stop: the job pauses with io-status failed, writes go on, resume repairs", async (t) => {
  const d = await setup(t);
  await d.qmp.execute("blockdev-backup", {
    "job-id": "stp",
    device: "disk0",
    target: "bad",
    sync: "stream",
    "on-target-error": "stop",
  });
  await failWrites(d, true);
  const mark = d.qmp.events.length;
  await guestWrite(d, 0x61, 2 * MiB, 64 * KiB);
  const err = await eventAfter(d.qmp, mark, jobEvent("stp", "BLOCK_JOB_ERROR"));
  assert.deepEqual(err.data, { device: "stp", operation: "write", action: "stop" });
  await eventAfter(d.qmp, mark, statusEvent("stp", "paused"));
  const stopped = await blockJob(d.qmp, "stp");
  assert.equal(stopped.status, "paused");
  assert.equal(stopped.paused, true);
  assert.equal(stopped["io-status"], "failed");

  // While stopped, guest writes, zeroes and discards succeed; the job marks what the target misses.
  await guestWrite(d, 0x62, 3 * MiB, 128 * KiB);
  assertExit("qemu-io", await qemuIo(d.uri, ["write -z 5M 64k", "discard 6M 64k", "read -P 0 5M 64k"]));
  const missed = await blockJob(d.qmp, "stp");
  assert.equal(missed.len - missed.offset, 5 * 64 * KiB, "five clusters to repair");
  assert.equal(missed.status, "paused");

  assert.ok((await failWrites(d, false)) >= 1);
  const resumedMark = d.qmp.events.length;
  await d.qmp.execute("block-job-resume", { device: "stp" });
  await eventAfter(d.qmp, resumedMark, statusEvent("stp", "running"));
  const repaired = await waitInSync(d.qmp, "stp");
  assert.equal(repaired["io-status"], "ok");
  await d.qmp.execute("block-job-cancel", { device: "stp" });
  await d.qmp.waitForEvent(jobEvent("stp", "BLOCK_JOB_CANCELLED"));
  assertSameImage(readFile(d.targetFile), readFile(d.image), "target after stop, resume and cancel");
});

test("on-target-error=ignore: rate-limited error events over a burst, the job runs on and repairs itself", async (t) => {
  const d = await setup(t);
  await d.qmp.execute("blockdev-backup", {
    "job-id": "ign",
    device: "disk0",
    target: "bad",
    sync: "stream",
    "on-target-error": "ignore",
  });
  await failWrites(d, true);
  // A burst of 200 failing duplicates: fio 4k random writes, 32 deep.
  await runWriters(
    { uri: d.uri, commands: ["write -P 0x44 8M 64k"] },
    { uri: d.uri, sizeBytes: DISK, ioBytes: 200 * 4 * KiB, bsrange: "4k-4k", seed: 1 },
  );
  const job = await blockJob(d.qmp, "ign");
  assert.equal(job.status, "running", "ignore keeps the job running");
  assert.equal(job["io-status"], "ok");
  assert.ok(job.len > job.offset, "the job knows what the target missed");
  const injected = await failWrites(d, false);
  assert.ok(injected >= 201, `${injected} target writes failed`);

  const errors = errorEvents(d, "ign");
  assert.ok(errors.length >= 1, "errors are reported");
  for (const e of errors) assert.deepEqual(e.data, { device: "ign", operation: "write", action: "ignore" });
  const at = errors.map((e) => e.timestamp.seconds + e.timestamp.microseconds / 1e6);
  for (let i = 0; i < at.length; i++) {
    const inWindow = at.filter((x) => x >= at[i] && x < at[i] + 1).length;
    assert.ok(inWindow <= 10, `${inWindow} BLOCK_JOB_ERROR events within one second of event ${i}`);
  }
  assert.ok(errors.length < injected / 2, `${errors.length} events for ${injected} errors: not a flood`);
  assert.ok(!d.qmp.events.some(jobEvent("ign", "BLOCK_JOB_COMPLETED")), "the job did not end");

  // The target works again: the job repairs by itself (it retries after a pause; poll with a deadline).
  await waitInSync(d.qmp, "ign");
  await d.qmp.execute("block-job-cancel", { device: "ign" });
  await d.qmp.waitForEvent(jobEvent("ign", "BLOCK_JOB_CANCELLED"));
  assertSameImage(readFile(d.targetFile), readFile(d.image), "target after ignore and self-repair");
});

test("sync=full: a failed copy-before-write fails the job even under ignore; the guest write succeeds", async (t) => {
  const d = await setup(t, { copy: false });
  const image = readFile(d.image);
  await d.qmp.execute("blockdev-backup", {
    "job-id": "cbw",
    device: "disk0",
    target: "bad",
    sync: "full",
    speed: 1 * MiB,
    "on-target-error": "ignore",
  });
  const j = await blockJob(d.qmp, "cbw");
  assert.ok(j.offset < 4 * MiB, "the background copy is far from 12M");
  await failWrites(d, true);
  // 12M has not been copied yet: the write must first copy its old data, which fails.
  await guestWrite(d, 0x7e, 12 * MiB, 64 * KiB);
  const done = await d.qmp.waitForEvent(jobEvent("cbw", "BLOCK_JOB_COMPLETED"));
  assert.match(String(done.data.error), /injected EIO/);
  assert.ok(
    errorEvents(d, "cbw").some((e) => e.data.action === "report"),
    "the broken snapshot is reported although on-target-error=ignore",
  );
  // Everything but the written range is as before: the guest write did not disturb other data.
  const now = readFile(d.image);
  assert.ok(now.subarray(0, 12 * MiB).equals(image.subarray(0, 12 * MiB)));
  assert.ok(now.subarray(12 * MiB + 64 * KiB).equals(image.subarray(12 * MiB + 64 * KiB)));
  await guestWrite(d, 0x7f, 12 * MiB, 64 * KiB);
});

test("sync=full, on-target-error=stop: a failing background copy pauses the job; resume completes it", async (t) => {
  const d = await setup(t, { copy: false, failWrites: true });
  const image = readFile(d.image);
  await d.qmp.execute("blockdev-backup", {
    "job-id": "bg",
    device: "disk0",
    target: "bad",
    sync: "full",
    "on-target-error": "stop",
  });
  const err = await d.qmp.waitForEvent(jobEvent("bg", "BLOCK_JOB_ERROR"));
  assert.deepEqual(err.data, { device: "bg", operation: "write", action: "stop" });
  await d.qmp.waitForEvent(statusEvent("bg", "paused"));
  const stopped = await blockJob(d.qmp, "bg");
  assert.equal(stopped["io-status"], "failed");
  assert.ok(stopped.offset < stopped.len);
  assert.ok((await failWrites(d, false)) >= 1);
  await d.qmp.execute("block-job-resume", { device: "bg" });
  const done = await d.qmp.waitForEvent(jobEvent("bg", "BLOCK_JOB_COMPLETED"));
  assert.equal(done.data.error, undefined);
  assert.equal(done.data.offset, DISK);
  assertSameImage(readFile(d.targetFile), image, "full backup after stop and resume");
});
