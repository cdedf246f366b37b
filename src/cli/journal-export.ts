/**
 * `drivetap journal export J --format dm-log-writes OUT`: writes a journal's valid prefix as a log in
 * the layout of the Linux dm-log-writes target, which xfstests' `replay-log` replays (to a mark, an
 * entry number, or each FUA/flush point), so existing crash-consistency scripts can use our journals.
 *
 * The layout (all integers little-endian; "sector" is the log's sector size, 512 unless asked):
 * - sector 0: the super block: magic u64 DM_LOG_WRITES_MAGIC, version u64 (1), number of entries u64,
 *   sector size u32; the rest of the sector is zero.
 * - then each entry, in order: one sector that starts with {disk sector u64, sector count u64, flags u64,
 *   data length u64} and is zero after that (replay-log rejects a non-mark entry whose byte after the
 *   32-byte struct is not zero), followed by `sector count` sectors of data, except for discards, which
 *   carry none. Disk positions are in units of the sector size.
 * - flags: LOG_FLUSH_FLAG 1, LOG_FUA_FLAG 2, LOG_DISCARD_FLAG 4, LOG_MARK_FLAG 8 (LOG_METADATA_FLAG 16
 *   is never set: we do not know which writes are metadata). A mark has only LOG_MARK_FLAG, no sectors,
 *   and its name inline after the struct, NUL-terminated (replay-log compares it with strcmp); its data
 *   length is the name's byte length.
 *
 * How our entries map:
 * - write: its data sectors; FUA carried over.
 * - write-zeroes: dm-log-writes has no zeroing entry (the target does not pass write-zeroes), so it
 *   becomes a write of zero sectors, which replays to the same bytes.
 * - discard: LOG_DISCARD_FLAG over the whole sectors inside it. The partial sectors at its edges are
 *   left out: a discard only allows the device to forget, so keeping those bytes is a valid outcome.
 * - flush: LOG_FLUSH_FLAG with no sectors. mark: as above.
 * - Entries of length 0 are left out (replay-log reads a flagless entry with no sectors as the end of
 *   a damaged log).
 * A write or write-zeroes that does not start and end on a sector boundary cannot be expressed without
 * the bytes around it, which a journal does not hold, so the export fails and names the entry. So does a
 * journal recorded with data=false, which has no data to export.
 *
 * The log is written to OUT.partial and renamed at the end, so a failed export leaves no half log.
 */
import * as fs from "node:fs";
import { Option, type Command } from "commander";
import type { Entry } from "../block/drivers/journal.js";
import { JournalCliError, runJournalAction, scanOrFail, warnTail } from "./journal-common.js";

export const DM_LOG_WRITES_MAGIC = 0x6a736677736872n;
export const DM_LOG_WRITES_VERSION = 1n;
export const LOG_FLUSH_FLAG = 1;
export const LOG_FUA_FLAG = 2;
export const LOG_DISCARD_FLAG = 4;
export const LOG_MARK_FLAG = 8;
export const LOG_METADATA_FLAG = 16;
/** Bytes of the entry struct at the start of an entry's sector; the rest of the sector is padding. */
export const LOG_ENTRY_STRUCT_BYTES = 32;
export const EXPORT_SECTOR_BYTES_DEFAULT = 512;
export const EXPORT_SECTOR_SIZES = [512, 1024, 2048, 4096] as const;
/** Output is gathered into writes of about this size. */
const OUT_BUFFER_BYTES = 4 * 1024 * 1024;

export interface ExportSummary {
  readonly entries: number;
  readonly writes: number;
  /** Write-zeroes, exported as writes of zeros. */
  readonly zeroes: number;
  readonly discards: number;
  readonly flushes: number;
  readonly marks: number;
  /** Entries left out: length 0, or a discard smaller than a sector. */
  readonly skipped: number;
  readonly logBytes: number;
  readonly sectorBytes: number;
}

/** Appends to a file through one large buffer; writes of a buffer or more go straight through. */
class OutFile {
  readonly #fd: number;
  readonly #buf = Buffer.alloc(OUT_BUFFER_BYTES);
  #used = 0;
  #pos: number;

  constructor(fd: number, pos: number) {
    this.#fd = fd;
    this.#pos = pos;
  }

  get position(): number {
    return this.#pos + this.#used;
  }

