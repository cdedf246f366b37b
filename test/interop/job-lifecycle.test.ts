/**
 * The job life cycle over QMP against the real daemon: pause/resume, set-speed, cancel, manual
 * finalize and dismiss, the fields of query-jobs and query-block-jobs, events reaching every client,
 * and arguments that must be refused without leaving a job, a node or a file behind.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, existsSync, statSync, writeFileSync } from "node:fs";
import { dirname, join } from "node:path";
import type { QmpClient } from "../../src/qmp/client.js";
import {
  assertExit,
  assertQmpError,
  assertSameImage,
  blockJob,
  blockJobs,
  connectQmp,
  eventAfter,
  jobEvent,
  jobEventLog,
  KiB,
  MiB,
  qemuIo,
  readFile,
  seededBytes,
  serveWithQmp,
  statusEvent,
  waitInSync,
  type QmpDaemon,
} from "../helpers/jobs.js";

const DISK = 4 * MiB;

/** A served random disk plus a copy of it (a stream target that starts in sync). */
async function setup(t: TestContext, sizeBytes = DISK): Promise<QmpDaemon & { copy: string }> {
  let copy = "";
  const d = await serveWithQmp(t, {
    content: seededBytes(sizeBytes, sizeBytes),
    prepare: (image) => copyFileSync(image, (copy = join(dirname(image), "copy.img"))),
  });
  return { ...d, copy };
}

async function nodeNames(qmp: QmpClient): Promise<string[]> {
  const nodes = (await qmp.execute("query-named-block-nodes")) as Array<{ "node-name": string }>;
  return nodes.map((n) => n["node-name"]).sort();
}

test("pause/resume: paused/running events and query fields; writes while paused are repaired on resume", async (t) => {
  const d = await setup(t);
  await d.qmp.execute("drive-backup", {
    "job-id": "p",
    device: "disk0",
    target: d.copy,
    sync: "stream",
    mode: "existing",
  });
  let mark = d.qmp.events.length;
  await d.qmp.execute("block-job-pause", { device: "p" });
  await eventAfter(d.qmp, mark, statusEvent("p", "paused"));
  const paused = await blockJob(d.qmp, "p");
  assert.equal(paused.paused, true);
  assert.equal(paused.status, "paused");
  assert.equal(paused.busy, false);

  // A guest write while paused succeeds; the job only marks it (len grows, offset does not).
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x77 1M 128k"]));
  const marked = await blockJob(d.qmp, "p");
  assert.equal(marked.offset, 0);
  assert.equal(marked.len, 128 * KiB, "two dirty clusters");
  assert.equal(marked.status, "paused");

  mark = d.qmp.events.length;
  await d.qmp.execute("block-job-resume", { device: "p" });
  await eventAfter(d.qmp, mark, statusEvent("p", "running"));
  const resumed = await waitInSync(d.qmp, "p");
  assert.equal(resumed.paused, false);
  assert.equal(resumed.offset, 128 * KiB, "the repair copied the two clusters");
  assert.equal(resumed["io-status"], "ok");

  // The job-* spellings do the same.
  mark = d.qmp.events.length;
  await d.qmp.execute("job-pause", { id: "p" });
  await eventAfter(d.qmp, mark, statusEvent("p", "paused"));
  assert.equal((await blockJob(d.qmp, "p")).paused, true);
  mark = d.qmp.events.length;
  await d.qmp.execute("job-resume", { id: "p" });
  await eventAfter(d.qmp, mark, statusEvent("p", "running"));
  assert.equal((await blockJob(d.qmp, "p")).paused, false);

  await d.qmp.execute("block-job-cancel", { device: "p" });
  await d.qmp.waitForEvent(statusEvent("p", "null"));
  assert.deepEqual(jobEventLog(d.qmp, "p"), [
    "created",
    "running",
    "paused",
    "running",
    "paused",
    "running",
    "aborting",
    "BLOCK_JOB_CANCELLED",
    "concluded",
    "null",
  ]);
  assertSameImage(readFile(d.copy), readFile(d.image), "stream target after pause, write, resume");
});

