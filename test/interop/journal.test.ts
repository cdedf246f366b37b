/**
 * The journal target end to end: the real daemon, a journal node added with blockdev-add, a
 * sync=stream backup into it, qemu-io writing through the NBD export (overlapping aio patterns, write
 * -z, discards, flushes, FUA, and writes large enough for the journal's threadpool path), a
 * journal-mark over QMP, then the CLI: replay to the mark equals a copy of the disk taken at the mark,
 * a full replay equals the final disk, show --json lists every entry and the mark, and a journal torn
 * in the middle of its last write replays its complete prefix.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, truncateSync } from "node:fs";
import { dirname, join } from "node:path";
import { scanJournalFile } from "../../src/block/drivers/journal.js";
import { ENTRY_HEADER_BYTES } from "../../src/block/drivers/journal-format.js";
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
} from "../helpers/jobs.js";
import { run, runOk, type RunResult } from "../helpers/run.js";

const DISK = 16 * MiB;

function journalCli(args: readonly string[]): Promise<RunResult> {
  return run(process.execPath, [CLI, "journal", ...args]);
}

async function replayOnto(start: string, copy: string, journal: string, until?: string): Promise<Buffer> {
  copyFileSync(start, copy);
  const r = await runOk(process.execPath, [
    CLI,
    "journal",
    "replay",
    journal,
    copy,
    ...(until ? ["--until", until] : []),
  ]);
  assert.match(r.stdout, /applied \d+ changes/);
  assert.doesNotMatch(r.stderr, /ignoring/, "an intact journal has nothing to ignore");
  return readFile(copy);
}

test("journal: stream to a journal node, mark, replay to the mark and to the end, show, torn tail", async (t) => {
  const seed = testSeed(t);
  const rnd = prng(seed);
  let start = "";
  const d = await serveWithQmp(t, {
    content: seededBytes(seed, DISK),
    // The copy of the disk as it was when the journal started.
    prepare: (image) => copyFileSync(image, (start = join(dirname(image), "start.img"))),
  });
  const journal = join(d.dir, "disk.journal");

  await d.qmp.execute("blockdev-add", {
    driver: "journal",
    "node-name": "j",
    filename: journal,
    data: true,
    size: DISK,
  });
  await assertQmpError(
    d.qmp.execute("journal-mark", { "node-name": "disk0", name: "x" }),
    "GenericError",
    "Node 'disk0' is not a journal node",
  );
  await d.qmp.execute("blockdev-backup", { "job-id": "s", device: "disk0", target: "j", sync: "stream" });

  const fuaAndBig = [
    "write -P 0xa1 -f 65536 4096", // FUA
    "write -P 0xa2 1048576 1048576", // above the journal's synchronous bound
    "write -z 1114112 65536",
    "discard 2097152 131072",
    "flush",
  ];
  assertExit(
    "qemu-io",
    await qemuIo(d.uri, [
      ...qemuIoPlan(rnd, { regionOffset: 0, regionBytes: 4 * MiB, count: 150, lengthMax: 256 * 1024 }),
      ...fuaAndBig,
    ]),
  );
  const marked = (await d.qmp.execute("journal-mark", { "node-name": "j", name: "m1" })) as { seq: number };
  // No writer is running: the disk file now is the disk at the mark.
  const atMark = readFile(d.image);
  assertExit(
    "qemu-io",
    await qemuIo(
      d.uri,
      qemuIoPlan(rnd, { regionOffset: 2 * MiB, regionBytes: 8 * MiB, count: 150, lengthMax: 512 * 1024 }),
    ),
  );
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0xee 12582912 8192"]));

  await d.qmp.execute("block-job-cancel", { device: "s" });
  const cancelled = await d.qmp.waitForEvent(jobEvent("s", "BLOCK_JOB_CANCELLED"));
  assert.equal(cancelled.data.error, undefined);
  const final = readFile(d.image);
  assert.ok(!final.equals(atMark), "writes after the mark changed the disk");
  assert.ok(!atMark.equals(readFile(start)), "writes before the mark changed the disk");

  // show --json: every line parses, seq runs 0..n-1, every kind appears, and the mark is there.
  const shown = await runOk(process.execPath, [CLI, "journal", "show", "--json", journal]);
  const lines = shown.stdout
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as Record<string, unknown>);
  assert.deepEqual(
    lines.map((l) => l.seq),
    lines.map((_, i) => i),
  );
  for (const kind of ["write", "zero", "discard", "flush", "mark"])
    assert.ok(
      lines.some((l) => l.kind === kind),
      `show lists a ${kind}`,
    );
  const mark = lines.find((l) => l.kind === "mark");
  assert.deepEqual(mark && { seq: mark.seq, name: mark.name }, { seq: marked.seq, name: "m1" });
  assert.ok(!Number.isNaN(Date.parse(String(lines[0].time))), "time is ISO 8601");
  assert.ok(
    lines.some((l) => l.kind === "write" && l.fua === true && l.offset === 65536),
    "FUA recorded",
  );
  assert.ok(
    lines.some((l) => l.kind === "write" && l.length === 1048576),
    "large write recorded",
  );
  assert.equal(lines[lines.length - 1].kind, "flush", "cancel flushed the journal last");
  const table = await runOk(process.execPath, [CLI, "journal", "show", journal]);
  assert.match(table.stdout, new RegExp(`^\\s*${marked.seq}\\s+\\S+\\s+mark\\s+"m1"$`, "m"));

  // Replays.
  assertSameImage(
    await replayOnto(start, join(d.dir, "r-mark.img"), journal, "mark:m1"),
    atMark,
    `replay to m1 (seed ${seed})`,
  );
  assertSameImage(
    await replayOnto(start, join(d.dir, "r-full.img"), journal),
    final,
    `full replay (seed ${seed})`,
  );
  const bad = await journalCli(["replay", journal, join(d.dir, "r-full.img"), "--until", "mark:nope"]);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /no mark named 'nope'/);

  // Tear the last write in the middle: replay gives exactly the entries before it.
  const writes: { seq: number; end: number; bytes: number }[] = [];
  let pos = 64;
  scanJournalFile(journal, (e) => {
    pos += ENTRY_HEADER_BYTES + e.payload.length;
    if (e.kind === "write")
      writes.push({ seq: e.seq, end: pos, bytes: ENTRY_HEADER_BYTES + e.payload.length });
  });
  const last = writes[writes.length - 1];
  const torn = join(d.dir, "torn.journal");
  copyFileSync(journal, torn);
  truncateSync(torn, last.end - Math.floor(last.bytes / 2));
  const prefix = await replayOnto(start, join(d.dir, "r-prefix.img"), journal, `seq:${last.seq - 1}`);
  assert.ok(!prefix.equals(final), "the last write changed something");
  copyFileSync(start, join(d.dir, "r-torn.img"));
  const tornRun = await runOk(process.execPath, [CLI, "journal", "replay", torn, join(d.dir, "r-torn.img")]);
  assert.match(tornRun.stderr, /ignoring \d+ bytes after entry \d+ \(torn entry at the end\)/);
  assertSameImage(readFile(join(d.dir, "r-torn.img")), prefix, `torn journal replay (seed ${seed})`);
});
