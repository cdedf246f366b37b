/**
 * Persistent dirty bitmaps inside a qcow2 image: QEMU's bitmaps header extension (docs/interop/
 * qcow2.txt, "Bitmaps extension" and "Bitmaps"), the bitmap directory it points to, each bitmap's
 * table and its data clusters. Reading checks every field against the file and QEMU's bounds before
 * anything is allocated, so a hostile image fails its open with a reason.
 *
 * The image's bitmaps are only consistent after a clean close, as in QEMU: a writable open marks each
 * one IN_USE on disk first, and the close writes the bits into new clusters, then the directory, makes
 * both durable with their refcounts, and only then points the header extension at them (autoclear
 * bit 0 set, IN_USE cleared). The old clusters are freed after that. A crash in between leaks clusters
 * or leaves IN_USE bitmaps, which load as inconsistent; it never leaves a header pointing at data
 * that is not there. The bits themselves belong to the io layer (io/qcow2-bitmap-store.ts), which
 * registers each bitmap it keeps up to date with `track`; an entry nobody tracks is written back as
 * it is on disk, IN_USE flag included.
 */
import { BlockError } from "../../../core/errors.js";
import { MiB } from "../../../core/units.js";
import type { BlockDriver } from "../../driver.js";
import {
  encodeExtension,
  formatError,
  headerExtensions,
  QCOW2_AUTOCLEAR_BITMAPS,
  QCOW2_EXT_BITMAPS,
  QCOW2_HEADER_V3_MIN_BYTES,
  readU64,
  writeU64,
  type Qcow2Header,
} from "./format.js";
import { Mutex } from "./mutex.js";

/** QEMU's bounds (block/qcow2.h, block/qcow2-bitmap.c). */
export const QCOW2_BITMAPS_MAX = 65535;
export const QCOW2_BITMAP_NAME_BYTES_MAX = 1023;
export const QCOW2_BITMAP_DIRECTORY_BYTES_MAX = 1024 * QCOW2_BITMAPS_MAX;
export const QCOW2_BITMAP_GRANULARITY_BITS_MIN = 9;
export const QCOW2_BITMAP_GRANULARITY_BITS_MAX = 31;
export const QCOW2_BITMAP_TABLE_ENTRIES_MAX = 0x8000000;
/** QEMU's bound on the clusters one bitmap's data may take. */
export const QCOW2_BITMAP_PHYS_BYTES_MAX = 512 * MiB;
/**
 * Bit bytes of one bitmap held in memory: drivetap's bound for any dirty bitmap (the io layer's
 * DIRTY_BITMAP_BYTES_MAX, 32 TiB of disk at 64 KiB granularity), smaller than QEMU's 512 MiB.
 */
export const QCOW2_BITMAP_BYTES_MAX = 64 * MiB;
/** Bit bytes of all an image's bitmaps together, so 65535 of them cannot take 4 TiB of memory. */
export const QCOW2_BITMAPS_BYTES_TOTAL_MAX = 256 * MiB;

// Directory entry flags. QEMU treats EXTRA_DATA_COMPATIBLE as reserved (it supports no extra data).
export const BME_FLAG_IN_USE = 1 << 0;
export const BME_FLAG_AUTO = 1 << 1;
export const BME_FLAG_EXTRA_DATA_COMPATIBLE = 1 << 2;
const BME_FLAGS_KNOWN = BME_FLAG_IN_USE | BME_FLAG_AUTO;
const BME_TYPE_DIRTY_TRACKING = 1;
/** Bitmap table entries: bits 9..55 the data cluster; bit 0 with no cluster: all ones. */
const BME_TABLE_ALL_ONES = 1;
const BME_TABLE_RESERVED_LO = 0x000001fe;
const BME_TABLE_RESERVED_HI = 0xff000000;

const EXTENSION_BYTES = 24;
const DIR_ENTRY_FIXED_BYTES = 24;

export interface BitmapDirEntry {
  readonly name: string;
  readonly tableOffset: number;
  readonly tableEntries: number;
  readonly flags: number;
  readonly granularityBits: number;
}

export interface BitmapsExtension {
  readonly count: number;
  readonly directoryBytes: number;
  readonly directoryOffset: number;
}

