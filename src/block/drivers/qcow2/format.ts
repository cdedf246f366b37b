/**
 * The qcow2 on-disk format: constants named as QEMU's spec (docs/interop/qcow2.txt) names them, the
 * header codec, and the bit layout of L1, L2 and refcount entries. Pure functions, no I/O.
 *
 * Everything read from an image is untrusted: parseHeader checks every offset and size against the
 * file's size and the bounds below before the driver uses it, so a hostile header gives an error
 * with a reason, never an out-of-bounds read or a huge allocation.
 */
import { BlockError } from "../../../core/errors.js";
import { KiB, MiB } from "../../../core/units.js";

export const QCOW_MAGIC = 0x514649fb; // "QFI\xfb"
export const QCOW2_HEADER_V2_BYTES = 72;
/** The v3 header up to and including header_length (without compression_type). */
export const QCOW2_HEADER_V3_MIN_BYTES = 104;
/** The v3 header drivetap writes: with the compression_type byte, padded to a multiple of 8. */
export const QCOW2_HEADER_V3_BYTES = 112;

export const QCOW2_CLUSTER_BITS_MIN = 9; // 512 B
export const QCOW2_CLUSTER_BITS_MAX = 21; // 2 MiB
export const QCOW2_DEFAULT_CLUSTER_BYTES = 64 * KiB;
/** QEMU's limits on the L1 and refcount tables; larger ones are refused before any allocation. */
export const QCOW2_L1_BYTES_MAX = 32 * MiB;
export const QCOW2_REFTABLE_BYTES_MAX = 8 * MiB;
/** Virtual sizes beyond this are refused: offsets must stay exact in a JavaScript number. */
export const QCOW2_VIRTUAL_SIZE_MAX = 2 ** 52;
/** QEMU's bound on the backing file name. */
export const QCOW2_BACKING_NAME_BYTES_MAX = 1023;
/** QEMU's bound on the number of internal snapshots. */
export const QCOW2_SNAPSHOTS_MAX = 65536;
/** Header extensions read at most; each is at least 8 bytes, so a cluster holds fewer anyway. */
export const QCOW2_HEADER_EXTENSIONS_MAX = 1024;

/** 16-bit refcounts: the only width drivetap reads and writes (QEMU's default). */
export const QCOW2_REFCOUNT_ORDER = 4;

// Incompatible feature bits.
export const QCOW2_INCOMPAT_DIRTY = 1 << 0;
export const QCOW2_INCOMPAT_CORRUPT = 1 << 1;
export const QCOW2_INCOMPAT_DATA_FILE = 1 << 2;
export const QCOW2_INCOMPAT_COMPRESSION = 1 << 3;
export const QCOW2_INCOMPAT_EXTL2 = 1 << 4;
// Compatible feature bits.
export const QCOW2_COMPAT_LAZY_REFCOUNTS = 1 << 0;
// Autoclear feature bits: a writer that does not know one clears it (and so disowns its data).
export const QCOW2_AUTOCLEAR_BITMAPS = 1 << 0;

export const QCOW2_COMPRESSION_TYPE_ZLIB = 0;

// Header extension types.
export const QCOW2_EXT_END = 0;
export const QCOW2_EXT_BACKING_FORMAT = 0xe2792aca;
export const QCOW2_EXT_FEATURE_TABLE = 0x6803f857;
export const QCOW2_EXT_CRYPTO = 0x0537be77;
export const QCOW2_EXT_BITMAPS = 0x23852875;
export const QCOW2_EXT_DATA_FILE = 0x44415441;

/** The names of the incompatible bits drivetap knows, for refusals that say what is missing. */
const INCOMPAT_NAMES: Readonly<Record<number, string>> = {
  0: "dirty bit",
  1: "corrupt bit",
  2: "external data file",
  3: "compression type",
  4: "extended L2 entries",
};

// Entry bits, as two 32-bit halves (hi = bits 63..32). Bit 63: COPIED; bit 62: compressed.
export const QCOW_OFLAG_COPIED_HI = 0x80000000;
export const QCOW_OFLAG_COMPRESSED_HI = 0x40000000;
/** Bit 0 of a standard L2 entry (v3): the cluster reads as zeros. */
export const QCOW_OFLAG_ZERO = 1;
/** Bits 9..55 of an L1, L2 or refcount table entry: the host offset. */
const OFFSET_HI_MASK = 0x00ffffff;
const OFFSET_LO_MASK = 0xfffffe00;