test("set-speed: query-block-jobs shows the new speed; speed 0 lets a slow full backup finish", async (t) => {
  const d = await setup(t, 8 * MiB);
  const target = join(d.dir, "full.img");
  await d.qmp.execute("drive-backup", {
    "job-id": "sp",
    device: "disk0",
    target,
    sync: "full",
    speed: 256 * KiB,
  });
  assert.equal((await blockJob(d.qmp, "sp")).speed, 256 * KiB);
  await d.qmp.execute("block-job-set-speed", { device: "sp", speed: 512 * KiB });
  const slow = await blockJob(d.qmp, "sp");
  assert.equal(slow.speed, 512 * KiB);
  assert.ok(slow.offset < slow.len, `the limit holds the copy back: ${slow.offset} of ${slow.len}`);
  await assertQmpError(
    d.qmp.execute("block-job-set-speed", { device: "sp", speed: -1 }),
    "GenericError",
    "Parameter 'speed' expects a non negative value",
  );
  assert.equal((await blockJob(d.qmp, "sp")).speed, 512 * KiB, "a refused speed changes nothing");
  await d.qmp.execute("block-job-set-speed", { device: "sp", speed: 0 });
  const done = await d.qmp.waitForEvent(jobEvent("sp", "BLOCK_JOB_COMPLETED"));
  assert.deepEqual(done.data, { type: "backup", device: "sp", len: 8 * MiB, offset: 8 * MiB, speed: 0 });
  assertSameImage(readFile(target), readFile(d.image), "full backup target");
});

test("cancel: BLOCK_JOB_CANCELLED, the job and its target node are gone; force cancel too", async (t) => {
  const d = await setup(t);
  const before = await nodeNames(d.qmp);
  await d.qmp.execute("drive-backup", {
    "job-id": "c",
    device: "disk0",
    target: join(d.dir, "c.img"),
    sync: "none",
  });
  assert.deepEqual(await nodeNames(d.qmp), [...before, "#backup-target-c"].sort());
  await d.qmp.execute("block-job-cancel", { device: "c" });
  const e = await d.qmp.waitForEvent(jobEvent("c", "BLOCK_JOB_CANCELLED"));
  assert.deepEqual(e.data, { type: "backup", device: "c", len: DISK, offset: 0, speed: 0 });
  await d.qmp.waitForEvent(statusEvent("c", "null"));
  assert.deepEqual(jobEventLog(d.qmp, "c"), [
    "created",
    "running",
    "aborting",
    "BLOCK_JOB_CANCELLED",
    "concluded",
    "null",
  ]);
  assert.deepEqual(await blockJobs(d.qmp), []);
  assert.deepEqual(await d.qmp.execute("query-jobs"), []);
  assert.deepEqual(await nodeNames(d.qmp), before, "the drive-backup target node is closed");

  await d.qmp.execute("drive-backup", {
    "job-id": "f",
    device: "disk0",
    target: d.copy,
    sync: "stream",
    mode: "existing",
  });
  await d.qmp.execute("block-job-cancel", { device: "f", force: true });
  await d.qmp.waitForEvent(jobEvent("f", "BLOCK_JOB_CANCELLED"));
  await d.qmp.waitForEvent(statusEvent("f", "null"));
  assert.deepEqual(await blockJobs(d.qmp), []);
});