/** A bitmap as loaded at open. */
export interface LoadedQcow2Bitmap {
  readonly name: string;
  readonly granularity: number;
  /** The AUTO flag: the bitmap records writes. */
  readonly enabled: boolean;
  /** IN_USE was set at open: a crash while the image was open writable; its data is not loaded. */
  readonly inconsistent: boolean;
  /** The bits (bit c is bit c&7 of byte c>>3, the io layer's DirtyBitmap layout); null if inconsistent. */
  readonly bits: Uint8Array | null;
}

/** A bitmap the io layer keeps up to date, whose bits are written into the image at close. */
export interface TrackedQcow2Bitmap {
  readonly name: string;
  readonly granularity: number;
  readonly enabled: boolean;
  readonly bytes: Uint8Array;
}

/** What the bitmaps need from the qcow2 driver (qcow2.ts). */
export interface Qcow2BitmapHost {
  readonly file: BlockDriver;
  readonly header: Qcow2Header;
  readonly readOnly: boolean;
  /** Host bytes an offset may point into. */
  hostLimit(): number;
  allocCluster(): Promise<number>;
  /** Drops one reference from each cluster of [offset, offset + bytes): nothing on disk points there. */
  free(offset: number, bytes: number): Promise<void>;
  /** Writes back every cached refcount and table, in the driver's crash-safe order, flushed. */
  writeback(): Promise<void>;
  /** Sets the dirty bit before the session's first metadata change. */
  markDirty(): Promise<void>;
  /** Edits cluster 0 (read fresh) under the header lock; `edit` returns how many bytes to write; flushed. */
  updateHeader(edit: (cluster0: Buffer) => number): Promise<void>;
}

/** Bit bytes of a bitmap of `granularity` over `sizeBytes` (QEMU's serialization size). */
export function bitmapBytesOf(sizeBytes: number, granularity: number): number {
  return Math.ceil(Math.ceil(sizeBytes / granularity) / 8);
}

function dirEntryBytes(nameBytes: number): number {
  return Math.ceil((DIR_ENTRY_FIXED_BYTES + nameBytes) / 8) * 8;
}

/** Checks the extension's 24 bytes against the file. */
export function parseBitmapsExtension(
  data: Buffer,
  clusterBytes: number,
  fileBytes: number,
): BitmapsExtension {
  if (data.length !== EXTENSION_BYTES) {
    throw formatError(`bitmaps extension: invalid length ${data.length} (must be ${EXTENSION_BYTES})`);
  }
  const count = data.readUInt32BE(0);
  if (data.readUInt32BE(4) !== 0) throw formatError("bitmaps extension: reserved field is not zero");
  const directoryBytes = readU64(data, 8);
  const directoryOffset = readU64(data, 16);
  if (count === 0) throw formatError("bitmaps extension: zero bitmaps");
  if (count > QCOW2_BITMAPS_MAX) {
    throw formatError(`bitmaps extension: ${count} bitmaps, more than the maximum ${QCOW2_BITMAPS_MAX}`);
  }
  if (directoryBytes === 0 || directoryBytes > QCOW2_BITMAP_DIRECTORY_BYTES_MAX) {
    throw formatError(
      `bitmaps extension: directory size ${directoryBytes} is invalid (1 to ${QCOW2_BITMAP_DIRECTORY_BYTES_MAX})`,
    );
  }
  if (
    directoryOffset === 0 ||
    directoryOffset % clusterBytes !== 0 ||
    directoryOffset + directoryBytes > fileBytes
  ) {
    throw formatError(`bitmaps extension: directory offset ${directoryOffset} is invalid`);
  }
  return { count, directoryBytes, directoryOffset };
}

export function encodeBitmapsExtension(e: BitmapsExtension): Buffer {
  const b = Buffer.alloc(EXTENSION_BYTES);
  b.writeUInt32BE(e.count, 0);
  writeU64(b, 8, e.directoryBytes);
  writeU64(b, 16, e.directoryOffset);
  return b;
}

interface Geometry {
  readonly clusterBytes: number;
  readonly sizeBytes: number;
  readonly fileBytes: number;
}