export interface Qcow2Header {
  readonly version: 2 | 3;
  readonly clusterBits: number;
  readonly clusterBytes: number;
  readonly sizeBytes: number;
  readonly l1Entries: number;
  readonly l1Offset: number;
  readonly refcountTableOffset: number;
  readonly refcountTableClusters: number;
  readonly snapshots: number;
  readonly snapshotsOffset: number;
  readonly incompatible: number;
  readonly compatible: number;
  readonly autoclear: number;
  readonly headerBytes: number;
  readonly backingFile: string | null;
  readonly backingFormat: string | null;
  /** The bitmaps extension's data, unchecked (bitmaps.ts reads it), or null when absent. */
  readonly bitmapsExtension: Buffer | null;
}

/** A format error in the image: corrupt or unsupported (the message names which and why). */
export function formatError(message: string): BlockError {
  return new BlockError("EINVAL", `qcow2: ${message}`);
}

export function unsupported(message: string): BlockError {
  return new BlockError("ENOTSUP", `qcow2: ${message}`);
}

/** Reads a big-endian u64 as a number, or Infinity when it is not exact (no sane image has those). */
export function readU64(buf: Buffer, at: number): number {
  const hi = buf.readUInt32BE(at);
  const lo = buf.readUInt32BE(at + 4);
  const v = hi * 2 ** 32 + lo;
  return Number.isSafeInteger(v) ? v : Infinity;
}

export function writeU64(buf: Buffer, at: number, v: number): void {
  buf.writeUInt32BE(Math.floor(v / 2 ** 32), at);
  buf.writeUInt32BE(v % 2 ** 32, at + 4);
}

/** The host offset in an L1, refcount table or standard L2 entry (flags and reserved bits masked). */
export function entryOffset(hi: number, lo: number): number {
  return (hi & OFFSET_HI_MASK) * 2 ** 32 + ((lo & OFFSET_LO_MASK) >>> 0);
}

/** Whether the low 9 bits of an L1/reftable entry hold anything (they must not: offsets are aligned). */
export function entryUnaligned(lo: number, clusterBytes: number): boolean {
  return (lo & (clusterBytes - 1) & 0x1ff) !== 0;
}

/** Decodes a compressed L2 descriptor: the byte offset and the (sector-rounded) length of the data. */
export function compressedExtent(
  hi: number,
  lo: number,
  clusterBits: number,
): { offset: number; bytes: number } {
  // Bits 0..x-1 hold the offset, x..61 the count of extra 512-byte sectors, with x = 62 - (bits - 8).
  const x = 62 - (clusterBits - 8);
  const hiOffsetBits = x - 32;
  const offset = (hi & ((1 << hiOffsetBits) - 1)) * 2 ** 32 + (lo >>> 0);
  const sectors = ((hi >>> hiOffsetBits) & ((1 << (clusterBits - 8)) - 1)) + 1;
  return { offset, bytes: sectors * 512 - (offset % 512) };
}

function isPowerOfTwoAligned(v: number, clusterBytes: number): boolean {
  return v % clusterBytes === 0;
}

/**
 * Parses and checks the header (cluster 0 or at least its first bytes). `fileBytes` is the image
 * file's size: every table must lie inside it. Unsupported features are refused by name.
 */