test("auto-dismiss=false: the job stays concluded (with query fields) until job-dismiss", async (t) => {
  const d = await setup(t);
  await d.qmp.execute("drive-backup", {
    "job-id": "d",
    device: "disk0",
    target: join(d.dir, "d.img"),
    sync: "full",
    "auto-dismiss": false,
  });
  await d.qmp.waitForEvent(jobEvent("d", "BLOCK_JOB_COMPLETED"));
  await d.qmp.waitForEvent(statusEvent("d", "concluded"));
  assert.deepEqual(await d.qmp.execute("query-jobs"), [
    { id: "d", type: "backup", status: "concluded", "current-progress": DISK, "total-progress": DISK },
  ]);
  const info = await blockJob(d.qmp, "d");
  assert.equal(info.status, "concluded");
  assert.equal(info["auto-dismiss"], false);
  await assertQmpError(
    d.qmp.execute("block-job-cancel", { device: "d" }),
    "GenericError",
    "Job 'd' in state 'concluded' cannot accept command verb 'cancel'",
  );
  await assertQmpError(
    d.qmp.execute("drive-backup", {
      "job-id": "d",
      device: "disk0",
      target: join(d.dir, "d2.img"),
      sync: "full",
    }),
    "GenericError",
    "Job ID 'd' already in use",
  );
  assert.ok(!existsSync(join(d.dir, "d2.img")), "a refused drive-backup creates no file");
  assert.ok(!jobEventLog(d.qmp, "d").includes("null"));

  const mark = d.qmp.events.length;
  await d.qmp.execute("job-dismiss", { id: "d" });
  await eventAfter(d.qmp, mark, statusEvent("d", "null"));
  assert.deepEqual(await blockJobs(d.qmp), []);
  assert.deepEqual(await d.qmp.execute("query-jobs"), []);
  await assertQmpError(d.qmp.execute("job-dismiss", { id: "d" }), "GenericError", "Job not found");
});

test("auto-finalize=false: BLOCK_JOB_PENDING, then BLOCK_JOB_COMPLETED only after job-finalize", async (t) => {
  const d = await setup(t);
  const target = join(d.dir, "fin.img");
  await d.qmp.execute("drive-backup", {
    "job-id": "fin",
    device: "disk0",
    target,
    sync: "full",
    "auto-finalize": false,
  });
  await d.qmp.waitForEvent(jobEvent("fin", "BLOCK_JOB_PENDING"));
  assert.deepEqual(await d.qmp.execute("query-jobs"), [
    { id: "fin", type: "backup", status: "pending", "current-progress": DISK, "total-progress": DISK },
  ]);
  // Nothing else happens while it waits: a round trip later it is still pending, not completed.
  await d.qmp.execute("query-version");
  assert.equal((await blockJob(d.qmp, "fin")).status, "pending");
  assert.ok(!d.qmp.events.some(jobEvent("fin", "BLOCK_JOB_COMPLETED")), "no COMPLETED before finalize");
  await assertQmpError(
    d.qmp.execute("job-dismiss", { id: "fin" }),
    "GenericError",
    "Job 'fin' in state 'pending' cannot accept command verb 'dismiss'",
  );
  await assertQmpError(
    d.qmp.execute("block-job-pause", { device: "fin" }),
    "GenericError",
    "Job 'fin' in state 'pending' cannot accept command verb 'pause'",
  );

  await d.qmp.execute("job-finalize", { id: "fin" });
  const done = await d.qmp.waitForEvent(jobEvent("fin", "BLOCK_JOB_COMPLETED"));
  assert.equal(done.data.error, undefined);
  await d.qmp.waitForEvent(statusEvent("fin", "null"));
  assert.deepEqual(jobEventLog(d.qmp, "fin"), [
    "created",
    "running",
    "waiting",
    "pending",
    "BLOCK_JOB_PENDING",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
  ]);
  assertSameImage(readFile(target), readFile(d.image), "finalized full backup");
});

test("auto-finalize=false: block-job-cancel of a pending job ends it cancelled", async (t) => {
  const d = await setup(t);
  await d.qmp.execute("drive-backup", {
    "job-id": "pc",
    device: "disk0",
    target: join(d.dir, "pc.img"),
    sync: "full",
    "auto-finalize": false,
  });
  await d.qmp.waitForEvent(jobEvent("pc", "BLOCK_JOB_PENDING"));
  await d.qmp.execute("block-job-cancel", { device: "pc" });
  await d.qmp.waitForEvent(statusEvent("pc", "null"));
  assert.deepEqual(jobEventLog(d.qmp, "pc").slice(4), [
    "BLOCK_JOB_PENDING",
    "aborting",
    "BLOCK_JOB_CANCELLED",
    "concluded",
    "null",
  ]);
  assert.deepEqual(await blockJobs(d.qmp), []);
});

