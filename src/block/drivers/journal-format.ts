/**
 * The journal's on-disk format, as pure encode/decode functions (no I/O): an append-only record of
 * every write, write-zeroes, discard, flush and mark a stream job forwards to a journal target.
 *
 * All integers are little-endian. A journal file is one file header followed by entries, back to back
 * (no padding, no index):
 *
 * File header, FILE_HEADER_BYTES (64):
 *   0  magic "DTJRNL01" (8 bytes)
 *   8  version u32 (JOURNAL_VERSION)
 *  12  flags u32 (bit 0 FILE_FLAG_DATA: writes carry their data; else their SHA-256)
 *  16  disk size in bytes u64
 *  24  creation wall-clock time, ms since the epoch u64
 *  32  reserved, zero (24 bytes)
 *  56  checksum of bytes 0..56 (8 bytes)
 *
 * Entry header, ENTRY_HEADER_BYTES (64), then `payload length` bytes of payload:
 *   0  magic u32 ENTRY_MAGIC ("DTJE")
 *   4  kind u8 (ENTRY_KIND: write, zero, discard, flush, mark)
 *   5  flags u8 (ENTRY_FLAG_FUA, ENTRY_FLAG_MAY_TRIM, ENTRY_FLAG_DATA, ENTRY_FLAG_HASH)
 *   6  reserved u16, zero
 *   8  seq u64: 0, 1, 2, ... in append order, continued across reopen
 *  16  wall-clock time, µs since the epoch u64
 *  24  monotonic time, ns u64 (process.hrtime.bigint() of the writing process: compare only within
 *      one run of the daemon; wall time orders entries across runs)
 *  32  offset u64 (0 for flush and mark)
 *  40  length u64 (0 for flush and mark)
 *  48  payload length u32
 *  52  reserved, zero (4 bytes)
 *  56  checksum (8 bytes) of header bytes 0..56 followed by the payload
 * The payload is the write's data (ENTRY_FLAG_DATA), its 32-byte SHA-256 (ENTRY_FLAG_HASH), or for a
 * mark its UTF-8 name. zero, discard and flush have none.
 *
 * Recovery: a reader walks entries from the file header and stops at the first one that is torn (the
 * file ends inside it) or corrupt (bad magic, kind, bounds or checksum). Everything before it is the
 * valid prefix; a writer that reopens the file truncates the rest and continues from there.
 *
 * The checksum is the first 8 bytes of SHA-256 (node:crypto). Measured on this machine (Node 20,
 * x86-64 with SHA extensions): SHA-256 1.6 GB/s on 1 MiB buffers and 0.8 GB/s on 4 KiB; a CRC-32C in
 * TypeScript with slicing-by-8 tables 0.9 GB/s and 0.8 GB/s. SHA-256 is as fast for small entries and
 * much faster for large ones, and 64 bits make an accidental match of a torn entry negligible.
 */

import { createHash } from "node:crypto";

export const JOURNAL_MAGIC = "DTJRNL01";
export const JOURNAL_VERSION = 1;
export const FILE_HEADER_BYTES = 64;
export const ENTRY_HEADER_BYTES = 64;
export const ENTRY_MAGIC = 0x454a5444; // "DTJE" read as a little-endian u32
export const FILE_FLAG_DATA = 1;

export const ENTRY_FLAG_FUA = 1;
export const ENTRY_FLAG_MAY_TRIM = 2;
export const ENTRY_FLAG_DATA = 4;
export const ENTRY_FLAG_HASH = 8;
const ENTRY_FLAGS_KNOWN = ENTRY_FLAG_FUA | ENTRY_FLAG_MAY_TRIM | ENTRY_FLAG_DATA | ENTRY_FLAG_HASH;

/** A write's payload is bounded well above the NBD request limit (32 MiB); a reader trusts no more. */
export const ENTRY_PAYLOAD_BYTES_MAX = 64 * 1024 * 1024;
export const MARK_NAME_BYTES_MAX = 1024;
export const HASH_BYTES = 32;
export const CHECKSUM_BYTES = 8;
/** Where the checksum sits in both headers; it covers the bytes before it (and an entry's payload). */
const CHECKSUM_AT = 56;

export type EntryKind = "write" | "zero" | "discard" | "flush" | "mark";
export const ENTRY_KIND: Readonly<Record<EntryKind, number>> = {
  write: 1,
  zero: 2,
  discard: 3,
  flush: 4,
  mark: 5,
};
const KIND_BY_CODE: readonly (EntryKind | undefined)[] = [
  undefined,
  "write",
  "zero",
  "discard",
  "flush",
  "mark",
];

