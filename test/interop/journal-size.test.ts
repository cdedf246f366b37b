/**
 * Journal nodes added without `size`: an existing journal takes its size from its header; a new one
 * stays unsized (an empty file that refuses exports, other jobs, bitmaps, marks and parents) until
 * the first stream job that claims it as its target gives it the source's size and writes the
 * header. Through the real daemon: qemu-io writes through the export while the stream runs, and
 * `drivetap journal replay` onto a copy of the start equals the disk. A size that disagrees with an
 * existing journal is refused, and a transaction that sized a journal and then failed leaves it
 * unsized again.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { scanJournalFile } from "../../src/block/drivers/journal.js";
import { CLI } from "../helpers/daemon.js";
import {
  assertExit,
  assertQmpError,
  assertSameImage,
  jobEvent,
  MiB,
  prng,
  qemuIo,
  qemuIoPlan,
  readFile,
  seededBytes,
  serveWithQmp,
  testSeed,
  type QmpDaemon,
} from "../helpers/jobs.js";
import { runOk } from "../helpers/run.js";

const DISK = 8 * MiB;
const UNSIZED = /Journal node 'j' has no size yet: only a stream backup \(sync=stream\) can use it/;

async function virtualSize(d: QmpDaemon, node: string): Promise<number> {
  const nodes = (await d.qmp.execute("query-named-block-nodes")) as Array<{
    "node-name": string;
    image: { "virtual-size": number };
  }>;
  return nodes.find((n) => n["node-name"] === node)!.image["virtual-size"];
}

/** Writes through the export while the stream job `id` records, then cancels it (target in sync). */
async function recordSomeWrites(d: QmpDaemon, id: string, seed: number): Promise<void> {
  const rnd = prng(seed);
  assertExit(
    "qemu-io",
    await qemuIo(d.uri, [
      ...qemuIoPlan(rnd, { regionOffset: 0, regionBytes: DISK, count: 120, lengthMax: 128 * 1024 }),
      "write -z 3M 64k",
      "flush",
    ]),
  );
  const mark = d.qmp.events.length;
  await d.qmp.execute("block-job-cancel", { device: id });
  const end = await d.qmp.waitForEvent(
    (e) => d.qmp.events.indexOf(e) >= mark && jobEvent(id, "BLOCK_JOB_CANCELLED")(e),
  );
  assert.equal(end.data.error, undefined);
}

async function replayEquals(d: QmpDaemon, start: string, journal: string, what: string): Promise<void> {
  const copy = join(d.dir, "replay.img");
  copyFileSync(start, copy);
  const r = await runOk(process.execPath, [CLI, "journal", "replay", journal, copy]);
  assert.match(r.stdout, /applied \d+ changes/);
  assertSameImage(readFile(copy), readFile(d.image), what);
}

test("journal without size: unsized and refused by everyone but a stream job, which sizes it from its source; replay equals the disk", async (t) => {
  const seed = testSeed(t);
  let start = "";
  const d = await serveWithQmp(t, {
    content: seededBytes(seed, DISK),
    prepare: (image) => copyFileSync(image, (start = join(dirname(image), "start.img"))),
  });
  const journal = join(d.dir, "new.journal");
  await d.qmp.execute("blockdev-add", { driver: "journal", "node-name": "j", filename: journal });
  assert.equal(await virtualSize(d, "j"), 0, "no size yet");
  assert.equal(statSync(journal).size, 0, "no header written yet");

  await d.qmp.execute("blockdev-add", { driver: "memory", "node-name": "m", size: DISK });
  const refused: Array<[string, Record<string, unknown>]> = [
    ["block-export-add", { type: "nbd", id: "ej", "node-name": "j", name: "j", writable: true }],
    ["blockdev-backup", { "job-id": "full", device: "disk0", target: "j", sync: "full" }],
    ["blockdev-mirror", { "job-id": "mir", device: "disk0", target: "j", sync: "full" }],
    ["blockdev-backup", { "job-id": "rev", device: "j", target: "m", sync: "stream" }],
    ["block-dirty-bitmap-add", { node: "j", name: "b" }],
    ["blockdev-add", { driver: "raw", "node-name": "rj", file: "j" }],
  ];
  for (const [command, args] of refused) {
    await assertQmpError(d.qmp.execute(command, args), "GenericError", UNSIZED);
  }
  await assertQmpError(
    d.qmp.execute("journal-mark", { "node-name": "j", name: "early" }),
    "GenericError",
    /journal has no size yet/,
  );
  assert.equal(statSync(journal).size, 0, "nothing refused wrote anything");
  assert.deepEqual(await d.qmp.execute("query-block-jobs"), []);

  await d.qmp.execute("blockdev-backup", { "job-id": "s", device: "disk0", target: "j", sync: "stream" });
  assert.equal(await virtualSize(d, "j"), DISK, "the stream job gave it the source's size");
  const header = scanJournalFile(journal, () => false).header;
  assert.equal(header.diskBytes, DISK, "the header is on disk");
  assert.equal(header.data, true);

  await recordSomeWrites(d, "s", seed);
  await d.qmp.execute("journal-mark", { "node-name": "j", name: "end" });
  await replayEquals(d, start, journal, `replay of a journal sized by its job (seed ${seed})`);
});