test("query-block-jobs and query-jobs carry QEMU's fields", async (t) => {
  const d = await setup(t);
  await d.qmp.execute("drive-backup", {
    "job-id": "q",
    device: "disk0",
    target: d.copy,
    sync: "stream",
    mode: "existing",
    speed: 1 * MiB,
    "auto-dismiss": false,
  });
  assert.deepEqual(await blockJobs(d.qmp), [
    {
      type: "backup",
      device: "q",
      len: 0,
      offset: 0,
      busy: true,
      paused: false,
      speed: 1 * MiB,
      "io-status": "ok",
      ready: false,
      status: "running",
      "auto-finalize": true,
      "auto-dismiss": false,
      // drivetap's own (x-): the target is reachable and misses nothing.
      "x-degraded": false,
      "x-dirty-bytes": 0,
    },
  ]);
  assert.deepEqual(await d.qmp.execute("query-jobs"), [
    { id: "q", type: "backup", status: "running", "current-progress": 0, "total-progress": 0 },
  ]);
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x31 0 64k"]));
  const after = await blockJob(d.qmp, "q");
  assert.equal(after.offset, 64 * KiB);
  assert.deepEqual(await d.qmp.execute("query-jobs"), [
    { id: "q", type: "backup", status: "running", "current-progress": 64 * KiB, "total-progress": 64 * KiB },
  ]);
  await d.qmp.execute("block-job-cancel", { device: "q" });
  await d.qmp.waitForEvent(statusEvent("q", "concluded"));
  await d.qmp.execute("job-dismiss", { id: "q" });
});

test("job events reach every QMP client, identically", async (t) => {
  const d = await setup(t);
  const other = await connectQmp(t, d.qmpPath);
  await d.qmp.execute("drive-backup", {
    "job-id": "ev",
    device: "disk0",
    target: join(d.dir, "ev.img"),
    sync: "full",
  });
  await Promise.all([d.qmp, other].map((q) => q.waitForEvent(statusEvent("ev", "null"))));
  const about = (q: QmpClient): unknown[] =>
    q.events.filter((e) => e.data.id === "ev" || e.data.device === "ev");
  assert.equal(about(d.qmp).length, 7);
  assert.deepEqual(about(other), about(d.qmp), "same events, data and timestamps, in the same order");
  assert.deepEqual(jobEventLog(other, "ev"), [
    "created",
    "running",
    "waiting",
    "pending",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
  ]);
  for (const e of other.events) {
    assert.ok(Number.isInteger(e.timestamp.seconds) && Number.isInteger(e.timestamp.microseconds));
  }
});