/** Parses and checks the directory: `count` entries filling `dir` exactly, each within QEMU's rules. */
export function parseDirectory(dir: Buffer, count: number, g: Geometry): BitmapDirEntry[] {
  const out: BitmapDirEntry[] = [];
  const names = new Set<string>();
  let at = 0;
  while (at < dir.length) {
    if (at + DIR_ENTRY_FIXED_BYTES > dir.length) throw formatError("bitmap directory is broken");
    if (out.length === count) throw formatError("more bitmaps in the directory than the header says");
    const tableOffset = readU64(dir, at);
    const tableEntries = dir.readUInt32BE(at + 8);
    const flags = dir.readUInt32BE(at + 12);
    const type = dir[at + 16];
    const granularityBits = dir[at + 17];
    const nameBytes = dir.readUInt16BE(at + 18);
    const extraBytes = dir.readUInt32BE(at + 20);
    if (extraBytes !== 0) throw formatError("bitmap extra data is not supported");
    const next = at + dirEntryBytes(nameBytes);
    if (next > dir.length) throw formatError("bitmap directory is broken");
    const name = dir.toString("utf8", at + DIR_ENTRY_FIXED_BYTES, at + DIR_ENTRY_FIXED_BYTES + nameBytes);
    const bad = (why: string): BlockError =>
      formatError(`bitmap '${name}' doesn't satisfy the constraints: ${why}`);
    if (nameBytes === 0) throw bad("empty name");
    if (nameBytes > QCOW2_BITMAP_NAME_BYTES_MAX) throw bad("name too long");
    if (type !== BME_TYPE_DIRTY_TRACKING) throw bad(`type ${type}`);
    if (flags & ~BME_FLAGS_KNOWN) throw bad(`unknown flags 0x${flags.toString(16)}`);
    if (
      granularityBits < QCOW2_BITMAP_GRANULARITY_BITS_MIN ||
      granularityBits > QCOW2_BITMAP_GRANULARITY_BITS_MAX
    ) {
      throw bad(`granularity 2^${granularityBits}`);
    }
    if (tableEntries === 0 || tableEntries > QCOW2_BITMAP_TABLE_ENTRIES_MAX) throw bad("table size");
    if (tableEntries * g.clusterBytes > QCOW2_BITMAP_PHYS_BYTES_MAX) throw bad("table size");
    if (
      tableOffset === 0 ||
      tableOffset % g.clusterBytes !== 0 ||
      tableOffset + tableEntries * 8 > g.fileBytes
    ) {
      throw bad(`table offset ${tableOffset}`);
    }
    const granularity = 2 ** granularityBits;
    const bytes = bitmapBytesOf(g.sizeBytes, granularity);
    if (bytes > QCOW2_BITMAP_BYTES_MAX) {
      throw bad(`it would take ${bytes} bytes of memory (at most ${QCOW2_BITMAP_BYTES_MAX})`);
    }
    // A bitmap in use may be stale (a crash after a resize); a consistent one must cover the disk.
    if (!(flags & BME_FLAG_IN_USE) && tableEntries !== Math.ceil(bytes / g.clusterBytes)) {
      throw bad(`table of ${tableEntries} entries for ${bytes} bytes of bits`);
    }
    if (names.has(name)) throw formatError(`bitmap '${name}' is in the directory twice`);
    names.add(name);
    out.push({ name, tableOffset, tableEntries, flags, granularityBits });
    at = next;
  }
  if (out.length !== count) throw formatError("fewer bitmaps in the directory than the header says");
  return out;
}

export function encodeDirectory(entries: readonly BitmapDirEntry[]): Buffer {
  const parts: Buffer[] = [];
  for (const e of entries) {
    const name = Buffer.from(e.name, "utf8");
    const b = Buffer.alloc(dirEntryBytes(name.length));
    writeU64(b, 0, e.tableOffset);
    b.writeUInt32BE(e.tableEntries, 8);
    b.writeUInt32BE(e.flags, 12);
    b[16] = BME_TYPE_DIRTY_TRACKING;
    b[17] = e.granularityBits;
    b.writeUInt16BE(name.length, 18);
    name.copy(b, DIR_ENTRY_FIXED_BYTES);
    parts.push(b);
  }
  return Buffer.concat(parts);
}

