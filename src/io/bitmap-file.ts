/**
 * The sidecar file of a persistent dirty bitmap, and its group commit. The rule it serves (see
 * ARCHITECTURE.md, "persistent dirty bitmaps"): a cluster's bit is durable before any write to that
 * cluster reaches the image, so after a crash the file holds a superset of what changed.
 *
 * Layout (little-endian), one file per bitmap in `IMAGE.bitmaps/`:
 *
 *   0     header, 64 bytes: magic "DTBITMAP", u32 version (1), u32 flags (bit 0: recording),
 *         u32 granularity, u32 name length, u64 disk size, u32 page bytes (4096), 12 reserved bytes,
 *         8-byte checksum (first 8 bytes of SHA-256 over bytes 0..48 and the name), 8 reserved bytes
 *   64    the bitmap's name (UTF-8, at most BITMAP_NAME_BYTES_MAX)
 *   4096  pages of PAGE_BYTES: an 8-byte checksum (SHA-256 over the page index as u32 and the bits),
 *         then PAGE_BITS_BYTES bytes of bits (bit c of the bitmap is bit c&7 of byte c>>3)
 *
 * A page is the unit of update: changed bits rewrite only their pages. A page that fails its checksum
 * on load (a write torn by a crash) is loaded with every bit set: more to copy, never less. The header
 * changes only on create (written whole to a temp file, then renamed) and on enable/disable (one
 * 64-byte write inside the first sector).
 */
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import * as path from "node:path";
import { fdatasyncAsync } from "../block/drivers/fs-async.js";
import { BlockError, toBlockError } from "../core/errors.js";
import { DirtyBitmap } from "./dirty-bitmap.js";

export const BITMAP_FILE_MAGIC = "DTBITMAP";
export const BITMAP_FILE_VERSION = 1;
export const HEADER_BYTES = 64;
export const PAGES_OFFSET = 4096;
export const PAGE_BYTES = 4096;
export const PAGE_CHECKSUM_BYTES = 8;
export const PAGE_BITS_BYTES = PAGE_BYTES - PAGE_CHECKSUM_BYTES;
/** QEMU's limit on bitmap names. */
export const BITMAP_NAME_BYTES_MAX = 1023;
export const FLAG_RECORDING = 1;
/** The sidecar directory of an image, and the suffix of its bitmap files. */
export const SIDECAR_SUFFIX = ".bitmaps";
const FILE_SUFFIX = ".bitmap";

export interface BitmapFileHeader {
  readonly name: string;
  readonly granularity: number;
  readonly sizeBytes: number;
  readonly recording: boolean;
}

function sha8(pieces: readonly Uint8Array[]): Buffer {
  const h = createHash("sha256");
  for (const p of pieces) h.update(p);
  return h.digest().subarray(0, 8);
}

export function encodeHeader(h: BitmapFileHeader): Buffer {
  const name = Buffer.from(h.name, "utf8");
  if (name.length > BITMAP_NAME_BYTES_MAX) throw new BlockError("EINVAL", "bitmap name too long");
  const b = Buffer.alloc(HEADER_BYTES + name.length);
  b.write(BITMAP_FILE_MAGIC, 0, "latin1");
  b.writeUInt32LE(BITMAP_FILE_VERSION, 8);
  b.writeUInt32LE(h.recording ? FLAG_RECORDING : 0, 12);
  b.writeUInt32LE(h.granularity, 16);
  b.writeUInt32LE(name.length, 20);
  b.writeBigUInt64LE(BigInt(h.sizeBytes), 24);
  b.writeUInt32LE(PAGE_BYTES, 32);
  name.copy(b, HEADER_BYTES);
  sha8([b.subarray(0, 48), name]).copy(b, 48);
  return b;
}