/** A journal that is not one, or not one this version can read. */
export class JournalFormatError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "JournalFormatError";
  }
}

// ---- the checksum -----------------------------------------------------------------------------------

/** The first CHECKSUM_BYTES of SHA-256 over the pieces. */
export function checksum(pieces: readonly Uint8Array[]): Buffer {
  const h = createHash("sha256");
  for (const p of pieces) h.update(p);
  return h.digest().subarray(0, CHECKSUM_BYTES);
}

// ---- the file header ----------------------------------------------------------------------------------

export interface FileHeader {
  readonly version: number;
  /** Writes carry their data (replayable); otherwise their SHA-256. */
  readonly data: boolean;
  readonly diskBytes: number;
  readonly createdMs: number;
}

export function encodeFileHeader(h: Omit<FileHeader, "version">): Buffer {
  const b = Buffer.alloc(FILE_HEADER_BYTES);
  b.write(JOURNAL_MAGIC, 0, "latin1");
  b.writeUInt32LE(JOURNAL_VERSION, 8);
  b.writeUInt32LE(h.data ? FILE_FLAG_DATA : 0, 12);
  b.writeBigUInt64LE(BigInt(h.diskBytes), 16);
  b.writeBigUInt64LE(BigInt(h.createdMs), 24);
  checksum([b.subarray(0, CHECKSUM_AT)]).copy(b, CHECKSUM_AT);
  return b;
}

export function decodeFileHeader(b: Buffer): FileHeader {
  if (b.length < FILE_HEADER_BYTES) throw new JournalFormatError("not a journal: file too short");
  if (b.toString("latin1", 0, 8) !== JOURNAL_MAGIC) throw new JournalFormatError("not a journal: bad magic");
  if (!checksum([b.subarray(0, CHECKSUM_AT)]).equals(b.subarray(CHECKSUM_AT, FILE_HEADER_BYTES)))
    throw new JournalFormatError("journal header checksum mismatch");
  const version = b.readUInt32LE(8);
  if (version !== JOURNAL_VERSION) throw new JournalFormatError(`unsupported journal version ${version}`);
  const diskBytes = Number(b.readBigUInt64LE(16));
  const createdMs = Number(b.readBigUInt64LE(24));
  if (!Number.isSafeInteger(diskBytes) || !Number.isSafeInteger(createdMs))
    throw new JournalFormatError("journal header field out of range");
  return { version, data: (b.readUInt32LE(12) & FILE_FLAG_DATA) !== 0, diskBytes, createdMs };
}

// ---- entries ------------------------------------------------------------------------------------------

export interface EntryFields {
  readonly kind: EntryKind;
  readonly seq: number;
  readonly wallUs: number;
  readonly monoNs: bigint;
  readonly offset: number;
  readonly length: number;
  readonly fua?: boolean;
  readonly mayTrim?: boolean;
  /** What the payload is: a write's data, its hash, or nothing special (mark name, none). */
  readonly payloadKind?: "data" | "hash";
}

export interface Entry extends EntryFields {
  readonly fua: boolean;
  readonly mayTrim: boolean;
  /** A view into the decoded buffer: copy it to keep it past the buffer's life. */
  readonly payload: Buffer;
  /** For marks: the name. */
  readonly name?: string;
}

/**
 * Encodes an entry's header; the checksum covers the header and `payload` (given as pieces so a
 * write's buffers are never copied). Write the header, then the pieces.
 */
export function encodeEntryHeader(e: EntryFields, payload: readonly Buffer[]): Buffer {
  let payloadBytes = 0;
  for (const p of payload) payloadBytes += p.length;
  const b = Buffer.alloc(ENTRY_HEADER_BYTES);
  b.writeUInt32LE(ENTRY_MAGIC, 0);
  b.writeUInt8(ENTRY_KIND[e.kind], 4);
  let flags = 0;
  if (e.fua) flags |= ENTRY_FLAG_FUA;
  if (e.mayTrim) flags |= ENTRY_FLAG_MAY_TRIM;
  if (e.payloadKind === "data") flags |= ENTRY_FLAG_DATA;
  if (e.payloadKind === "hash") flags |= ENTRY_FLAG_HASH;
  b.writeUInt8(flags, 5);
  b.writeBigUInt64LE(BigInt(e.seq), 8);
  b.writeBigUInt64LE(BigInt(e.wallUs), 16);
  b.writeBigUInt64LE(e.monoNs, 24);
  b.writeBigUInt64LE(BigInt(e.offset), 32);
  b.writeBigUInt64LE(BigInt(e.length), 40);
  b.writeUInt32LE(payloadBytes, 48);
  checksum([b.subarray(0, CHECKSUM_AT), ...payload]).copy(b, CHECKSUM_AT);
  return b;
}