/** One bitmap table entry: a data cluster, or none with all-zero or all-one bits. */
function tableEntry(table: Buffer, i: number, g: Geometry, name: string): { offset: number; ones: boolean } {
  const hi = table.readUInt32BE(i * 8);
  const lo = table.readUInt32BE(i * 8 + 4);
  const bad = (): BlockError => formatError(`bitmap '${name}': table entry ${i} is invalid`);
  if (hi & BME_TABLE_RESERVED_HI || lo & BME_TABLE_RESERVED_LO) throw bad();
  const offset = (hi & 0x00ffffff) * 2 ** 32 + ((lo & 0xfffffe00) >>> 0);
  if (offset === 0) return { offset, ones: (lo & BME_TABLE_ALL_ONES) !== 0 };
  if (lo & BME_TABLE_ALL_ONES || offset % g.clusterBytes !== 0) throw bad();
  if (offset < g.clusterBytes || offset + g.clusterBytes > g.fileBytes) throw bad();
  return { offset, ones: false };
}

/** Reads a consistent bitmap's bits through its table. */
async function readBits(file: BlockDriver, e: BitmapDirEntry, g: Geometry): Promise<Uint8Array> {
  const cb = g.clusterBytes;
  const granularity = 2 ** e.granularityBits;
  const bits = new Uint8Array(bitmapBytesOf(g.sizeBytes, granularity));
  const table = Buffer.alloc(e.tableEntries * 8);
  await file.pread(e.tableOffset, table);
  const cluster = Buffer.alloc(cb);
  for (let i = 0; i < e.tableEntries; i++) {
    const { offset, ones } = tableEntry(table, i, g, e.name);
    const start = i * cb;
    const n = Math.min(cb, bits.length - start);
    if (offset !== 0) {
      await file.pread(offset, cluster);
      bits.set(cluster.subarray(0, n), start);
    } else if (ones) bits.fill(0xff, start, start + n);
  }
  // Bits past the disk's last granule mean nothing: keep the count exact.
  const clusters = Math.ceil(g.sizeBytes / granularity);
  if (clusters % 8 !== 0 && bits.length > 0) bits[bits.length - 1] &= (1 << (clusters % 8)) - 1;
  return bits;
}

/** The clusters an entry's table and data occupy (only the entries that look valid: a leak is safe). */
async function clustersOf(
  file: BlockDriver,
  e: BitmapDirEntry,
  g: Geometry,
): Promise<Array<[number, number]>> {
  const cb = g.clusterBytes;
  const tableBytes = e.tableEntries * 8;
  const out: Array<[number, number]> = [[e.tableOffset, Math.ceil(tableBytes / cb) * cb]];
  const table = Buffer.alloc(tableBytes);
  await file.pread(e.tableOffset, table);
  for (let i = 0; i < e.tableEntries; i++) {
    try {
      const { offset } = tableEntry(table, i, g, e.name);
      if (offset !== 0) out.push([offset, cb]);
    } catch {
      // An entry a crash or a hostile writer left invalid is leaked, never freed.
    }
  }
  return out;
}

function isZero(b: Uint8Array): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

/**
 * Replaces the bitmaps extension in cluster 0 (removes it for null), moving the backing file name
 * behind the extensions, and sets or clears autoclear bit 0. Returns the bytes to write.
 */
export function rewriteBitmapsExtension(c0: Buffer, header: Qcow2Header, ext: Buffer | null): number {
  const cb = header.clusterBytes;
  const start = header.headerBytes;
  const kept = headerExtensions(c0, start, cb).filter((x) => x.type !== QCOW2_EXT_BITMAPS);
  const backing = header.backingFile === null ? null : Buffer.from(header.backingFile, "utf8");
  const parts: Buffer[] = [];
  // Each kept extension is copied out of c0 here, before c0 is overwritten below.
  for (const x of kept) parts.push(encodeExtension(x.type, x.data));
  if (ext !== null) parts.push(encodeExtension(QCOW2_EXT_BITMAPS, ext));
  parts.push(Buffer.alloc(8)); // end of extensions
  const area = Buffer.concat(parts);
  const end = start + area.length + (backing?.length ?? 0);
  if (end > cb) throw formatError("no room in the first cluster for the bitmaps extension");
  area.copy(c0, start);
  if (backing) {
    backing.copy(c0, start + area.length);
    writeU64(c0, 8, start + area.length);
  }
  const autoclear = c0.readUInt32BE(92);
  c0.writeUInt32BE(
    (ext === null ? autoclear & ~QCOW2_AUTOCLEAR_BITMAPS : autoclear | QCOW2_AUTOCLEAR_BITMAPS) >>> 0,
    92,
  );
  return end;
}