test("journal without size on an existing journal takes its header's size; sizes that disagree are refused", async (t) => {
  const seed = testSeed(t);
  let start = "";
  const d = await serveWithQmp(t, {
    content: seededBytes(seed, DISK),
    prepare: (image) => copyFileSync(image, (start = join(dirname(image), "start.img"))),
  });
  const journal = join(d.dir, "old.journal");
  await d.qmp.execute("blockdev-add", { driver: "journal", "node-name": "j", filename: journal });
  await d.qmp.execute("blockdev-backup", { "job-id": "s1", device: "disk0", target: "j", sync: "stream" });
  await recordSomeWrites(d, "s1", seed);
  await d.qmp.execute("blockdev-del", { "node-name": "j" });
  const entriesBefore = scanJournalFile(journal).entryCount;

  // Reopened without size: the header's size.
  await d.qmp.execute("blockdev-add", { driver: "journal", "node-name": "j2", filename: journal });
  assert.equal(await virtualSize(d, "j2"), DISK);
  await d.qmp.execute("blockdev-del", { "node-name": "j2" });
  await assertQmpError(
    d.qmp.execute("blockdev-add", {
      driver: "journal",
      "node-name": "j3",
      filename: journal,
      size: 2 * DISK,
    }),
    "GenericError",
    `${journal}: journal is for a disk of ${DISK} bytes, not ${2 * DISK}`,
  );

  // A stream from a source of another size is refused, and the journal is left as it was.
  await d.qmp.execute("blockdev-add", { driver: "journal", "node-name": "j4", filename: journal });
  await d.qmp.execute("blockdev-add", { driver: "memory", "node-name": "big", size: 2 * DISK });
  await assertQmpError(
    d.qmp.execute("blockdev-backup", { "job-id": "s2", device: "big", target: "j4", sync: "stream" }),
    "GenericError",
    `Source and target image have different sizes (${2 * DISK} and ${DISK})`,
  );
  // The right source continues the same journal.
  await d.qmp.execute("blockdev-backup", { "job-id": "s3", device: "disk0", target: "j4", sync: "stream" });
  await recordSomeWrites(d, "s3", seed + 1);
  assert.ok(scanJournalFile(journal).entryCount > entriesBefore, "the second run appended");
  await replayEquals(d, start, journal, `replay across two stream runs (seed ${seed})`);
});

test("journal without size: a transaction that fails after sizing it leaves it unsized; the daemon stops cleanly with it", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: DISK });
  const journal = join(d.dir, "tx.journal");
  await d.qmp.execute("blockdev-add", { driver: "journal", "node-name": "j", filename: journal });
  await assertQmpError(
    d.qmp.execute("transaction", {
      actions: [
        { type: "blockdev-backup", data: { "job-id": "s", device: "disk0", target: "j", sync: "stream" } },
        { type: "blockdev-backup", data: { "job-id": "x", device: "nope", target: "j", sync: "stream" } },
      ],
    }),
    "GenericError",
    "Cannot find device='nope' nor node-name='nope'",
  );
  assert.equal(await virtualSize(d, "j"), 0, "unsized again");
  assert.equal(statSync(journal).size, 0, "the header was taken back");
  assert.deepEqual(await d.qmp.execute("query-block-jobs"), []);
  // The final flush of every node must not fail on a journal that never got a size.
  assert.equal(await d.daemon.stop(), 0);
});
