/**
 * The journal format, in both versions (2: CRC-32C, 1: SHA-256): entries round-trip; a journal cut at
 * every byte of its last entry decodes to the complete prefix; a flipped byte anywhere in an entry
 * stops decoding there; the driver reopens a torn journal, truncates the tail and continues the
 * numbering; a version 1 journal is continued in version 1, and the CLI reads it.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync, statSync, truncateSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { crc32c } from "../../src/block/crc32c.js";
import {
  decodeEntries,
  decodeFileHeader,
  encodeEntry,
  encodeEntryHeader,
  encodeFileHeader,
  ENTRY_HEADER_BYTES,
  FILE_HEADER_BYTES,
  JOURNAL_VERSION,
  JournalFormatError,
  type EntryFields,
} from "../../src/block/drivers/journal-format.js";
import { JournalDriver, scanJournalFile } from "../../src/block/drivers/journal.js";

const DISK = 1 << 20;

function sample(): { fields: EntryFields; payload: Buffer[] }[] {
  const data = randomBytes(3000);
  return [
    {
      fields: {
        kind: "write",
        seq: 0,
        wallUs: 1_700_000_000_000_001,
        monoNs: 5n,
        offset: 4096,
        length: 3000,
        fua: true,
        payloadKind: "data",
      },
      payload: [data.subarray(0, 1000), data.subarray(1000)],
    },
    {
      fields: {
        kind: "zero",
        seq: 1,
        wallUs: 1_700_000_000_000_002,
        monoNs: 6n,
        offset: 0,
        length: 65536,
        mayTrim: true,
      },
      payload: [],
    },
    {
      fields: {
        kind: "discard",
        seq: 2,
        wallUs: 1_700_000_000_000_003,
        monoNs: 7n,
        offset: 8192,
        length: 512,
      },
      payload: [],
    },
    {
      fields: { kind: "flush", seq: 3, wallUs: 1_700_000_000_000_004, monoNs: 8n, offset: 0, length: 0 },
      payload: [],
    },
    {
      fields: { kind: "mark", seq: 4, wallUs: 1_700_000_000_000_005, monoNs: 9n, offset: 0, length: 0 },
      payload: [Buffer.from("m1 ☃")],
    },
    {
      fields: {
        kind: "write",
        seq: 5,
        wallUs: 1_700_000_000_000_006,
        monoNs: 10n,
        offset: 0,
        length: 512,
        payloadKind: "hash",
      },
      payload: [createHash("sha256").update(randomBytes(512)).digest()],
    },
  ];
}

const VERSIONS = [2, 1] as const;

function journalBytes(version: number): { bytes: Buffer; ends: number[]; items: ReturnType<typeof sample> } {
  const items = sample();
  const parts = [encodeFileHeader({ data: true, diskBytes: DISK, createdMs: 1_700_000_000_000 }, version)];
  const ends: number[] = [];
  let pos = FILE_HEADER_BYTES;
  for (const it of items) {
    const e = encodeEntry(it.fields, it.payload, version);
    parts.push(e);
    pos += e.length;
    ends.push(pos);
  }
  return { bytes: Buffer.concat(parts), ends, items };
}

for (const version of VERSIONS) {
  test(`journal format v${version}: header and every entry kind round-trip`, () => {
    const { bytes, ends, items } = journalBytes(version);
    const h = decodeFileHeader(bytes);
    assert.deepEqual(h, { version, data: true, diskBytes: DISK, createdMs: 1_700_000_000_000 });
    const d = decodeEntries(bytes);
    assert.equal(d.stopReason, undefined);
    assert.equal(d.validBytes, bytes.length);
    assert.equal(d.validBytes, ends[ends.length - 1]);
    assert.equal(d.entries.length, items.length);
    for (let i = 0; i < items.length; i++) {
      const f = items[i].fields;
      const e = d.entries[i];
      assert.equal(e.kind, f.kind);
      assert.equal(e.seq, f.seq);
      assert.equal(e.wallUs, f.wallUs);
      assert.equal(e.monoNs, f.monoNs);
      assert.equal(e.offset, f.offset);
      assert.equal(e.length, f.length);
      assert.equal(e.fua, f.fua ?? false);
      assert.equal(e.mayTrim, f.mayTrim ?? false);
      assert.equal(e.payloadKind, f.payloadKind);
      assert.ok(e.payload.equals(Buffer.concat(items[i].payload)), `entry ${i} payload`);
    }
    assert.equal(d.entries[4].name, "m1 ☃");
  });

  test(`journal format v${version}: a cut at every byte of the last entry yields exactly the complete prefix`, () => {
    const { bytes, ends } = journalBytes(version);
    const lastStart = ends[ends.length - 2];
    for (let cut = lastStart; cut < bytes.length; cut++) {
      const d = decodeEntries(bytes.subarray(0, cut));
      assert.equal(d.entries.length, ends.length - 1, `cut at ${cut}`);
      assert.equal(d.validBytes, lastStart, `cut at ${cut}`);
      if (cut > lastStart) assert.equal(d.stopReason, "torn entry at the end", `cut at ${cut}`);
    }
    // Cuts anywhere else also give whole entries only.
    for (let cut = FILE_HEADER_BYTES; cut < lastStart; cut++) {
      const d = decodeEntries(bytes.subarray(0, cut));
      assert.ok(ends.includes(d.validBytes) || d.validBytes === FILE_HEADER_BYTES, `cut at ${cut}`);
      assert.ok(d.validBytes <= cut);
    }
  });

  test(`journal format v${version}: a flipped byte in an entry stops decoding at that entry`, () => {
    const { bytes, ends } = journalBytes(version);
    const starts = [FILE_HEADER_BYTES, ...ends.slice(0, -1)];
    for (let k = 0; k < starts.length; k++) {
      for (let at = starts[k]; at < ends[k]; at += at - starts[k] < ENTRY_HEADER_BYTES ? 1 : 97) {
        const bad = Buffer.from(bytes);
        bad[at] ^= 0x40;
        const d = decodeEntries(bad);
        assert.equal(d.entries.length, k, `flip at ${at} (entry ${k})`);
        assert.equal(d.validBytes, starts[k]);
        assert.ok(d.stopReason, `flip at ${at} has a reason`);
      }
    }
    const badHeader = Buffer.from(bytes);
    badHeader[20] ^= 1;
    assert.throws(() => decodeFileHeader(badHeader), JournalFormatError);
    assert.throws(() => decodeFileHeader(Buffer.from("DTJRNL00".padEnd(64, "\0"))), /bad magic/);
  });
}

test("journal format v2: the checksum is CRC-32C of header and payload, then of the header alone", () => {
  assert.equal(JOURNAL_VERSION, 2, "writers create version 2");
  const payload = [randomBytes(100), randomBytes(3996)];
  const fields: EntryFields = {
    kind: "write",
    seq: 2 ** 40 + 3, // above 32 bits: the u64 is written as two u32s
    wallUs: 1_700_000_000_000_007,
    monoNs: 2n ** 63n + 11n,
    offset: 2 ** 45 + 4096,
    length: 4096,
    payloadKind: "data",
  };
  const h = encodeEntryHeader(fields, payload);
  assert.equal(h.readBigUInt64LE(8), 2n ** 40n + 3n);
  assert.equal(h.readBigUInt64LE(16), 1_700_000_000_000_007n);
  assert.equal(h.readBigUInt64LE(24), 2n ** 63n + 11n);
  assert.equal(h.readBigUInt64LE(32), 2n ** 45n + 4096n);
  assert.equal(h.readUInt32LE(48), 4096);
  assert.equal(h.readUInt16LE(6) + h.readUInt32LE(52), 0, "reserved bytes are zero");
  assert.equal(h.readUInt32LE(56), crc32c([h.subarray(0, 56), ...payload]));
  assert.equal(h.readUInt32LE(60), crc32c(h.subarray(0, 56)));
  const fh = encodeFileHeader({ data: false, diskBytes: 2 ** 50, createdMs: 1_700_000_000_000 });
  assert.equal(fh.readUInt32LE(8), 2);
  assert.equal(fh.readUInt32LE(56), crc32c(fh.subarray(0, 56)));
  assert.equal(fh.readUInt32LE(60), crc32c(fh.subarray(0, 56)));
  assert.deepEqual(decodeFileHeader(fh), {
    version: 2,
    data: false,
    diskBytes: 2 ** 50,
    createdMs: 1_700_000_000_000,
  });
  // A damaged payload keeps the header check and fails the whole one: the reason says which.
  const { bytes } = journalBytes(2);
  const bad = Buffer.from(bytes);
  bad[FILE_HEADER_BYTES + ENTRY_HEADER_BYTES + 10] ^= 1;
  assert.equal(decodeEntries(bad).stopReason, "entry checksum mismatch");
  const badHeader = Buffer.from(bytes);
  badHeader[FILE_HEADER_BYTES + 33] ^= 1;
  assert.equal(decodeEntries(badHeader).stopReason, "entry header checksum mismatch");
  // Unknown versions are refused, also when the checksum matches.
  const v3 = Buffer.from(bytes.subarray(0, FILE_HEADER_BYTES));
  v3.writeUInt32LE(3, 8);
  assert.throws(() => decodeFileHeader(v3), /unsupported journal version 3/);
  assert.throws(() => encodeFileHeader({ data: true, diskBytes: DISK, createdMs: 0 }, 3), /version 3/);
});

test("journal driver: a version 1 journal is continued in version 1; the CLI shows, stats and replays it", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "drivetap-journal-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, "v1");
  // A version 1 journal as an older drivetap left it: a header and one write.
  const old = randomBytes(4096);
  const first: EntryFields = {
    kind: "write",
    seq: 0,
    wallUs: 1_700_000_000_000_000,
    monoNs: 1n,
    offset: 0,
    length: 4096,
    payloadKind: "data",
  };
  writeFileSync(
    path,
    Buffer.concat([
      encodeFileHeader({ data: true, diskBytes: DISK, createdMs: 1_700_000_000_000 }, 1),
      encodeEntry(first, [old], 1),
    ]),
  );
  const j = JournalDriver.open(path, { size: DISK });
  assert.equal(j.header.version, 1);
  assert.equal(j.nextSeq, 1);
  const data = randomBytes(8192);
  await j.pwrite(4096, [data.subarray(0, 4096), data.subarray(4096)], { fua: true });
  await j.pwrite(300 * 1024, [randomBytes(200 * 1024)], {}); // a threadpool append, too
  await j.pwriteZeroes(0, 512, {});
  await j.mark("after");
  await j.flush();
  await j.close();
  const kinds: string[] = [];
  const s = scanJournalFile(path, (e) => void kinds.push(`${e.seq}:${e.kind}`));
  assert.equal(s.header.version, 1, "the header was not rewritten");
  assert.equal(s.stopReason, undefined);
  assert.equal(s.validBytes, statSync(path).size);
  assert.deepEqual(kinds, ["0:write", "1:write", "2:write", "3:zero", "4:mark", "5:flush"]);
  // Every entry carries a version 1 (SHA-256) checksum.
  const whole = decodeEntries(readFileSync(path));
  assert.equal(whole.entries.length, 6);

  const cli = join(dirname(fileURLToPath(import.meta.url)), "../../src/cli/main.js");
  const run = (...args: string[]): string => {
    const r = spawnSync(process.execPath, [cli, "journal", ...args], { encoding: "utf8" });
    assert.equal(r.status, 0, `journal ${args.join(" ")}: ${r.stderr}`);
    return r.stdout;
  };
  const shown = run("show", path, "--json")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as { seq: number; kind: string });
  assert.deepEqual(
    shown.map((e) => `${e.seq}:${e.kind}`),
    kinds,
  );
  assert.equal((JSON.parse(run("stat", path, "--json")) as { entries: number }).entries, 6);
  const image = join(dir, "image");
  writeFileSync(image, Buffer.alloc(DISK));
  run("replay", path, image, "--until", "mark:after");
  const disk = readFileSync(image);
  assert.ok(disk.subarray(512, 4096).equals(old.subarray(512)), "the version 1 entry replayed");
  assert.ok(disk.subarray(0, 512).equals(Buffer.alloc(512)), "the zeroes replayed");
  assert.ok(disk.subarray(4096, 12288).equals(data), "the appended entry replayed");
});

test("journal driver: appends, reopens a torn journal, truncates the tail and continues seq", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "drivetap-journal-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, "j");
  assert.throws(() => JournalDriver.open(path), /size is required/);
  rmSync(path, { force: true });
  const j = JournalDriver.open(path, { size: DISK });
  const big = randomBytes(300 * 1024); // above the synchronous bound: a threadpool append
  await j.pwrite(0, [Buffer.from("hello")], {});
  await j.pwrite(4096, [big], { fua: true });
  await j.pwriteZeroes(8192, 4096, { mayTrim: true });
  assert.equal(await j.mark("m"), 3);
  await j.flush();
  await j.close();
  const full = statSync(path).size;
  const entries: string[] = [];
  const s = scanJournalFile(path, (e) => void entries.push(`${e.seq}:${e.kind}`));
  assert.deepEqual(entries, ["0:write", "1:write", "2:zero", "3:mark", "4:flush"]);
  assert.equal(s.validBytes, full);

  truncateSync(path, full - 10); // tear the flush entry
  const j2 = JournalDriver.open(path, { size: DISK });
  assert.equal(j2.nextSeq, 4, "numbering continues after the complete prefix");
  assert.equal(statSync(path).size, full - ENTRY_HEADER_BYTES, "the torn tail was truncated");
  await j2.pdiscard(0, 512);
  await j2.close();
  const kinds: string[] = [];
  scanJournalFile(path, (e) => void kinds.push(`${e.seq}:${e.kind}`));
  assert.deepEqual(kinds, ["0:write", "1:write", "2:zero", "3:mark", "4:discard"]);
  assert.throws(() => JournalDriver.open(path, { size: DISK * 2 }), /disk of 1048576 bytes/);

  writeFileSync(join(dir, "x"), Buffer.alloc(100, 1));
  assert.throws(
    () => JournalDriver.open(join(dir, "x")),
    (e: Error & { code?: string }) => e.code === "EINVAL",
  );
});

test("journal driver: data=false stores a SHA-256; a full disk and a closed journal fail loudly", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "drivetap-journal-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, "h");
  const j = JournalDriver.open(path, { size: DISK, data: false });
  const data = randomBytes(4096);
  await j.pwrite(0, [data.subarray(0, 100), data.subarray(100)], {});
  await j.close();
  const seen: Buffer[] = [];
  const s = scanJournalFile(path, (e) => void seen.push(Buffer.from(e.payload)));
  assert.equal(s.header.data, false);
  assert.deepEqual(seen, [createHash("sha256").update(data).digest()]);
  // /dev/full exists and is empty: creating the header there fails with ENOSPC, not silently.
  assert.throws(
    () => JournalDriver.open("/dev/full", { size: DISK }),
    (e: Error & { code?: string }) => e.code === "ENOSPC",
  );
  // Writing after close fails loudly rather than dropping the entry.
  await assert.rejects(j.pwrite(0, [data], {}), (e: Error & { code?: string }) => e.code === "ESHUTDOWN");
});

test("journal driver: deferSize opens a new journal unsized (every request refused) until setSize writes the header", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "drivetap-journal-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, "j");
  const j = JournalDriver.open(path, { deferSize: true, data: false });
  assert.equal(j.sized, false);
  assert.equal(j.size(), 0);
  assert.equal(statSync(path).size, 0, "no header until a size is given");
  const unsized = (e: Error & { code?: string }): boolean =>
    e.code === "EINVAL" && /journal has no size yet/.test(e.message);
  await assert.rejects(j.pwrite(0, [Buffer.alloc(512)], {}), unsized);
  await assert.rejects(j.pwrite(0, [Buffer.alloc(512)], { fua: true }), unsized);
  await assert.rejects(j.pwriteZeroes(0, 512, {}), unsized);
  await assert.rejects(j.pdiscard(0, 512), unsized);
  await assert.rejects(j.mark("m"), unsized);
  assert.throws(() => j.header, unsized);
  await j.flush(); // nothing was written, so nothing to make durable
  assert.equal(statSync(path).size, 0);

  // A size given and taken back (an aborted transaction) leaves the file empty again.
  j.setSize(DISK);
  assert.equal(statSync(path).size, 64);
  j.unsetSize();
  assert.equal(statSync(path).size, 0);
  assert.equal(j.sized, false);

  j.setSize(DISK);
  assert.throws(() => j.setSize(DISK), /already has a size/);
  await j.pwrite(4096, [Buffer.alloc(4096, 7)], {});
  assert.throws(() => j.unsetSize(), /has entries, its size stays/);
  await j.close();
  const s = scanJournalFile(path);
  assert.equal(s.header.diskBytes, DISK);
  assert.equal(s.header.data, false, "the data option given at open is the header's");
  assert.equal(s.entryCount, 1);
  const again = JournalDriver.open(path, { deferSize: true });
  assert.equal(again.size(), DISK, "an existing journal has its header's size");
  await again.close();
});