export function parseHeader(buf: Buffer, fileBytes: number): Qcow2Header {
  if (buf.length < QCOW2_HEADER_V2_BYTES || buf.readUInt32BE(0) !== QCOW_MAGIC) {
    throw formatError("not a qcow2 image (bad magic)");
  }
  const version = buf.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw unsupported(`version ${version} is not supported (only 2 and 3)`);
  const clusterBits = buf.readUInt32BE(20);
  if (clusterBits < QCOW2_CLUSTER_BITS_MIN || clusterBits > QCOW2_CLUSTER_BITS_MAX) {
    throw formatError(`cluster size 2^${clusterBits} is outside 512 bytes to 2 MiB`);
  }
  const clusterBytes = 2 ** clusterBits;
  if (buf.length < Math.min(clusterBytes, fileBytes) && buf.length < QCOW2_HEADER_V3_BYTES) {
    throw formatError("header truncated");
  }
  const sizeBytes = readU64(buf, 24);
  if (sizeBytes > QCOW2_VIRTUAL_SIZE_MAX) throw formatError(`virtual size ${sizeBytes} is too large`);
  const cryptMethod = buf.readUInt32BE(32);
  if (cryptMethod !== 0)
    throw unsupported(`encrypted images are not supported (crypt_method ${cryptMethod})`);
  const l1Entries = buf.readUInt32BE(36);
  const l1Offset = readU64(buf, 40);
  const refcountTableOffset = readU64(buf, 48);
  const refcountTableClusters = buf.readUInt32BE(56);
  const snapshots = buf.readUInt32BE(60);
  const snapshotsOffset = readU64(buf, 64);

  let incompatible = 0;
  let compatible = 0;
  let autoclear = 0;
  let headerBytes = QCOW2_HEADER_V2_BYTES;
  let refcountOrder = QCOW2_REFCOUNT_ORDER;
  if (version === 3) {
    if (buf.length < QCOW2_HEADER_V3_MIN_BYTES) throw formatError("v3 header truncated");
    // The feature words are 64-bit; drivetap knows bits below 32, so a high bit is simply unknown.
    const incompatHi = buf.readUInt32BE(72);
    incompatible = buf.readUInt32BE(76);
    compatible = buf.readUInt32BE(84);
    autoclear = buf.readUInt32BE(92);
    refcountOrder = buf.readUInt32BE(96);
    headerBytes = buf.readUInt32BE(100);
    if (headerBytes < QCOW2_HEADER_V3_MIN_BYTES || headerBytes > clusterBytes || headerBytes > buf.length) {
      throw formatError(`header_length ${headerBytes} is invalid`);
    }
    const unknown: string[] = [];
    for (let bit = 5; bit < 32; bit++) if (incompatible & (1 << bit)) unknown.push(`bit ${bit}`);
    for (let bit = 0; bit < 32; bit++) if (incompatHi & (1 << bit)) unknown.push(`bit ${bit + 32}`);
    if (unknown.length > 0) {
      const names = featureNames(buf, headerBytes, clusterBytes);
      const described = unknown.map((b) => names.get(b) ?? b);
      throw unsupported(`unsupported incompatible feature(s): ${described.join(", ")}`);
    }
    if (incompatible & QCOW2_INCOMPAT_DATA_FILE) throw unsupported(`${INCOMPAT_NAMES[2]} is not supported`);
    if (incompatible & QCOW2_INCOMPAT_EXTL2) throw unsupported(`${INCOMPAT_NAMES[4]} are not supported`);
    const compressionType = headerBytes > QCOW2_HEADER_V3_MIN_BYTES ? buf[104] : QCOW2_COMPRESSION_TYPE_ZLIB;
    if (compressionType !== QCOW2_COMPRESSION_TYPE_ZLIB) {
      const name = compressionType === 1 ? "zstd" : `type ${compressionType}`;
      throw unsupported(`compression ${name} is not supported (only deflate)`);
    }
  }
  if (refcountOrder !== QCOW2_REFCOUNT_ORDER) {
    throw unsupported(
      `refcount_order ${refcountOrder} (${2 ** Math.min(refcountOrder, 31)}-bit refcounts) is not supported: only 16-bit refcounts`,
    );
  }

  const inFile = (offset: number, bytes: number): boolean => offset + bytes <= fileBytes;
  const l2Entries = clusterBytes / 8;
  const l1Needed = Math.ceil(sizeBytes / (clusterBytes * l2Entries));
  if (l1Entries * 8 > QCOW2_L1_BYTES_MAX) throw formatError(`L1 table of ${l1Entries} entries is too large`);
  if (l1Entries < l1Needed) throw formatError(`L1 table of ${l1Entries} entries is too small for the disk`);
  if (l1Entries > 0 && (!isPowerOfTwoAligned(l1Offset, clusterBytes) || l1Offset === 0)) {
    throw formatError(`L1 table offset ${l1Offset} is invalid`);
  }
  if (l1Entries > 0 && !inFile(l1Offset, l1Entries * 8))
    throw formatError("L1 table lies beyond the end of the file");
  if (refcountTableClusters === 0 || refcountTableClusters * clusterBytes > QCOW2_REFTABLE_BYTES_MAX) {
    throw formatError(`refcount table of ${refcountTableClusters} clusters is invalid`);
  }
  if (!isPowerOfTwoAligned(refcountTableOffset, clusterBytes) || refcountTableOffset === 0) {
    throw formatError(`refcount table offset ${refcountTableOffset} is invalid`);
  }
  if (!inFile(refcountTableOffset, refcountTableClusters * clusterBytes)) {
    throw formatError("refcount table lies beyond the end of the file");
  }
  if (snapshots > QCOW2_SNAPSHOTS_MAX) throw formatError(`${snapshots} snapshots is too many`);
  if (snapshots > 0 && (!isPowerOfTwoAligned(snapshotsOffset, clusterBytes) || !inFile(snapshotsOffset, 1))) {
    throw formatError(`snapshot table offset ${snapshotsOffset} is invalid`);
  }

  let backingFile: string | null = null;
  const backingOffset = readU64(buf, 8);
  if (backingOffset !== 0) {
    const len = buf.readUInt32BE(16);
    if (len > QCOW2_BACKING_NAME_BYTES_MAX || backingOffset + len > Math.min(clusterBytes, buf.length)) {
      throw formatError("backing file name too long or beyond the first cluster");
    }
    backingFile = buf.toString("utf8", backingOffset, backingOffset + len);
  }
  let backingFormat: string | null = null;
  let bitmapsExtension: Buffer | null = null;
  for (const ext of headerExtensions(
    buf,
    version === 3 ? headerBytes : QCOW2_HEADER_V2_BYTES,
    clusterBytes,
  )) {
    if (ext.type === QCOW2_EXT_BACKING_FORMAT) backingFormat = ext.data.toString("utf8");
    if (ext.type === QCOW2_EXT_CRYPTO) throw unsupported("encrypted images are not supported");
    if (ext.type === QCOW2_EXT_BITMAPS) bitmapsExtension = ext.data;
  }
  return {
    version,
    clusterBits,
    clusterBytes,
    sizeBytes,
    l1Entries,
    l1Offset,
    refcountTableOffset,
    refcountTableClusters,
    snapshots,
    snapshotsOffset,
    incompatible,
    compatible,
    autoclear,
    headerBytes,
    backingFile,
    backingFormat,
    bitmapsExtension,
  };
}