  append(b: Buffer): void {
    if (this.#used + b.length > this.#buf.length) this.drain();
    if (b.length >= this.#buf.length) {
      this.#writeAll(b);
      return;
    }
    b.copy(this.#buf, this.#used);
    this.#used += b.length;
  }

  /** n zero bytes, without allocating n bytes. */
  appendZeros(n: number): void {
    while (n > 0) {
      if (this.#used === this.#buf.length) this.drain();
      const k = Math.min(n, this.#buf.length - this.#used);
      this.#buf.fill(0, this.#used, this.#used + k);
      this.#used += k;
      n -= k;
    }
  }

  drain(): void {
    if (this.#used === 0) return;
    const b = this.#buf.subarray(0, this.#used);
    this.#used = 0;
    this.#writeAll(b);
  }

  #writeAll(b: Buffer): void {
    let done = 0;
    while (done < b.length) done += fs.writeSync(this.#fd, b, done, b.length - done, this.#pos + done);
    this.#pos += b.length;
  }
}

function entrySector(sectorBytes: number, sector: number, sectors: number, flags: number, dataLen: number) {
  const b = Buffer.alloc(sectorBytes);
  b.writeBigUInt64LE(BigInt(sector), 0);
  b.writeBigUInt64LE(BigInt(sectors), 8);
  b.writeBigUInt64LE(BigInt(flags), 16);
  b.writeBigUInt64LE(BigInt(dataLen), 24);
  return b;
}

function superBlock(sectorBytes: number, entries: number): Buffer {
  const b = Buffer.alloc(sectorBytes);
  b.writeBigUInt64LE(DM_LOG_WRITES_MAGIC, 0);
  b.writeBigUInt64LE(DM_LOG_WRITES_VERSION, 8);
  b.writeBigUInt64LE(BigInt(entries), 16);
  b.writeUInt32LE(sectorBytes, 24);
  return b;
}

/** Writes the dm-log-writes log of `journal` to `out`; throws JournalCliError for what it cannot express. */
export function exportDmLogWrites(
  journal: string,
  out: string,
  sectorBytes: number = EXPORT_SECTOR_BYTES_DEFAULT,
): ExportSummary {
  if (!(EXPORT_SECTOR_SIZES as readonly number[]).includes(sectorBytes))
    throw new JournalCliError(`sector size must be one of ${EXPORT_SECTOR_SIZES.join(", ")}`);
  const header = scanOrFail(journal, () => false).header;
  if (!header.data)
    throw new JournalCliError(
      `${journal} was recorded with data=false (hashes only): it has no data to export`,
    );
  const markNameBytesMax = sectorBytes - LOG_ENTRY_STRUCT_BYTES - 1;
  const partial = `${out}.partial`;
  const fd = fs.openSync(partial, "w");
  const counts = { entries: 0, writes: 0, zeroes: 0, discards: 0, flushes: 0, marks: 0, skipped: 0 };
  let logBytes = 0;
  try {
    // The super block is written last, when the entry count is known (as the kernel target does).
    const o = new OutFile(fd, sectorBytes);
    const unaligned = (e: Entry): JournalCliError =>
      new JournalCliError(
        `entry ${e.seq} (${e.kind} ${e.offset}+${e.length}) is not aligned to ${sectorBytes}-byte sectors: ` +
          `dm-log-writes cannot express it`,
      );
    const s = scanOrFail(journal, (e) => {
      switch (e.kind) {
        case "write":
        case "zero": {
          if (e.length === 0) {
            counts.skipped++;
            return;
          }
          if (e.offset % sectorBytes !== 0 || e.length % sectorBytes !== 0) throw unaligned(e);
          const flags = e.fua ? LOG_FUA_FLAG : 0;
          o.append(entrySector(sectorBytes, e.offset / sectorBytes, e.length / sectorBytes, flags, 0));
          if (e.kind === "write") {
            o.append(e.payload);
            counts.writes++;
          } else {
            o.appendZeros(e.length);
            counts.zeroes++;
          }
          break;
        }
        case "discard": {
          const first = Math.ceil(e.offset / sectorBytes);
          const end = Math.floor((e.offset + e.length) / sectorBytes);
          if (end <= first) {
            counts.skipped++;
            return;
          }
          o.append(entrySector(sectorBytes, first, end - first, LOG_DISCARD_FLAG, 0));
          counts.discards++;
          break;
        }
        case "flush":
          o.append(entrySector(sectorBytes, 0, 0, LOG_FLUSH_FLAG, 0));
          counts.flushes++;
          break;
        case "mark": {
          const name = e.payload;
          if (name.length > markNameBytesMax) {
            throw new JournalCliError(
              `mark ${JSON.stringify(e.name)} (entry ${e.seq}) is ${name.length} bytes; with ${sectorBytes}-byte ` +
                `sectors a dm-log-writes mark holds at most ${markNameBytesMax} (try a larger --sector-size)`,
            );
          }
          const b = entrySector(sectorBytes, 0, 0, LOG_MARK_FLAG, name.length);
          name.copy(b, LOG_ENTRY_STRUCT_BYTES);
          o.append(b);
          counts.marks++;
          break;
        }
      }
      counts.entries++;
    });
    o.drain();
    logBytes = o.position;
    const sb = superBlock(sectorBytes, counts.entries);
    fs.writeSync(fd, sb, 0, sb.length, 0);
    fs.fdatasyncSync(fd);
    warnTail(journal, s);
  } catch (err) {
    fs.closeSync(fd);
    fs.rmSync(partial, { force: true });
    throw err;
  }
  fs.closeSync(fd);
  fs.renameSync(partial, out);
  return { ...counts, logBytes, sectorBytes };
}

function exportCommand(journal: string, out: string, opts: { format: string; sectorSize: string }): void {
  const sectorBytes = Number(opts.sectorSize);
  const r = exportDmLogWrites(journal, out, sectorBytes);
  process.stdout.write(
    `drivetap journal: exported ${r.entries} entries from ${journal} to ${out} as dm-log-writes ` +
      `(${r.writes} writes, ${r.zeroes} write-zeroes as writes of zeros, ${r.discards} discards, ` +
      `${r.flushes} flushes, ${r.marks} marks; ${r.skipped} empty entries left out; ` +
      `${r.logBytes} bytes, ${r.sectorBytes}-byte sectors)\n`,
  );
}

export function addJournalExportCommand(journal: Command): void {
  journal
    .command("export")
    .description(
      "Write a journal as a log in another format (dm-log-writes: readable by xfstests' replay-log)",
    )
    .argument("<journal>", "journal file (recorded with data: true)")
    .argument("<out>", "output file (replaced)")
    .addOption(
      new Option("--format <format>", "output format").choices(["dm-log-writes"]).makeOptionMandatory(),
    )
    .addOption(
      new Option("--sector-size <bytes>", "dm-log-writes sector size")
        .choices(EXPORT_SECTOR_SIZES.map(String))
        .default(String(EXPORT_SECTOR_BYTES_DEFAULT)),
    )
    .action((journal: string, out: string, opts: { format: string; sectorSize: string }) =>
      runJournalAction(() => exportCommand(journal, out, opts)),
    );
}