test("bad backup arguments get QMP errors and leave no job, node or file behind", async (t) => {
  const d = await setup(t);
  // A busy target: t1 is the target of a running job.
  await d.qmp.execute("blockdev-add", {
    driver: "raw",
    "node-name": "t1",
    file: { driver: "file", filename: d.copy },
  });
  // No job-id: the job takes the device's name, disk0.
  await d.qmp.execute("blockdev-backup", { device: "disk0", target: "t1", sync: "stream" });
  assert.deepEqual(
    (await blockJobs(d.qmp)).map((j) => j.device),
    ["disk0"],
  );
  const small = join(d.dir, "small.img");
  writeFileSync(small, Buffer.alloc(1 * MiB, 0xee));
  await d.qmp.execute("blockdev-add", { driver: "memory", "node-name": "m1", size: 1 * MiB });
  await d.qmp.execute("blockdev-add", { driver: "memory", "node-name": "m4", size: DISK });
  const image = readFile(d.image);

  const jobsBefore = JSON.stringify(await blockJobs(d.qmp));
  const nodesBefore = await nodeNames(d.qmp);
  const missing = join(d.dir, "missing.img");
  const created = join(d.dir, "created.img");

  const cases: Array<[string, string, Record<string, unknown>, string | RegExp]> = [
    [
      "unknown device",
      "blockdev-backup",
      { device: "nope", target: "m4", sync: "full" },
      "Cannot find device='nope' nor node-name='nope'",
    ],
    [
      "unknown target",
      "blockdev-backup",
      { "job-id": "x", device: "disk0", target: "nope", sync: "full" },
      "Cannot find device='nope' nor node-name='nope'",
    ],
    [
      "unknown sync",
      "blockdev-backup",
      { device: "disk0", target: "m4", sync: "bogus" },
      "Parameter 'sync' does not accept value 'bogus'",
    ],
    [
      "unknown sync, file",
      "drive-backup",
      { device: "disk0", target: created, sync: "bogus" },
      "Parameter 'sync' does not accept value 'bogus'",
    ],
    [
      "size mismatch",
      "blockdev-backup",
      { "job-id": "x", device: "disk0", target: "m1", sync: "full" },
      `Source and target image have different sizes (${DISK} and ${MiB})`,
    ],
    [
      "size mismatch, file",
      "drive-backup",
      { "job-id": "x", device: "disk0", target: small, sync: "full", mode: "existing" },
      `Source and target image have different sizes (${DISK} and ${MiB})`,
    ],
    [
      "target is source",
      "blockdev-backup",
      { "job-id": "x", device: "disk0", target: "disk0", sync: "full" },
      "Source and target cannot be the same",
    ],
    [
      "target is source file",
      "drive-backup",
      { "job-id": "x", device: "disk0", target: d.image, sync: "full" },
      // QEMU's text, then which node has the file (test/fault/image-safety.test.ts tries other names).
      `Source and target cannot be the same: '${d.image}' is the image of node 'disk0'`,
    ],
    [
      "busy target",
      "blockdev-backup",
      { "job-id": "x", device: "disk0", target: "t1", sync: "stream" },
      "Node 't1' is busy: block job disk0 (backup target)",
    ],
    [
      "default job id taken",
      "blockdev-backup",
      { device: "disk0", target: "m4", sync: "stream" },
      "Job ID 'disk0' already in use",
    ],
    [
      "duplicate job id",
      "blockdev-backup",
      { "job-id": "disk0", device: "disk0", target: "m4", sync: "full" },
      "Job ID 'disk0' already in use",
    ],
    [
      "duplicate job id, file",
      "drive-backup",
      { "job-id": "disk0", device: "disk0", target: created, sync: "full" },
      "Job ID 'disk0' already in use",
    ],
    [
      "missing existing file",
      "drive-backup",
      { "job-id": "x", device: "disk0", target: missing, sync: "full", mode: "existing" },
      `Could not open '${missing}': No such file or directory`,
    ],
    [
      "bad job id",
      "blockdev-backup",
      { "job-id": "1bad", device: "disk0", target: "m4", sync: "full" },
      "Invalid job ID '1bad'",
    ],
    [
      "bad error action",
      "blockdev-backup",
      { "job-id": "x", device: "disk0", target: "m4", sync: "full", "on-target-error": "explode" },
      "Parameter 'on-target-error' does not accept value 'explode'",
    ],
  ];
  for (const [what, command, args, desc] of cases) {
    await t.test(what, async () => {
      await assertQmpError(d.qmp.execute(command, args), "GenericError", desc);
      assert.equal(JSON.stringify(await blockJobs(d.qmp)), jobsBefore, "jobs unchanged");
      assert.deepEqual(await nodeNames(d.qmp), nodesBefore, "nodes unchanged");
      assert.ok(!existsSync(missing), "mode=existing created no file");
      assert.ok(!existsSync(created), "a refused drive-backup created no file");
      assert.equal(statSync(small).size, MiB, "the wrong-size file is untouched");
      assert.ok(readFile(small).equals(Buffer.alloc(MiB, 0xee)));
      assert.ok(readFile(d.image).equals(image), "the served image is untouched");
    });
  }
  await d.qmp.execute("block-job-cancel", { device: "disk0" });
  await d.qmp.waitForEvent(statusEvent("disk0", "null"));
});