export interface HeaderExtension {
  readonly type: number;
  readonly data: Buffer;
}

/** The header extensions of a parsed header (`buf`: the image's first cluster). */
export function extensionsOf(buf: Buffer, h: Qcow2Header): HeaderExtension[] {
  return headerExtensions(buf, h.version === 3 ? h.headerBytes : QCOW2_HEADER_V2_BYTES, h.clusterBytes);
}

/** The header extensions after the header, checked to stay inside the first cluster. */
export function headerExtensions(buf: Buffer, start: number, clusterBytes: number): HeaderExtension[] {
  const end = Math.min(buf.length, clusterBytes);
  const out: HeaderExtension[] = [];
  let at = start;
  while (at + 8 <= end && out.length < QCOW2_HEADER_EXTENSIONS_MAX) {
    const type = buf.readUInt32BE(at);
    const len = buf.readUInt32BE(at + 4);
    if (type === QCOW2_EXT_END) break;
    if (at + 8 + len > end)
      throw formatError(`header extension 0x${type.toString(16)} runs past the first cluster`);
    out.push({ type, data: buf.subarray(at + 8, at + 8 + len) });
    at += 8 + Math.ceil(len / 8) * 8;
  }
  return out;
}

/** The feature name table (for messages): "bit N" -> its name. Tolerates a broken table. */
function featureNames(buf: Buffer, start: number, clusterBytes: number): Map<string, string> {
  const names = new Map<string, string>();
  try {
    for (const ext of headerExtensions(buf, start, clusterBytes)) {
      if (ext.type !== QCOW2_EXT_FEATURE_TABLE) continue;
      for (let at = 0; at + 48 <= ext.data.length; at += 48) {
        if (ext.data[at] !== 0) continue; // incompatible features only
        const raw = ext.data.subarray(at + 2, at + 48);
        const nul = raw.indexOf(0);
        names.set(`bit ${ext.data[at + 1]}`, raw.toString("utf8", 0, nul < 0 ? raw.length : nul));
      }
    }
  } catch {
    // A broken extension already fails the open elsewhere; here it only loses the names.
  }
  return names;
}

