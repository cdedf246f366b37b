/**
 * `journal stat` and `journal export --format dm-log-writes` on a journal written with the
 * JournalDriver: exact counts, bytes, histogram buckets, hot regions and marks; the exported log
 * parsed by an independent reader (test/helpers/dm-log-writes.ts: replay-log is not packaged in
 * Debian) entry by entry, and replayed to the mark and to the end against a byte model; and the cases
 * the export refuses (unaligned writes, hash-only journals, marks too long for a sector), which leave
 * no output behind. A torn tail is left out by both.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import {
  copyFileSync,
  existsSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { JournalDriver, scanJournalFile } from "../../src/block/drivers/journal.js";
import { encodeFileHeader } from "../../src/block/drivers/journal-format.js";
import {
  exportDmLogWrites,
  LOG_DISCARD_FLAG,
  LOG_FLUSH_FLAG,
  LOG_FUA_FLAG,
  LOG_MARK_FLAG,
} from "../../src/cli/journal-export.js";
import { JournalCliError } from "../../src/cli/journal-common.js";
import { analyzeJournal, HOT_REGION_BYTES, log2Floor } from "../../src/cli/journal-stat.js";
import { applyDmLog, decodeDmLog } from "../helpers/dm-log-writes.js";

const MiB = 1024 * 1024;
const DISK = 8 * MiB;

function tempDir(t: { after: (fn: () => void) => void }): string {
  const dir = mkdtempSync(join(tmpdir(), "drivetap-jstat-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed * 17 + (i >> 9)) & 0xff;
  return b;
}

const A = pattern(4096, 1);
const B = pattern(1536, 2);
const C = pattern(128 * 1024, 3);
const D = pattern(8192, 4);

/**
 * The journal every test reads, and the disk (from all zeros) at the mark and at the end. Version 1
 * (SHA-256 checksums) is made as an older drivetap would have begun it: the driver continues it.
 */
async function makeJournal(path: string, version = 2): Promise<{ atMark: Buffer; final: Buffer }> {
  if (version === 1)
    writeFileSync(path, encodeFileHeader({ data: true, diskBytes: DISK, createdMs: Date.now() }, 1));
  const j = JournalDriver.open(path, { size: DISK, data: true });
  assert.equal(j.header.version, version);
  const disk = Buffer.alloc(DISK);
  await j.pwrite(0, [A.subarray(0, 1000), A.subarray(1000)], { fua: false });
  A.copy(disk, 0);
  await j.pwrite(MiB + 512, [B], { fua: true });
  B.copy(disk, MiB + 512);
  await j.pwriteZeroes(2048, 1024, { fua: false, mayTrim: false });
  disk.fill(0, 2048, 3072);
  await j.pdiscard(3 * MiB + 100, 70000); // unaligned edges: the export keeps the whole sectors inside
  await j.pdiscard(5 * MiB + 10, 100); // smaller than a sector: left out of the export
  await j.flush();
  await j.mark("m1");
  const atMark = Buffer.from(disk);
  await j.pwrite(6 * MiB, [C], { fua: false });
  C.copy(disk, 6 * MiB);
  await j.pwrite(2 * MiB - 4096, [D], { fua: false }); // across two hot regions
  D.copy(disk, 2 * MiB - 4096);
  await j.pwrite(0, [Buffer.alloc(0)], { fua: false }); // empty: counted, not exported
  await j.flush();
  await j.close();
  assert.equal(scanJournalFile(path).header.version, version);
  return { atMark, final: disk };
}

test("log2Floor: power-of-two buckets, including past 32 bits", () => {
  assert.deepEqual(
    [1, 2, 3, 511, 512, 513, 2 ** 31, 2 ** 32 - 1, 2 ** 32, 2 ** 40 + 5, 2 ** 52].map(log2Floor),
    [0, 1, 1, 8, 9, 9, 31, 31, 32, 40, 52],
  );
});