/** Header and payload in one buffer (tests, small entries). */
export function encodeEntry(e: EntryFields, payload: readonly Buffer[] = []): Buffer {
  return Buffer.concat([encodeEntryHeader(e, payload), ...payload]);
}

export type DecodeResult =
  | { readonly status: "ok"; readonly entry: Entry; readonly bytes: number }
  /** The buffer ends inside this entry: at the end of a file, a torn tail. */
  | { readonly status: "short"; readonly needBytes: number }
  | { readonly status: "corrupt"; readonly reason: string };

/** Decodes the entry at `pos` of `b`, checking everything a torn or corrupted entry could break. */
export function decodeEntryAt(b: Buffer, pos: number): DecodeResult {
  if (b.length - pos < ENTRY_HEADER_BYTES) return { status: "short", needBytes: ENTRY_HEADER_BYTES };
  if (b.readUInt32LE(pos) !== ENTRY_MAGIC) return { status: "corrupt", reason: "bad entry magic" };
  const kind = KIND_BY_CODE[b.readUInt8(pos + 4)];
  if (!kind) return { status: "corrupt", reason: `unknown entry kind ${b.readUInt8(pos + 4)}` };
  const flags = b.readUInt8(pos + 5);
  if ((flags & ~ENTRY_FLAGS_KNOWN) !== 0) return { status: "corrupt", reason: "unknown entry flags" };
  const payloadBytes = b.readUInt32LE(pos + 48);
  if (payloadBytes > ENTRY_PAYLOAD_BYTES_MAX)
    return { status: "corrupt", reason: `payload length ${payloadBytes} over the bound` };
  const total = ENTRY_HEADER_BYTES + payloadBytes;
  if (b.length - pos < total) return { status: "short", needBytes: total };
  const sum = checksum([
    b.subarray(pos, pos + CHECKSUM_AT),
    b.subarray(pos + ENTRY_HEADER_BYTES, pos + total),
  ]);
  if (!sum.equals(b.subarray(pos + CHECKSUM_AT, pos + ENTRY_HEADER_BYTES)))
    return { status: "corrupt", reason: "entry checksum mismatch" };
  const seq = Number(b.readBigUInt64LE(pos + 8));
  const offset = Number(b.readBigUInt64LE(pos + 32));
  const length = Number(b.readBigUInt64LE(pos + 40));
  const payload = b.subarray(pos + ENTRY_HEADER_BYTES, pos + total);
  const hasData = (flags & ENTRY_FLAG_DATA) !== 0;
  const hasHash = (flags & ENTRY_FLAG_HASH) !== 0;
  if (hasData && payloadBytes !== length) return { status: "corrupt", reason: "data length mismatch" };
  if (hasHash && payloadBytes !== HASH_BYTES) return { status: "corrupt", reason: "hash length mismatch" };
  const entry: Entry = {
    kind,
    seq,
    wallUs: Number(b.readBigUInt64LE(pos + 16)),
    monoNs: b.readBigUInt64LE(pos + 24),
    offset,
    length,
    fua: (flags & ENTRY_FLAG_FUA) !== 0,
    mayTrim: (flags & ENTRY_FLAG_MAY_TRIM) !== 0,
    payloadKind: hasData ? "data" : hasHash ? "hash" : undefined,
    payload,
    name: kind === "mark" ? payload.toString("utf8") : undefined,
  };
  return { status: "ok", entry, bytes: total };
}

export interface DecodedJournal {
  readonly header: FileHeader;
  readonly entries: Entry[];
  /** Bytes from the start of the file that hold the header and complete, valid entries. */
  readonly validBytes: number;
  /** Why decoding stopped before the end of the buffer, if it did. */
  readonly stopReason?: string;
}

/** Decodes a whole journal held in memory, stopping at the first torn or corrupt entry. */
export function decodeEntries(b: Buffer): DecodedJournal {
  const header = decodeFileHeader(b);
  const entries: Entry[] = [];
  let pos = FILE_HEADER_BYTES;
  let stopReason: string | undefined;
  while (pos < b.length) {
    const r = decodeEntryAt(b, pos);
    if (r.status === "short") {
      stopReason = "torn entry at the end";
      break;
    }
    if (r.status === "corrupt") {
      stopReason = r.reason;
      break;
    }
    entries.push(r.entry);
    pos += r.bytes;
  }
  return { header, entries, validBytes: pos, stopReason };
}