export interface NewHeader {
  readonly clusterBits: number;
  readonly sizeBytes: number;
  readonly l1Entries: number;
  readonly l1Offset: number;
  readonly refcountTableOffset: number;
  readonly refcountTableClusters: number;
  readonly backingFile?: string;
  readonly backingFormat?: string;
}

/** Feature names drivetap writes into new images, as qemu-img does, so tools can name the bits. */
const FEATURE_TABLE: ReadonlyArray<readonly [number, number, string]> = [
  [0, 0, "dirty bit"],
  [0, 1, "corrupt bit"],
  [0, 2, "external data file"],
  [0, 3, "compression type"],
  [0, 4, "extended L2 entries"],
  [1, 0, "lazy refcounts"],
  [2, 0, "bitmaps"],
  [2, 1, "raw external data"],
];

/** One header extension as it lies in cluster 0: type, length, the data padded to 8 bytes. */
export function encodeExtension(type: number, data: Uint8Array): Buffer {
  const e = Buffer.alloc(8 + Math.ceil(data.length / 8) * 8);
  e.writeUInt32BE(type, 0);
  e.writeUInt32BE(data.length, 4);
  e.set(data, 8);
  return e;
}

/** Encodes a v3 header with its extensions and backing file name: the content of cluster 0. */
export function encodeHeader(h: NewHeader): Buffer {
  const clusterBytes = 2 ** h.clusterBits;
  const parts: Buffer[] = [];
  const head = Buffer.alloc(QCOW2_HEADER_V3_BYTES);
  head.writeUInt32BE(QCOW_MAGIC, 0);
  head.writeUInt32BE(3, 4);
  head.writeUInt32BE(h.clusterBits, 20);
  writeU64(head, 24, h.sizeBytes);
  head.writeUInt32BE(h.l1Entries, 36);
  writeU64(head, 40, h.l1Offset);
  writeU64(head, 48, h.refcountTableOffset);
  head.writeUInt32BE(h.refcountTableClusters, 56);
  head.writeUInt32BE(QCOW2_REFCOUNT_ORDER, 96);
  head.writeUInt32BE(QCOW2_HEADER_V3_BYTES, 100);
  parts.push(head);
  const ext = (type: number, data: Buffer): number => parts.push(encodeExtension(type, data));
  if (h.backingFormat !== undefined) ext(QCOW2_EXT_BACKING_FORMAT, Buffer.from(h.backingFormat, "utf8"));
  const table = Buffer.alloc(48 * FEATURE_TABLE.length);
  FEATURE_TABLE.forEach(([type, bit, name], i) => {
    table[i * 48] = type;
    table[i * 48 + 1] = bit;
    table.write(name, i * 48 + 2, "utf8");
  });
  const backing = h.backingFile === undefined ? null : Buffer.from(h.backingFile, "utf8");
  // The feature table is optional: leave it out where a 512-byte cluster has no room for it.
  const withoutTable = parts.reduce((n, p) => n + p.length, 0) + 8 + (backing?.length ?? 0);
  if (withoutTable + 8 + table.length <= clusterBytes) ext(QCOW2_EXT_FEATURE_TABLE, table);
  parts.push(Buffer.alloc(8)); // end of extensions
  let out = Buffer.concat(parts);
  if (backing) {
    if (backing.length > QCOW2_BACKING_NAME_BYTES_MAX) throw formatError("backing file name too long");
    out.writeUInt32BE(Math.floor(out.length / 2 ** 32), 8);
    out.writeUInt32BE(out.length, 12);
    out.writeUInt32BE(backing.length, 16);
    out = Buffer.concat([out, backing]);
  }
  if (out.length > clusterBytes) {
    throw new BlockError("EINVAL", "qcow2: the header and backing file name do not fit in one cluster");
  }
  return out;
}