for (const version of [2, 1]) {
  test(`journal stat (v${version}): counts, bytes, size histogram, hot regions, time span and marks`, async (t) => {
    const dir = tempDir(t);
    const journal = join(dir, "j.journal");
    await makeJournal(journal, version);
    const st = analyzeJournal(journal);
    assert.equal(st.entries, 11);
    assert.deepEqual(st.kinds, { write: 5, zero: 1, discard: 2, flush: 2, mark: 1 });
    assert.equal(st.fua, 1);
    assert.deepEqual(st.bytes, { written: 4096 + 1536 + C.length + 8192, zeroed: 1024, discarded: 70100 });
    assert.equal(st.diskBytes, DISK);
    assert.equal(st.data, true);
    assert.deepEqual(
      st.sizeHistogram.map((b) => [b.fromBytes, b.toBytes, b.write, b.zero, b.discard]),
      [
        [64, 128, 0, 0, 1],
        [1024, 2048, 1, 1, 0],
        [4096, 8192, 1, 0, 0],
        [8192, 16384, 1, 0, 0],
        [65536, 131072, 0, 0, 1],
        [131072, 262144, 1, 0, 0],
      ],
    );
    assert.equal(st.hotRegions.regionBytes, HOT_REGION_BYTES);
    assert.deepEqual(
      st.hotRegions.top.map((r) => [r.offset / MiB, r.bytesWritten, r.writes]),
      [
        [6, C.length, 1],
        [1, 1536 + 4096, 2],
        [0, 4096, 1],
        [2, 4096, 1],
      ],
    );
    assert.equal(st.markCount, 1);
    assert.deepEqual(
      st.marks.map((m) => [m.seq, m.name]),
      [[6, "m1"]],
    );
    assert.ok(st.time, "a journal with entries has a time span");
    assert.ok(st.time.lastUs >= st.time.firstUs && st.time.spanMs >= 0);
    assert.ok(Date.parse(st.time.first) <= Date.parse(st.time.last));
    assert.equal(st.ignoredTail, undefined);
    assert.equal(st.validBytes, statSync(journal).size);
  });

  test(`journal export dm-log-writes (v${version}): structure, flags, data, marks, and replay to the mark and the end`, async (t) => {
    const dir = tempDir(t);
    const journal = join(dir, "j.journal");
    const { atMark, final } = await makeJournal(journal, version);
    const out = join(dir, "j.log");
    const summary = exportDmLogWrites(journal, out);
    assert.deepEqual(
      { ...summary, logBytes: undefined },
      {
        entries: 9,
        writes: 4,
        zeroes: 1,
        discards: 1,
        flushes: 2,
        marks: 1,
        skipped: 2,
        logBytes: undefined,
        sectorBytes: 512,
      },
    );
    const raw = readFileSync(out);
    assert.equal(summary.logBytes, raw.length);
    assert.equal(existsSync(`${out}.partial`), false);
    const log = decodeDmLog(raw);
    assert.equal(log.sectorBytes, 512);
    const s = (n: number): number => n / 512;
    assert.deepEqual(
      log.entries.map((e) => [e.sector, e.sectors, e.flags]),
      [
        [0, s(4096), 0],
        [s(MiB + 512), 3, LOG_FUA_FLAG],
        [4, 2, 0], // write-zeroes as a write of zeros
        [
          Math.ceil((3 * MiB + 100) / 512),
          Math.floor((3 * MiB + 70100) / 512) - Math.ceil((3 * MiB + 100) / 512),
          LOG_DISCARD_FLAG,
        ],
        [0, 0, LOG_FLUSH_FLAG],
        [0, 0, LOG_MARK_FLAG],
        [s(6 * MiB), s(C.length), 0],
        [s(2 * MiB - 4096), 16, 0],
        [0, 0, LOG_FLUSH_FLAG],
      ],
    );
    assert.ok(log.entries[0].data.equals(A));
    assert.ok(log.entries[1].data.equals(B));
    assert.ok(log.entries[2].data.equals(Buffer.alloc(1024)));
    assert.equal(log.entries[3].data.length, 0, "a discard carries no data");
    assert.equal(log.entries[5].markName, "m1");
    assert.ok(log.entries[6].data.equals(C));
    assert.ok(log.entries[7].data.equals(D));

    const image = Buffer.alloc(DISK);
    applyDmLog(log, image, 5);
    assert.ok(image.equals(atMark), "replayed to the mark, the log gives the disk at the mark");
    const full = Buffer.alloc(DISK);
    applyDmLog(log, full);
    assert.ok(full.equals(final), "replayed in full, the log gives the final disk");

    // A larger sector size: the same log in 4 KiB units refuses the write at 1 MiB + 512.
    const out4k = join(dir, "j4k.log");
    assert.throws(
      () => exportDmLogWrites(journal, out4k, 4096),
      (e: unknown) =>
        e instanceof JournalCliError &&
        /entry 1 \(write 1049088\+1536\) is not aligned to 4096/.test(e.message),
    );
    assert.equal(
      existsSync(out4k) || existsSync(`${out4k}.partial`),
      false,
      "a failed export leaves nothing",
    );
    assert.throws(() => exportDmLogWrites(journal, out4k, 1000), /sector size must be one of/);
  });
}

test("journal export refuses what dm-log-writes cannot hold: hash-only journals, overlong marks", async (t) => {
  const dir = tempDir(t);
  const hashes = join(dir, "h.journal");
  const h = JournalDriver.open(hashes, { size: DISK, data: false });
  await h.pwrite(0, [A], { fua: false });
  await h.close();
  assert.throws(() => exportDmLogWrites(hashes, join(dir, "h.log")), /data=false/);
  assert.equal(existsSync(join(dir, "h.log.partial")), false);

  const marks = join(dir, "m.journal");
  const name = "x".repeat(600);
  const m = JournalDriver.open(marks, { size: DISK, data: true });
  await m.pwrite(0, [A], { fua: false });
  await m.mark(name);
  await m.close();
  assert.throws(() => exportDmLogWrites(marks, join(dir, "m.log")), /holds at most 479/);
  exportDmLogWrites(marks, join(dir, "m.log"), 1024);
  const log = decodeDmLog(readFileSync(join(dir, "m.log")));
  assert.equal(log.sectorBytes, 1024);
  assert.deepEqual(
    log.entries.map((e) => [e.sectors, e.flags, e.markName]),
    [
      [4, 0, undefined],
      [0, LOG_MARK_FLAG, name],
    ],
  );
});

for (const version of [2, 1]) {
  test(`journal stat and export (v${version}) leave out a torn tail`, async (t) => {
    const dir = tempDir(t);
    const journal = join(dir, "j.journal");
    await makeJournal(journal, version);
    const torn = join(dir, "torn.journal");
    copyFileSync(journal, torn);
    truncateSync(torn, statSync(journal).size - 10); // inside the last entry (a flush)
    const st = analyzeJournal(torn);
    assert.equal(st.entries, 10);
    assert.equal(st.kinds.flush, 1);
    assert.equal(st.ignoredTail, "torn entry at the end");
    assert.equal(st.fileBytes - st.validBytes, 64 - 10);
    const r = exportDmLogWrites(torn, join(dir, "torn.log"));
    assert.equal(r.entries, 8);
    assert.equal(decodeDmLog(readFileSync(join(dir, "torn.log"))).entries.length, 8);
  });
}