/** The in-image bitmaps of one open qcow2 image. */
export class Qcow2Bitmaps {
  readonly #host: Qcow2BitmapHost;
  /** The directory as it is on disk now. */
  #entries: BitmapDirEntry[] = [];
  #dirOffset = 0;
  #dirBytes = 0;
  /** The extension is there and valid (autoclear bit 0 set): markDirty keeps the bit. */
  #active = false;
  /** The extension is there but a writer that did not know it cleared autoclear bit 0 (QEMU ignores it). */
  #stale = false;
  #loaded: LoadedQcow2Bitmap[] = [];
  readonly #tracked = new Map<string, TrackedQcow2Bitmap>();
  readonly #mutex = new Mutex();

  private constructor(host: Qcow2BitmapHost) {
    this.#host = host;
  }

  get #geometry(): Geometry {
    const h = this.#host.header;
    return { clusterBytes: h.clusterBytes, sizeBytes: h.sizeBytes, fileBytes: this.#host.hostLimit() };
  }

  /** Reads and checks the image's bitmaps; a writable open then marks the consistent ones IN_USE. */
  static async open(host: Qcow2BitmapHost): Promise<Qcow2Bitmaps> {
    const b = new Qcow2Bitmaps(host);
    const h = host.header;
    // v2 has no autoclear bits, so bitmaps there can never be trusted: ignored and left alone.
    if (h.bitmapsExtension === null || h.version !== 3) return b;
    if (!(h.autoclear & QCOW2_AUTOCLEAR_BITMAPS)) {
      b.#stale = true;
      return b;
    }
    const g = b.#geometry;
    const ext = parseBitmapsExtension(h.bitmapsExtension, h.clusterBytes, g.fileBytes);
    const dir = Buffer.alloc(ext.directoryBytes);
    await host.file.pread(ext.directoryOffset, dir);
    const entries = parseDirectory(dir, ext.count, g);
    let total = 0;
    for (const e of entries) total += bitmapBytesOf(g.sizeBytes, 2 ** e.granularityBits);
    if (total > QCOW2_BITMAPS_BYTES_TOTAL_MAX) {
      throw formatError(
        `the image's bitmaps would take ${total} bytes of memory (at most ${QCOW2_BITMAPS_BYTES_TOTAL_MAX})`,
      );
    }
    const loaded: LoadedQcow2Bitmap[] = [];
    for (const e of entries) {
      const inUse = (e.flags & BME_FLAG_IN_USE) !== 0;
      loaded.push({
        name: e.name,
        granularity: 2 ** e.granularityBits,
        enabled: (e.flags & BME_FLAG_AUTO) !== 0 && !inUse,
        inconsistent: inUse,
        bits: inUse ? null : await readBits(host.file, e, g),
      });
    }
    b.#entries = entries;
    b.#dirOffset = ext.directoryOffset;
    b.#dirBytes = ext.directoryBytes;
    b.#active = true;
    b.#loaded = loaded;
    if (!host.readOnly && entries.some((e) => !(e.flags & BME_FLAG_IN_USE))) await b.#markInUse();
    return b;
  }

  /** The bitmaps found at open (the io layer turns them into named bitmaps). */
  get loaded(): readonly LoadedQcow2Bitmap[] {
    return this.#loaded;
  }

  /** Drops what `loaded` holds once the io layer has its own copy of the bits (up to 256 MiB). */
  forgetLoaded(): void {
    this.#loaded = [];
  }

  /** Whether the image had a bitmaps extension that a program without bitmap support disowned. */
  get stale(): boolean {
    return this.#stale;
  }

  /** The autoclear bits a writer keeps: bit 0 while the extension describes valid bitmaps. */
  get autoclear(): number {
    return this.#active ? QCOW2_AUTOCLEAR_BITMAPS : 0;
  }