/** Decodes and checks a header; throws BlockError EINVAL with the reason. */
export function decodeHeader(b: Buffer): BitmapFileHeader {
  const bad = (why: string): BlockError => new BlockError("EINVAL", `bad bitmap file header: ${why}`);
  if (b.length < HEADER_BYTES) throw bad("too short");
  if (b.toString("latin1", 0, 8) !== BITMAP_FILE_MAGIC) throw bad("magic");
  if (b.readUInt32LE(8) !== BITMAP_FILE_VERSION) throw bad(`version ${b.readUInt32LE(8)}`);
  const nameLength = b.readUInt32LE(20);
  if (nameLength > BITMAP_NAME_BYTES_MAX || HEADER_BYTES + nameLength > b.length) throw bad("name length");
  const name = b.subarray(HEADER_BYTES, HEADER_BYTES + nameLength);
  if (!sha8([b.subarray(0, 48), name]).equals(b.subarray(48, 56))) throw bad("checksum");
  const granularity = b.readUInt32LE(16);
  const sizeBytes = Number(b.readBigUInt64LE(24));
  if (granularity < 512 || (granularity & (granularity - 1)) !== 0) throw bad("granularity");
  if (!Number.isSafeInteger(sizeBytes)) throw bad("size");
  if (b.readUInt32LE(32) !== PAGE_BYTES) throw bad("page size");
  return {
    name: name.toString("utf8"),
    granularity,
    sizeBytes,
    recording: (b.readUInt32LE(12) & FLAG_RECORDING) !== 0,
  };
}

/** Bytes of bits a bitmap of this geometry has, and the pages holding them. */
export function pageCount(bits: DirtyBitmap): number {
  return Math.max(1, Math.ceil(bits.bytes.length / PAGE_BITS_BYTES));
}

/** Page `index` of `bits`: checksum then bits (zero-padded). */
export function encodePage(bits: DirtyBitmap, index: number): Buffer {
  const page = Buffer.alloc(PAGE_BYTES);
  const start = index * PAGE_BITS_BYTES;
  const src = bits.bytes.subarray(start, Math.min(start + PAGE_BITS_BYTES, bits.bytes.length));
  page.set(src, PAGE_CHECKSUM_BYTES);
  pageChecksum(index, page.subarray(PAGE_CHECKSUM_BYTES)).copy(page, 0);
  return page;
}

function pageChecksum(index: number, body: Uint8Array): Buffer {
  const i = Buffer.alloc(4);
  i.writeUInt32LE(index, 0);
  return sha8([i, body]);
}

/** The file a bitmap named `name` of `image` lives in (names may hold any character). */
export function bitmapFilePath(image: string, name: string): string {
  const id = createHash("sha256").update(name, "utf8").digest("hex").slice(0, 32);
  return path.join(path.resolve(image) + SIDECAR_SUFFIX, id + FILE_SUFFIX);
}