test("blockdev-del is refused while a job uses the node and accepted afterwards", async (t) => {
  const d = await setup(t);
  await d.qmp.execute("blockdev-add", {
    driver: "raw",
    "node-name": "tgt",
    file: { driver: "file", filename: d.copy },
  });
  await d.qmp.execute("blockdev-backup", { "job-id": "del", device: "disk0", target: "tgt", sync: "stream" });
  await assertQmpError(
    d.qmp.execute("blockdev-del", { "node-name": "tgt" }),
    "GenericError",
    /^Node 'tgt' is busy: block job del/,
  );
  assert.ok((await nodeNames(d.qmp)).includes("tgt"));
  assert.equal((await blockJob(d.qmp, "del")).status, "running", "the refused delete left the job alone");
  await d.qmp.execute("block-job-cancel", { device: "del" });
  await d.qmp.waitForEvent(jobEvent("del", "BLOCK_JOB_CANCELLED"));
  await d.qmp.execute("blockdev-del", { "node-name": "tgt" });
  assert.ok(!(await nodeNames(d.qmp)).includes("tgt"));
  // The target can be taken again by a new job once freed... and a new node on the same file works.
  await d.qmp.execute("blockdev-add", {
    driver: "raw",
    "node-name": "tgt",
    file: { driver: "file", filename: d.copy },
  });
  await d.qmp.execute("blockdev-backup", { "job-id": "del2", device: "disk0", target: "tgt", sync: "none" });
  await d.qmp.execute("block-job-cancel", { device: "del2" });
  await d.qmp.waitForEvent(statusEvent("del2", "null"));
});

test("block-job-* on an unknown job answer DeviceNotActive; job-* answer GenericError", async (t) => {
  const d = await setup(t);
  const verbs: Array<[string, Record<string, unknown>]> = [
    ["block-job-cancel", { device: "ghost" }],
    ["block-job-pause", { device: "ghost" }],
    ["block-job-resume", { device: "ghost" }],
    ["block-job-set-speed", { device: "ghost", speed: 1 }],
    ["block-job-complete", { device: "ghost" }],
    ["block-job-finalize", { id: "ghost" }],
    ["block-job-dismiss", { id: "ghost" }],
  ];
  for (const [command, args] of verbs) {
    await assertQmpError(d.qmp.execute(command, args), "DeviceNotActive", "Block job 'ghost' not found");
  }
  for (const command of [
    "job-cancel",
    "job-pause",
    "job-resume",
    "job-complete",
    "job-finalize",
    "job-dismiss",
  ]) {
    await assertQmpError(d.qmp.execute(command, { id: "ghost" }), "GenericError", "Job not found");
  }
  // Known job, wrong verb: a backup never becomes ready, so complete is refused.
  await d.qmp.execute("drive-backup", {
    "job-id": "r",
    device: "disk0",
    target: d.copy,
    sync: "stream",
    mode: "existing",
  });
  await assertQmpError(
    d.qmp.execute("block-job-complete", { device: "r" }),
    "GenericError",
    "Job 'r' in state 'running' cannot accept command verb 'complete'",
  );
  await assertQmpError(
    d.qmp.execute("job-finalize", { id: "r" }),
    "GenericError",
    "Job 'r' in state 'running' cannot accept command verb 'finalize'",
  );
  await d.qmp.execute("block-job-cancel", { device: "r" });
  await d.qmp.waitForEvent(statusEvent("r", "null"));
});