  /**
   * Marks every bitmap IN_USE in place, QEMU's order: autoclear bit 0 cleared (durable), the
   * directory rewritten, flushed, the bit set again. A torn directory write then only disowns the
   * bitmaps, never corrupts them.
   */
  async #markInUse(): Promise<void> {
    const host = this.#host;
    const setBit = (on: boolean) => (c0: Buffer) => {
      const v = c0.readUInt32BE(92);
      c0.writeUInt32BE((on ? v | QCOW2_AUTOCLEAR_BITMAPS : v & ~QCOW2_AUTOCLEAR_BITMAPS) >>> 0, 92);
      return QCOW2_HEADER_V3_MIN_BYTES;
    };
    await host.updateHeader(setBit(false));
    this.#entries = this.#entries.map((e) => ({ ...e, flags: e.flags | BME_FLAG_IN_USE }));
    await host.file.pwrite(this.#dirOffset, [encodeDirectory(this.#entries)], {});
    await host.file.flush();
    await host.updateHeader(setBit(true));
  }

  /** Registers a bitmap whose bits the close stores (replacing its entry, or adding one). */
  track(t: TrackedQcow2Bitmap): void {
    this.#tracked.set(t.name, t);
  }

  /**
   * Refuses a new persistent bitmap the image could not store, with QEMU's reasons (the caller adds
   * "Can't make bitmap 'NAME' persistent in 'NODE': ").
   */
  checkCanStore(name: string, granularity: number): void {
    const h = this.#host.header;
    const fail = (why: string): never => {
      throw new BlockError("EINVAL", why);
    };
    if (h.version !== 3) fail("Cannot store dirty bitmaps in qcow2 v2 files");
    if (this.#host.readOnly) fail("the image is read-only");
    if (granularity > 2 ** QCOW2_BITMAP_GRANULARITY_BITS_MAX) {
      fail(`Granularity exceeds maximum (${2 ** QCOW2_BITMAP_GRANULARITY_BITS_MAX} bytes)`);
    }
    if (granularity < 2 ** QCOW2_BITMAP_GRANULARITY_BITS_MIN) {
      fail(`Granularity is under minimum (${2 ** QCOW2_BITMAP_GRANULARITY_BITS_MIN} bytes)`);
    }
    const bytes = bitmapBytesOf(h.sizeBytes, granularity);
    if (
      bytes > QCOW2_BITMAP_PHYS_BYTES_MAX ||
      bytes > QCOW2_BITMAP_TABLE_ENTRIES_MAX * h.clusterBytes ||
      bytes > QCOW2_BITMAP_BYTES_MAX
    ) {
      fail("Too much space will be occupied by the bitmap. Use larger granularity");
    }
    if (Buffer.byteLength(name, "utf8") > QCOW2_BITMAP_NAME_BYTES_MAX) {
      fail(`Name length exceeds maximum (${QCOW2_BITMAP_NAME_BYTES_MAX} characters)`);
    }
    const names = new Set([...this.#entries.map((e) => e.name), ...this.#tracked.keys()]);
    if (names.has(name)) fail(`Bitmap already exists: ${name}`);
    names.add(name);
    if (names.size > QCOW2_BITMAPS_MAX) fail("Maximum number of persistent bitmaps is already reached");
    let dirBytes = 0;
    for (const n of names) dirBytes += dirEntryBytes(Buffer.byteLength(n, "utf8"));
    if (dirBytes > QCOW2_BITMAP_DIRECTORY_BYTES_MAX) fail("Not enough space in the bitmap directory");
  }

  /** Removes a bitmap: from the directory on disk now (QEMU does too), or only from memory if new. */
  async remove(name: string): Promise<void> {
    this.#tracked.delete(name);
    if (!this.#entries.some((e) => e.name === name)) return;
    if (this.#host.readOnly) {
      throw new BlockError("EPERM", `Cannot remove persistent bitmap '${name}' from a read-only image`);
    }
    await this.#rewrite(name, false);
  }

  /** Stores every tracked bitmap (at a clean close); entries nobody tracks stay as they are. */
  async storeAll(): Promise<void> {
    if (this.#host.readOnly) return;
    // Untracked entries keep their place (IN_USE included): without tracked ones nothing changes,
    // unless a stale extension is to be dropped.
    if (this.#tracked.size === 0 && !this.#stale) return;
    await this.#rewrite(null, true);
  }

  /**
   * Writes a new directory: `drop` left out and its clusters freed; with `storeTracked`, each tracked
   * bitmap's bits in new clusters (its old ones freed). New clusters and their refcounts are durable
   * before the header points at them; old ones are freed only after it no longer does.
   */
  #rewrite(drop: string | null, storeTracked: boolean): Promise<void> {
    return this.#mutex.run(async () => {
      const host = this.#host;
      const g = this.#geometry;
      await host.markDirty();
      const allocated: Array<[number, number]> = [];
      const frees: Array<[number, number]> = [];
      const out: BitmapDirEntry[] = [];
      let ext: Buffer | null = null;
      let dirOffset = 0;
      let dirBytes = 0;
      try {
        for (const e of this.#entries) {
          const t = storeTracked ? this.#tracked.get(e.name) : undefined;
          if (e.name !== drop && t === undefined) {
            out.push(e);
            continue;
          }
          frees.push(...(await clustersOf(host.file, e, g)));
          if (t !== undefined) out.push(await this.#writeBitmap(t, allocated));
        }
        if (storeTracked) {
          const onDisk = new Set(this.#entries.map((e) => e.name));
          for (const t of this.#tracked.values()) {
            if (!onDisk.has(t.name)) out.push(await this.#writeBitmap(t, allocated));
          }
        }
        if (out.length > 0) {
          const dir = encodeDirectory(out);
          dirBytes = dir.length;
          dirOffset = await this.#allocRun(Math.ceil(dirBytes / g.clusterBytes), allocated);
          await host.file.pwrite(dirOffset, [dir], {});
          ext = encodeBitmapsExtension({
            count: out.length,
            directoryBytes: dirBytes,
            directoryOffset: dirOffset,
          });
        }
        // Data, tables, directory and their refcounts durable before the header points at them.
        await host.writeback();
        await host.updateHeader((c0) => rewriteBitmapsExtension(c0, host.header, ext));
      } catch (err) {
        for (const [off, bytes] of allocated) await host.free(off, bytes).catch(() => undefined);
        throw err;
      }
      if (this.#dirBytes > 0) {
        frees.push([this.#dirOffset, Math.ceil(this.#dirBytes / g.clusterBytes) * g.clusterBytes]);
      }
      this.#entries = out;
      this.#dirOffset = dirOffset;
      this.#dirBytes = dirBytes;
      this.#active = out.length > 0;
      this.#stale = false;
      for (const [off, bytes] of frees) await host.free(off, bytes);
    });
  }

  /** Writes one bitmap's non-zero data clusters and its table; returns its directory entry. */
  async #writeBitmap(t: TrackedQcow2Bitmap, allocated: Array<[number, number]>): Promise<BitmapDirEntry> {
    const host = this.#host;
    const cb = host.header.clusterBytes;
    const bits = t.bytes;
    const tableEntries = Math.max(1, Math.ceil(bits.length / cb));
    const table = Buffer.alloc(tableEntries * 8);
    for (let i = 0; i < tableEntries; i++) {
      const part = bits.subarray(i * cb, Math.min((i + 1) * cb, bits.length));
      if (isZero(part)) continue;
      const off = await host.allocCluster();
      allocated.push([off, cb]);
      const cluster = Buffer.alloc(cb);
      cluster.set(part);
      await host.file.pwrite(off, [cluster], {});
      writeU64(table, i * 8, off);
    }
    const tableOffset = await this.#allocRun(Math.ceil(table.length / cb), allocated);
    await host.file.pwrite(tableOffset, [table], {});
    return {
      name: t.name,
      tableOffset,
      tableEntries,
      flags: t.enabled ? BME_FLAG_AUTO : 0,
      granularityBits: Math.log2(t.granularity),
    };
  }

  /**
   * `n` contiguous clusters (a table or directory is one run). The allocator hands out one cluster
   * at a time, lowest free first: a run that breaks starts again, and clusters left behind are freed
   * (nothing references them). Past the end of the file every cluster is free, so this ends.
   */
  async #allocRun(n: number, allocated: Array<[number, number]>): Promise<number> {
    const host = this.#host;
    const cb = host.header.clusterBytes;
    let first = await host.allocCluster();
    let count = 1;
    const stray: number[] = [];
    while (count < n) {
      const next = await host.allocCluster();
      if (next === first + count * cb) {
        count++;
        continue;
      }
      for (let k = 0; k < count; k++) stray.push(first + k * cb);
      first = next;
      count = 1;
    }
    allocated.push([first, n * cb]);
    for (const off of stray) await host.free(off, cb);
    return first;
  }
}