function fsyncDir(dir: string): void {
  const fd = fs.openSync(dir, "r");
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

interface Deferred {
  readonly promise: Promise<void>;
  resolve(): void;
  reject(err: Error): void;
}

function deferred(): Deferred {
  let resolve!: () => void;
  let reject!: (err: Error) => void;
  const promise = new Promise<void>((res, rej) => {
    resolve = res;
    reject = rej;
  });
  // Nobody may wait on a batch (clears); its failure is still reported through poisoning.
  promise.catch(() => undefined);
  return { promise, resolve, reject };
}

export interface DecodedBitmapFile {
  readonly header: BitmapFileHeader;
  readonly bits: DirtyBitmap;
  /** Pages that failed their checksum (or are missing), loaded with every bit set. */
  readonly badPages: number[];
}

/** Decodes a whole bitmap file; a bad header throws, bad pages load as all-dirty. */
export function decodeBitmapFile(b: Buffer): DecodedBitmapFile {
  const header = decodeHeader(b.subarray(0, Math.min(b.length, HEADER_BYTES + BITMAP_NAME_BYTES_MAX)));
  const bits = new DirtyBitmap(header.sizeBytes, header.granularity);
  const body = Buffer.alloc(bits.bytes.length);
  const badPages: number[] = [];
  for (let p = 0; p < pageCount(bits); p++) {
    const at = PAGES_OFFSET + p * PAGE_BYTES;
    const start = p * PAGE_BITS_BYTES;
    const len = Math.min(PAGE_BITS_BYTES, body.length - start);
    const page = b.subarray(at, at + PAGE_BYTES);
    const ok =
      page.length === PAGE_BYTES &&
      pageChecksum(p, page.subarray(PAGE_CHECKSUM_BYTES)).equals(page.subarray(0, PAGE_CHECKSUM_BYTES));
    if (ok) page.copy(body, start, PAGE_CHECKSUM_BYTES, PAGE_CHECKSUM_BYTES + len);
    else {
      body.fill(0xff, start, start + len);
      badPages.push(p);
    }
  }
  bits.loadBytes(body);
  return { header, bits, badPages };
}

export interface LoadedBitmap {
  readonly file: BitmapFile;
  readonly header: BitmapFileHeader;
  /** Pages that failed their checksum and were loaded as all-dirty. */
  readonly repairedPages: number;
}

export class BitmapFile {
  readonly path: string;
  readonly bits: DirtyBitmap;
  #fd: number;
  #header: BitmapFileHeader;
  /** Pages changed in memory and not yet handed to a commit. */
  #next = new Set<number>();
  #nextBatch: Deferred | null = null;
  /** Page -> the batch that will make its latest change durable (until it has). */
  readonly #pending = new Map<number, Promise<void>>();
  #running: Promise<void> | null = null;
  #failed: BlockError | null = null;
  /** Completed fdatasyncs of bitmap pages (tests check group commit with it). */
  syncs = 0;
  /** Marks are durable before writes: a crash never makes a sidecar bitmap inconsistent. */
  readonly inconsistent = false;

  private constructor(filePath: string, fd: number, header: BitmapFileHeader, bits: DirtyBitmap) {
    this.path = filePath;
    this.#fd = fd;
    this.#header = header;
    this.bits = bits;
  }

  /** Creates (or replaces) the file for `bits`, durably, and opens it. */
  static create(image: string, header: BitmapFileHeader, bits: DirtyBitmap): BitmapFile {
    const file = bitmapFilePath(image, header.name);
    const dir = path.dirname(file);
    if (!fs.existsSync(dir)) {
      fs.mkdirSync(dir, { mode: 0o755 });
      fsyncDir(path.dirname(dir));
    }
    const tmp = `${file}.tmp`;
    const fd = fs.openSync(tmp, "w+", 0o644);
    try {
      const head = Buffer.alloc(PAGES_OFFSET);
      encodeHeader(header).copy(head);
      const pages: Buffer[] = [head];
      for (let p = 0; p < pageCount(bits); p++) pages.push(encodePage(bits, p));
      fs.writevSync(fd, pages, 0);
      fs.fdatasyncSync(fd);
    } catch (err) {
      fs.closeSync(fd);
      fs.rmSync(tmp, { force: true });
      throw toBlockError(err);
    }
    fs.renameSync(tmp, file);
    fsyncDir(dir);
    return new BitmapFile(file, fd, header, bits);
  }

  /** Opens an existing file; torn pages load as all-dirty and are rewritten. */
  static load(filePath: string): LoadedBitmap {
    const fd = fs.openSync(filePath, "r+");
    try {
      const { header, bits, badPages } = decodeBitmapFile(fs.readFileSync(fd));
      const file = new BitmapFile(filePath, fd, header, bits);
      for (const p of badPages) file.#next.add(p);
      return { file, header, repairedPages: badPages.length };
    } catch (err) {
      fs.closeSync(fd);
      throw toBlockError(err);
    }
  }

  /** The bitmap files next to `image`. */
  static list(image: string): string[] {
    const dir = path.resolve(image) + SIDECAR_SUFFIX;
    let names: string[];
    try {
      names = fs.readdirSync(dir);
    } catch {
      return [];
    }
    return names.filter((n) => n.endsWith(FILE_SUFFIX)).map((n) => path.join(dir, n));
  }

  get header(): BitmapFileHeader {
    return this.#header;
  }

  /** The error that stopped this file from recording, if any. */
  get failed(): BlockError | null {
    return this.#failed;
  }

  /** The pages holding clusters [first, end). */
  #pagesOf(first: number, end: number): [number, number] {
    if (end <= first) return [0, 0];
    return [Math.floor((first >> 3) / PAGE_BITS_BYTES), Math.floor(((end - 1) >> 3) / PAGE_BITS_BYTES) + 1];
  }

  /**
   * Schedules the pages of clusters [first, end) (changed in `bits`) for the next commit; resolves
   * when they are durable. Concurrent callers share one write and one fdatasync.
   */
  changed(first: number, end: number): Promise<void> {
    if (this.#failed) return Promise.reject(this.#failed);
    const [p0, p1] = this.#pagesOf(first, end);
    const batch = (this.#nextBatch ??= deferred());
    for (let p = p0; p < p1; p++) {
      this.#next.add(p);
      this.#pending.set(p, batch.promise);
    }
    this.#running ??= this.#commitLoop();
    return batch.promise;
  }

  /** Resolves when the pages of clusters [first, end) are durable; null when they already are. */
  durable(first: number, end: number): Promise<void> | null {
    // Pages of a failed batch stay pending (their promise rejects): only those writes fail.
    if (this.#pending.size === 0) return null;
    const [p0, p1] = this.#pagesOf(first, end);
    let wait: Promise<void>[] | null = null;
    for (let p = p0; p < p1; p++) {
      const b = this.#pending.get(p);
      if (b) (wait ??= []).push(b);
    }
    if (!wait) return null;
    return wait.length === 1 ? wait[0] : Promise.all(wait).then(() => undefined);
  }

  /** Every page change so far, durable. */
  async flush(): Promise<void> {
    if (this.#next.size > 0) this.#running ??= this.#commitLoop();
    while (this.#running) await this.#running;
    if (this.#failed) throw this.#failed;
  }

  async #commitLoop(): Promise<void> {
    try {
      while (this.#next.size > 0 && !this.#failed) {
        const pages = [...this.#next].sort((a, b) => a - b);
        const batch = (this.#nextBatch ??= deferred());
        this.#next = new Set();
        this.#nextBatch = null;
        try {
          // The page images are taken now: bits set from here on go to the next batch.
          for (const p of pages) {
            const page = encodePage(this.bits, p);
            await writeAll(this.#fd, page, PAGES_OFFSET + p * PAGE_BYTES);
          }
          await fdatasyncAsync(this.#fd);
          this.syncs++;
          for (const p of pages) if (this.#pending.get(p) === batch.promise) this.#pending.delete(p);
          batch.resolve();
        } catch (err) {
          this.#failed = new BlockError(
            "EIO",
            `dirty bitmap file ${this.path} cannot be written: ${toBlockError(err).message}`,
          );
          batch.reject(this.#failed);
          const later = this.#nextBatch as Deferred | null;
          later?.reject(this.#failed);
          this.#nextBatch = null;
        }
      }
    } finally {
      this.#running = null;
    }
  }

  /** Rewrites the header's recording flag, durably. */
  async setRecording(recording: boolean): Promise<void> {
    if (this.#header.recording === recording) return;
    this.#header = { ...this.#header, recording };
    await writeAll(this.#fd, encodeHeader(this.#header).subarray(0, HEADER_BYTES), 0);
    await fdatasyncAsync(this.#fd);
  }

  /** Flushes what is pending (best effort) and closes. */
  async close(): Promise<void> {
    try {
      await this.flush();
    } finally {
      if (this.#fd >= 0) fs.closeSync(this.#fd);
      this.#fd = -1;
    }
  }

  /** Closes without flushing and deletes the file. */
  async remove(): Promise<void> {
    while (this.#running) await this.#running.catch(() => undefined);
    if (this.#fd >= 0) fs.closeSync(this.#fd);
    this.#fd = -1;
    fs.rmSync(this.path, { force: true });
    try {
      fsyncDir(path.dirname(this.path));
    } catch {
      // The directory sync only hurries the unlink along.
    }
  }
}

function writeAll(fd: number, buf: Buffer, position: number): Promise<void> {
  return new Promise((resolve, reject) => {
    const step = (done: number): void => {
      if (done === buf.length) return resolve();
      fs.write(fd, buf, done, buf.length - done, position + done, (err, n) => {
        if (err) return reject(err);
        if (n === 0) return reject(new BlockError("EIO", "short write to bitmap file"));
        step(done + n);
      });
    };
    step(0);
  });
}
