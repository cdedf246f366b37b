/**
 * transaction: backups started together see exactly the same writes. A full backup and a stream to a
 * journal, started in one transaction while writers are busy, give a base copy and a journal whose
 * replay onto that copy equals the final disk. A transaction with one bad action starts nothing and
 * leaves no file behind.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, existsSync } from "node:fs";
import { join } from "node:path";
import { CLI } from "../helpers/daemon.js";
import {
  assertQmpError,
  assertSameImage,
  blockJobs,
  jobEvent,
  MiB,
  pollUntil,
  prng,
  qemuIoPlan,
  readFile,
  runWriters,
  seededBytes,
  serveWithQmp,
  testSeed,
} from "../helpers/jobs.js";
import { runOk } from "../helpers/run.js";

const DISK = 16 * MiB;

test("transaction: full backup + stream to a journal started together; replay onto the backup equals the disk", async (t) => {
  const seed = testSeed(t);
  const rnd = prng(seed);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK) });
  const journal = join(d.dir, "disk.journal");
  const base = join(d.dir, "base.img");
  await d.qmp.execute("blockdev-add", { driver: "journal", "node-name": "j", filename: journal, size: DISK });

  // Writers run before, during and after the transaction, so writes are in flight as it starts:
  // the transaction is sent once the disk has seen writes.
  const writing = runWriters(
    {
      uri: d.uri,
      commands: qemuIoPlan(rnd, { count: 600, regionOffset: 0, regionBytes: DISK, lengthMax: 64 * 1024 }),
    },
    { uri: d.uri, sizeBytes: DISK, ioBytes: 48 * MiB, seed, bsrange: "4k-64k", iodepth: 16 },
  );
  await pollUntil("writes reaching the disk", async () => {
    const nodes = (await d.qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
    const stats = nodes.find((n) => n["node-name"] === "disk0")?.["x-stats"] as
      { writeOps: number } | undefined;
    return (stats?.writeOps ?? 0) > 100;
  });
  await d.qmp.execute("transaction", {
    actions: [
      { type: "drive-backup", data: { "job-id": "base", device: "disk0", sync: "full", target: base } },
      { type: "blockdev-backup", data: { "job-id": "log", device: "disk0", sync: "stream", target: "j" } },
    ],
  });
  const ids = (await blockJobs(d.qmp)).map((j) => j.device).sort();
  assert.ok(ids.includes("log"), "the stream job runs");
  await writing;
  const nodes = (await d.qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
  const journalStats = nodes.find((n) => n["node-name"] === "j")?.["x-stats"] as { writeOps: number };
  assert.ok(journalStats.writeOps > 100, "the journal saw writes made after the transaction");
  const done = await d.qmp.waitForEvent(jobEvent("base", "BLOCK_JOB_COMPLETED"), 60_000);
  assert.equal(done.data.error, undefined, "the full backup succeeded");
  await d.qmp.execute("block-job-cancel", { device: "log" });
  await d.qmp.waitForEvent(jobEvent("log", "BLOCK_JOB_CANCELLED"), 60_000);

  const replayed = join(d.dir, "replayed.img");
  copyFileSync(base, replayed);
  await runOk(process.execPath, [CLI, "journal", "replay", journal, replayed]);
  assertSameImage(readFile(replayed), readFile(d.image), "base copy + journal replay vs the final disk");
});

test("transaction: one bad action starts nothing and leaves no file behind", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: DISK });
  const target = join(d.dir, "never.img");
  await assertQmpError(
    d.qmp.execute("transaction", {
      actions: [
        { type: "drive-backup", data: { "job-id": "a", device: "disk0", sync: "full", target } },
        { type: "blockdev-backup", data: { "job-id": "b", device: "disk0", sync: "stream", target: "nope" } },
      ],
    }),
    "GenericError",
    /nope/,
  );
  assert.deepEqual(await blockJobs(d.qmp), [], "no job was started");
  assert.equal(existsSync(target), false, "the first action's file was removed");
  // The same id and file work afterwards: nothing was left claimed.
  await d.qmp.execute("drive-backup", { "job-id": "a", device: "disk0", sync: "full", target });
  await d.qmp.waitForEvent(jobEvent("a", "BLOCK_JOB_COMPLETED"), 60_000);
  assertSameImage(readFile(target), readFile(d.image), "the later backup");
});

test("transaction: duplicate job ids in one transaction are refused", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: DISK });
  await d.qmp.execute("blockdev-add", { driver: "memory", "node-name": "m1", size: DISK });
  await d.qmp.execute("blockdev-add", { driver: "memory", "node-name": "m2", size: DISK });
  await assertQmpError(
    d.qmp.execute("transaction", {
      actions: [
        { type: "blockdev-backup", data: { "job-id": "x", device: "disk0", sync: "stream", target: "m1" } },
        { type: "blockdev-backup", data: { "job-id": "x", device: "disk0", sync: "stream", target: "m2" } },
      ],
    }),
    "GenericError",
    "Job ID 'x' already in use",
  );
  assert.deepEqual(await blockJobs(d.qmp), []);
  // Both targets were released.
  await d.qmp.execute("blockdev-del", { "node-name": "m1" });
  await d.qmp.execute("blockdev-del", { "node-name": "m2" });
});
