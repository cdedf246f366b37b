/**
 * The qcow2 format driver over a child driver (the image file's): every metadata and data byte goes
 * through the child's pread/pwrite/flush, so it works over any child (file, memory, NBD).
 *
 * Guest clusters map through the L1 table (in memory) to L2 tables (a bounded write-back cache). A
 * write to an allocated cluster whose COPIED flag is set goes in place; any other write allocates a
 * new cluster, filling the part it does not cover from the old content (the backing image, a
 * compressed or shared cluster, or zeros) and then points the L2 entry at it.
 *
 * Crash safety comes from write order, as in QEMU. L2 and refcount changes stay in the caches until
 * a flush (or a full cache) writes them back: refcount blocks first, then a child flush (so every
 * data cluster and refcount is durable), then the L2 tables, a flush, then the L1 entries and a
 * flush. Copies of the dirty tables are taken before the first write of that sequence, so a table
 * written references only clusters whose data and refcount the flush before it made durable. Freed
 * clusters are only decremented after the write-back that removed their last reference, so a crash
 * can leak clusters but never leave an entry pointing at a cluster reused for something else. The
 * dirty bit is set (and flushed) before the first metadata change of a session and cleared on close.
 */
import { inflateRaw } from "node:zlib";
import { promisify } from "node:util";
import { BlockError, toBlockError } from "../../../core/errors.js";
import { MiB } from "../../../core/units.js";
import type { BlockDriver, DriverCapabilities, Extent, WriteFlags, ZeroFlags } from "../../driver.js";
import { Qcow2Bitmaps, type Qcow2BitmapHost } from "./bitmaps.js";
import { withBackingName, type BackingName } from "./backing-header.js";
import { repairLazyRefcounts, type RepairSummary } from "./check.js";
import { ClusterLocks } from "./cluster-locks.js";
import {
  compressedExtent,
  entryOffset,
  formatError,
  parseHeader,
  QCOW2_CLUSTER_BITS_MAX,
  QCOW2_CLUSTER_BITS_MIN,
  QCOW2_COMPAT_LAZY_REFCOUNTS,
  QCOW2_INCOMPAT_CORRUPT,
  QCOW2_INCOMPAT_DIRTY,
  QCOW_OFLAG_COMPRESSED_HI,
  QCOW_OFLAG_COPIED_HI,
  QCOW_OFLAG_ZERO,
  type Qcow2Header,
  writeU64,
} from "./format.js";
import { Mutex } from "./mutex.js";
import { Refcounts } from "./refcounts.js";
import { TableCache } from "./table-cache.js";

const inflateRawAsync = promisify(inflateRaw);
const DONE: Promise<void> = Promise.resolve();

/** Bytes of L2 tables kept in memory (QEMU's default is 1 MiB; 4 MiB maps 32 GiB of 64 KiB clusters). */
export const QCOW2_L2_CACHE_BYTES = 4 * MiB;
/** Refcount block bytes kept in memory. */
export const QCOW2_REFCOUNT_CACHE_BYTES = 1 * MiB;
/** Each cache holds at least this many tables, whatever the cluster size. */
export const QCOW2_CACHE_TABLES_MIN = 8;
/** Freed clusters waiting for a write-back before their refcounts drop; past this, write back now. */
export const QCOW2_PENDING_FREES_MAX = 4096;
/** Block status stops after this many extents; the caller asks again for the rest. */
export const QCOW2_EXTENTS_MAX = 1024;
/** The header is read in two steps: this much first, then the whole first cluster. */
const HEADER_PROBE_BYTES = 512;

export interface Qcow2OpenOptions {
  readonly readOnly?: boolean;
  /** The backing image's driver, or null for none (whatever the header names). */
  readonly backing?: BlockDriver | null;
  /** Close the file (and backing) driver on close; false when they belong to other nodes. */
  readonly ownsFile?: boolean;
  readonly ownsBacking?: boolean;
  /** L2 cache size in bytes (tests make it tiny to exercise eviction). */
  readonly l2CacheBytes?: number;
  /** Told what the repair of a crash-dirty image with lazy refcounts found (the caller logs it). */
  readonly onRepair?: (summary: RepairSummary) => void;
  /** Called when a write-back holds freed clusters until reads in flight are done (tests watch it). */
  readonly onFreesWaitForReads?: () => void;
}

const enum Kind {
  Unallocated,
  Zero,
  Data,
  Compressed,
}

interface Mapping {
  readonly kind: Kind;
  /** Data: cluster offset; Zero: 0 or the cluster kept allocated; Compressed: byte offset. */
  readonly host: number;
  readonly copied: boolean;
  /** Compressed: bytes to read. */
  readonly bytes: number;
}

const UNALLOCATED: Mapping = { kind: Kind.Unallocated, host: 0, copied: false, bytes: 0 };

export class Qcow2Driver implements BlockDriver {
  readonly driverName = "qcow2";
  readonly file: BlockDriver;
  /** Replaced (not mutated) by changeBacking, which rewrites the backing name. */
  header: Qcow2Header;
  /** Changed only by changeBacking, with the node drained. */
  backing: BlockDriver | null;
  readonly readOnly: boolean;
  readonly ownsFile: boolean;
  readonly capabilities: DriverCapabilities;
  #ownsBacking: boolean;
  readonly #cb: number;
  readonly #l2Entries: number;
  readonly #l1: Buffer;
  readonly #l1Dirty = new Set<number>();
  readonly #l2: TableCache;
  /** Set right after construction: the refcounts need the driver's host bound. */
  #refs: Refcounts | null = null;
  readonly #fileBytes: number;
  readonly #locks = new ClusterLocks();
  readonly #l2Alloc = new Map<number, Promise<number>>();
  readonly #flushMutex = new Mutex();
  /** Header writes (features, refcount table, bitmaps extension) run one at a time. */
  readonly #headerMutex = new Mutex();
  #bitmaps: Qcow2Bitmaps | null = null;
  #pendingFrees: Array<[number, number]> = [];
  /**
   * Reads in flight, by the epoch they started in. A read maps its clusters first and reads them
   * later: a discard meanwhile may free a cluster it mapped, and once the cluster's refcount drops an
   * allocation may reuse it for another offset. So a write-back drops freed refcounts only after
   * every read that started before it has ended: it never returns another offset's data.
   */
  #readEpoch = 0;
  readonly #readsByEpoch = new Map<number, number>();
  #readsWaiter: { readonly cut: number; readonly resolve: () => void } | null = null;
  readonly #onFreesWaitForReads: (() => void) | undefined;
  #dirtyMarked: Promise<void> | null = null;
  #incompatible: number;
  readonly #zeros: Buffer;
  #closed = false;

  private constructor(
    file: BlockDriver,
    header: Qcow2Header,
    l1: Buffer,
    fileBytes: number,
    o: Qcow2OpenOptions,
  ) {
    this.#onFreesWaitForReads = o.onFreesWaitForReads;
    this.file = file;
    this.header = header;
    this.backing = o.backing ?? null;
    this.readOnly = o.readOnly ?? false;
    this.ownsFile = o.ownsFile ?? true;
    this.#ownsBacking = o.ownsBacking ?? true;
    this.#cb = header.clusterBytes;
    this.#l2Entries = header.clusterBytes / 8;
    this.#l1 = l1;
    this.#fileBytes = fileBytes;
    this.#incompatible = header.incompatible;
    // A writable open of an image a crash left dirty (eager refcounts: nothing to repair) owns the
    // bit from the start: a clean close clears it even if this session changes no metadata.
    if (!(o.readOnly ?? false) && header.incompatible & QCOW2_INCOMPAT_DIRTY) {
      this.#dirtyMarked = Promise.resolve();
    }
    this.#zeros = Buffer.alloc(header.clusterBytes);
    const l2Tables = Math.max(
      QCOW2_CACHE_TABLES_MIN,
      Math.floor((o.l2CacheBytes ?? QCOW2_L2_CACHE_BYTES) / this.#cb),
    );
    this.#l2 = new TableCache(file, this.#cb, l2Tables);
    const v3 = header.version === 3;
    // v2 has no zero flag: zeroes are written as data by the node, and a discard where a backing
    // image shows through cannot promise zeros.
    this.capabilities = {
      zeroes: v3 ? "native" : "emulate",
      fua: "emulate",
      discard: true,
      discardZeroes: v3,
      blockStatus: true,
    };
  }

  /** Reads and checks the header (from the whole first cluster) of the image in `file`. */
  static async #readHeader(
    file: BlockDriver,
    fileBytes: number,
  ): Promise<{ header: Qcow2Header; first: Buffer }> {
    const probe = Buffer.alloc(Math.min(HEADER_PROBE_BYTES, fileBytes));
    await file.pread(0, probe);
    // The header, its extensions and the backing file name all lie in cluster 0: read it whole
    // (parseHeader refuses an out-of-range cluster size before anything is trusted).
    const bits = probe.length >= 24 ? probe.readUInt32BE(20) : 0;
    const inRange = bits >= QCOW2_CLUSTER_BITS_MIN && bits <= QCOW2_CLUSTER_BITS_MAX;
    const first = inRange ? Buffer.alloc(Math.min(2 ** bits, fileBytes)) : probe;
    if (inRange) await file.pread(0, first);
    return { header: parseHeader(first, fileBytes), first };
  }

  /**
   * Reads and checks the header, the L1 table and the refcount table of the image in `file`. A
   * writable open of an image a crash left dirty with lazy refcounts repairs it first (check.ts).
   */
  static async open(file: BlockDriver, o: Qcow2OpenOptions = {}): Promise<Qcow2Driver> {
    let fileBytes = file.size();
    let { header, first } = await Qcow2Driver.#readHeader(file, fileBytes);
    const readOnly = o.readOnly ?? false;
    if (!readOnly && header.incompatible & QCOW2_INCOMPAT_CORRUPT) {
      throw new BlockError(
        "EPERM",
        "qcow2: the image is marked corrupt; open it read-only, or repair it with 'qemu-img check -r all'",
      );
    }
    if (
      !readOnly &&
      header.incompatible & QCOW2_INCOMPAT_DIRTY &&
      header.compatible & QCOW2_COMPAT_LAZY_REFCOUNTS
    ) {
      // Lazy refcounts may be behind the L2 tables after a crash: allocating from them could reuse a
      // cluster still in use. The repair rebuilds them (the file grows by the new structure).
      const summary = await repairLazyRefcounts(file, header, first);
      o.onRepair?.(summary);
      fileBytes = summary.fileBytes;
      ({ header, first } = await Qcow2Driver.#readHeader(file, fileBytes));
    }
    const l1 = Buffer.alloc(header.l1Entries * 8);
    if (l1.length > 0) await file.pread(header.l1Offset, l1);
    const driver = new Qcow2Driver(file, header, l1, fileBytes, o);
    const refs = await Refcounts.open({
      child: file,
      clusterBits: header.clusterBits,
      tableOffset: header.refcountTableOffset,
      tableClusters: header.refcountTableClusters,
      hostLimit: () => driver.#hostLimit(),
      openedFileBytes: fileBytes,
      cacheTables: Math.max(
        QCOW2_CACHE_TABLES_MIN,
        Math.floor(QCOW2_REFCOUNT_CACHE_BYTES / header.clusterBytes),
      ),
      writeHeaderTable: (offset, clusters) =>
        driver.#headerMutex.run(async () => {
          const b = Buffer.alloc(12);
          writeU64(b, 0, offset);
          b.writeUInt32BE(clusters, 8);
          await file.pwrite(48, [b], {});
        }),
      onFreed: (offset) => driver.#l2.drop(offset),
    });
    driver.#refs = refs;
    driver.#bitmaps = await Qcow2Bitmaps.open(driver.#bitmapHost());
    return driver;
  }

  /** The image's persistent dirty bitmaps (bitmaps.ts). */
  get bitmaps(): Qcow2Bitmaps {
    return this.#bitmaps!;
  }

  /** What bitmaps.ts may do to the image: allocate, free, write back, edit the header. */
  #bitmapHost(): Qcow2BitmapHost {
    const current = (): Qcow2Header => this.header;
    return {
      file: this.file,
      // A getter: changeBacking replaces the header, and a later store must keep the new name.
      get header(): Qcow2Header {
        return current();
      },
      readOnly: this.readOnly,
      hostLimit: () => this.#hostLimit(),
      allocCluster: () => this.#r.allocCluster(),
      free: (offset, bytes) => this.#r.change(offset, bytes, -1),
      writeback: () => this.#writeback(),
      markDirty: () => this.#markDirty(),
      updateHeader: (edit) =>
        this.#headerMutex.run(async () => {
          const c0 = Buffer.alloc(Math.min(this.#cb, this.#hostLimit()));
          await this.file.pread(0, c0);
          const bytes = edit(c0);
          await this.file.pwrite(0, [c0.subarray(0, bytes)], {});
          await this.file.flush();
        }),
    };
  }

  get #r(): Refcounts {
    return this.#refs!;
  }

  size(): number {
    return this.header.sizeBytes;
  }

  /** Host bytes an entry may point into: the file as opened plus what this session allocated. */
  #hostLimit(): number {
    return Math.max(this.#fileBytes, this.#refs?.allocatedEnd ?? 0);
  }

  // ---- mapping lookups ----

  /** The L2 table offset for L1 index i, and whether it is COPIED; checked against the file. */
  #l1Entry(i: number): { offset: number; copied: boolean } {
    const hi = this.#l1.readUInt32BE(i * 8);
    const lo = this.#l1.readUInt32BE(i * 8 + 4);
    const offset = entryOffset(hi, lo);
    if (offset !== 0 && (offset % this.#cb !== 0 || offset + this.#cb > this.#hostLimit())) {
      throw formatError(`L2 table offset ${offset} (L1 entry ${i}) is invalid`);
    }
    return { offset, copied: (hi & QCOW_OFLAG_COPIED_HI) !== 0 };
  }

  #decode(hi: number, lo: number): Mapping {
    if (hi & QCOW_OFLAG_COMPRESSED_HI) {
      const { offset, bytes } = compressedExtent(hi, lo, this.header.clusterBits);
      if (offset >= this.#hostLimit() || offset < this.#cb)
        throw formatError(`compressed cluster offset ${offset} is invalid`);
      return { kind: Kind.Compressed, host: offset, copied: false, bytes };
    }
    const host = entryOffset(hi, lo);
    const copied = (hi & QCOW_OFLAG_COPIED_HI) !== 0;
    if (host !== 0 && (host % this.#cb !== 0 || host >= this.#hostLimit() || host < this.#cb)) {
      throw formatError(`data cluster offset ${host} is invalid`);
    }
    if (this.header.version === 3 && lo & QCOW_OFLAG_ZERO) return { kind: Kind.Zero, host, copied, bytes: 0 };
    if (host === 0) return UNALLOCATED;
    return { kind: Kind.Data, host, copied, bytes: 0 };
  }

  /** The mapping of guest cluster ci if its L2 table is cached (or absent), else a promise of it. */
  #mapping(ci: number): Mapping | Promise<Mapping> {
    const l1i = Math.floor(ci / this.#l2Entries);
    const { offset } = this.#l1Entry(l1i);
    if (offset === 0) return UNALLOCATED;
    const idx = (ci % this.#l2Entries) * 8;
    const table = this.#l2.get(offset);
    if (table instanceof Promise)
      return table.then((t) => this.#decode(t.readUInt32BE(idx), t.readUInt32BE(idx + 4)));
    return this.#decode(table.readUInt32BE(idx), table.readUInt32BE(idx + 4));
  }

  // ---- reads ----

  async pread(offset: number, into: Buffer): Promise<void> {
    const epoch = this.#readEpoch;
    this.#readsByEpoch.set(epoch, (this.#readsByEpoch.get(epoch) ?? 0) + 1);
    try {
      await this.#pread(offset, into);
    } finally {
      const left = this.#readsByEpoch.get(epoch)! - 1;
      if (left > 0) this.#readsByEpoch.set(epoch, left);
      else {
        this.#readsByEpoch.delete(epoch);
        const w = this.#readsWaiter;
        if (w !== null && !this.#readsUpTo(w.cut)) {
          this.#readsWaiter = null;
          w.resolve();
        }
      }
    }
  }

  /** Whether a read that started in epoch `cut` or before is still in flight. */
  #readsUpTo(cut: number): boolean {
    for (const e of this.#readsByEpoch.keys()) if (e <= cut) return true;
    return false;
  }

  /** Waits until every read that started before now has ended (one waiter: the write-back's). */
  #readsStartedBefore(): Promise<void> {
    const cut = this.#readEpoch++;
    if (!this.#readsUpTo(cut)) return Promise.resolve();
    this.#onFreesWaitForReads?.();
    return new Promise((resolve) => (this.#readsWaiter = { cut, resolve }));
  }

  async #pread(offset: number, into: Buffer): Promise<void> {
    const cb = this.#cb;
    const tasks: Promise<void>[] = [];
    // Contiguous data clusters are read with one child request.
    let runHost = -1;
    let runAt = 0;
    let runLen = 0;
    const endRun = (): void => {
      if (runLen > 0) tasks.push(this.file.pread(runHost, into.subarray(runAt, runAt + runLen)));
      runLen = 0;
    };
    try {
      for (const { pos, ci, within, n, done } of clusterSpans(offset, into.length, cb)) {
        const m0 = this.#mapping(ci);
        const m = m0 instanceof Promise ? await whileStarted(tasks, m0) : m0;
        const part = into.subarray(done, done + n);
        if (m.kind === Kind.Data) {
          const host = m.host + within;
          if (runLen > 0 && runHost + runLen === host) runLen += n;
          else {
            endRun();
            runHost = host;
            runAt = done;
            runLen = n;
          }
        } else {
          endRun();
          if (m.kind === Kind.Zero) part.fill(0);
          else if (m.kind === Kind.Unallocated) tasks.push(this.#readBelow(pos, part));
          else tasks.push(this.#readCompressed(m, within, part));
        }
      }
    } catch (err) {
      await endedAll(tasks);
      throw err;
    }
    endRun();
    await settleAll(tasks);
  }

  /** What shows through an unallocated cluster: the backing image, zeros past its end or without one. */
  async #readBelow(pos: number, into: Buffer): Promise<void> {
    const b = this.backing;
    const n = b === null ? 0 : Math.max(0, Math.min(into.length, b.size() - pos));
    if (n > 0) await b!.pread(pos, into.subarray(0, n));
    into.fill(0, n);
  }

  async #readCompressed(m: Mapping, within: number, into: Buffer): Promise<void> {
    const raw = Buffer.alloc(Math.min(m.bytes, this.#hostLimit() - m.host));
    await this.file.pread(m.host, raw);
    let out: Buffer;
    try {
      // The stored length is rounded up to sectors, so the stream may end early or be followed by
      // garbage; more output than a cluster is refused (a bomb in a hostile image).
      out = await inflateRawAsync(raw, { maxOutputLength: this.#cb, finishFlush: 2 /* Z_SYNC_FLUSH */ });
    } catch (err) {
      throw new BlockError(
        "EIO",
        `qcow2: compressed cluster at ${m.host} does not decompress: ${(err as Error).message}`,
      );
    }
    if (out.length < within + into.length) {
      throw new BlockError(
        "EIO",
        `qcow2: compressed cluster at ${m.host} decompresses to ${out.length} bytes`,
      );
    }
    out.copy(into, 0, within, within + into.length);
  }

  // ---- writes ----

  #checkWritable(): void {
    if (this.readOnly) throw new BlockError("EPERM", "qcow2: the image is open read-only");
    if (this.#closed) throw new BlockError("ESHUTDOWN", "qcow2: the image is closed");
  }

  /**
   * Not async: a write inside one cluster that is allocated and COPIED, with its L2 table cached (the
   * steady state of a written disk), takes the lock, finds the host offset and calls the child
   * without a promise or microtask of its own beyond releasing the lock. Everything else takes
   * #pwriteLocked. (ARCHITECTURE.md, "The path of one write", says why `async` layers cost.)
   */
  pwrite(offset: number, data: readonly Buffer[], _flags: WriteFlags): Promise<void> {
    try {
      this.#checkWritable();
    } catch (err) {
      return Promise.reject(err);
    }
    let total = 0;
    for (const b of data) total += b.length;
    if (total === 0) return DONE;
    const cb = this.#cb;
    const first = Math.floor(offset / cb);
    const last = Math.floor((offset + total - 1) / cb);
    const lock = this.#locks.acquire(first, last);
    if (lock instanceof Promise)
      return lock.then((release) => this.#pwriteLocked(offset, data, total, release));
    const host = first === last ? this.#inPlaceHost(first) : -1;
    if (host < 0) return this.#pwriteLocked(offset, data, total, lock);
    return this.#writeData(host + (offset - first * cb), data as Buffer[], total).then(
      () => {
        lock();
        return this.#writebackIfFull();
      },
      (err: unknown) => {
        lock();
        throw err;
      },
    );
  }

  /**
   * Guest cluster ci's host offset if a write may go there in place right now (allocated, COPIED,
   * not a zero cluster, its L2 table cached, the entry valid), else -1: the slow path decides then.
   */
  #inPlaceHost(ci: number): number {
    let l2Offset: number;
    try {
      l2Offset = this.#l1Entry(Math.floor(ci / this.#l2Entries)).offset;
    } catch {
      return -1;
    }
    if (l2Offset === 0) return -1;
    const table = this.#l2.peek(l2Offset);
    if (table === undefined) return -1;
    const idx = (ci % this.#l2Entries) * 8;
    const hi = table.readUInt32BE(idx);
    const lo = table.readUInt32BE(idx + 4);
    if (hi & QCOW_OFLAG_COMPRESSED_HI || !(hi & QCOW_OFLAG_COPIED_HI)) return -1;
    if (this.header.version === 3 && lo & QCOW_OFLAG_ZERO) return -1;
    const host = entryOffset(hi, lo);
    if (host < this.#cb || host % this.#cb !== 0 || host >= this.#hostLimit()) return -1;
    return host;
  }

  async #pwriteLocked(
    offset: number,
    data: readonly Buffer[],
    total: number,
    release: () => void,
  ): Promise<void> {
    const cb = this.#cb;
    try {
      const tasks: Promise<void>[] = [];
      let runHost = -1;
      let runPieces: Buffer[] = [];
      let runLen = 0;
      const endRun = (): void => {
        if (runLen > 0) tasks.push(this.#writeData(runHost, runPieces, runLen));
        runPieces = [];
        runLen = 0;
      };
      try {
        for (const { ci, within, n, done } of clusterSpans(offset, total, cb)) {
          const pieces = sliceIov(data, done, n);
          const m0 = this.#mapping(ci);
          const m = m0 instanceof Promise ? await whileStarted(tasks, m0) : m0;
          if (m.kind === Kind.Data && m.copied) {
            const host = m.host + within;
            if (runLen > 0 && runHost + runLen === host) {
              runPieces.push(...pieces);
              runLen += n;
            } else {
              endRun();
              runHost = host;
              runPieces = pieces;
              runLen = n;
            }
          } else {
            endRun();
            tasks.push(this.#allocWrite(ci, m, within, pieces));
          }
        }
      } catch (err) {
        // The clusters' locks are held until the writes already started have ended.
        await endedAll(tasks);
        throw err;
      }
      endRun();
      await settleAll(tasks);
    } finally {
      release();
    }
    await this.#writebackIfFull();
  }

  /** An in-place write: never into the header, the L1 table or the refcount table. */
  #writeData(host: number, pieces: Buffer[], bytes: number): Promise<void> {
    if (this.#overlapsMetadata(host, bytes)) {
      return Promise.reject(formatError(`a data cluster at ${host} overlaps the image's metadata`));
    }
    return this.file.pwrite(host, pieces, {});
  }

  #overlapsMetadata(host: number, bytes: number): boolean {
    const h = this.header;
    if (host < this.#cb) return true;
    if (host < h.l1Offset + h.l1Entries * 8 && host + bytes > h.l1Offset) return true;
    return this.#r.inTable(host, bytes);
  }

  /**
   * Writes `pieces` at `within` into guest cluster ci through a newly allocated cluster (or the
   * cluster an allocated zero cluster keeps), then points the L2 entry at it. The caller holds ci.
   */
  async #allocWrite(ci: number, m: Mapping, within: number, pieces: Buffer[]): Promise<void> {
    const cb = this.#cb;
    let bytes = 0;
    for (const p of pieces) bytes += p.length;
    const whole = within === 0 && bytes === cb;
    const zeroBelow = !whole && this.#readsZero(ci, m);
    let content: Buffer[] = pieces;
    if (!whole && !zeroBelow) {
      const buf = Buffer.alloc(cb);
      await this.#oldContent(ci, m, buf);
      let at = within;
      for (const p of pieces) at += p.copy(buf, at);
      content = [buf];
    }
    await this.#markDirty();
    const reuse = m.kind === Kind.Zero && m.host !== 0 && m.copied;
    let host: number;
    let at = 0;
    if (reuse) {
      host = m.host;
      if (this.#overlapsMetadata(host, cb))
        throw formatError(`a data cluster at ${host} overlaps the image's metadata`);
    } else {
      const got = await this.#r.allocData();
      host = got.offset;
      // A fresh cluster already reads as zeros: only the data is written, not 64 KiB of padding.
      if (zeroBelow && got.fresh) at = within;
    }
    if (zeroBelow && at === 0) {
      // The rest of the cluster is zeros: the data between two views of the shared zero buffer,
      // written in one pwritev, with no cluster-sized buffer to allocate and fill.
      const tail = cb - within - bytes;
      content = within > 0 ? [this.#zeros.subarray(0, within), ...pieces] : [...pieces];
      if (tail > 0) content.push(this.#zeros.subarray(0, tail));
    }
    await this.file.pwrite(host + at, content, {});
    await this.#setEntry(ci, (QCOW_OFLAG_COPIED_HI | Math.floor(host / 2 ** 32)) >>> 0, host % 2 ** 32);
    if (!reuse) this.#freeOld(m);
  }

  /** The bytes guest cluster ci reads now, for a write that covers only part of it. */
  async #oldContent(ci: number, m: Mapping, into: Buffer): Promise<void> {
    switch (m.kind) {
      case Kind.Zero:
        return;
      case Kind.Unallocated:
        return this.#readBelow(ci * this.#cb, into);
      case Kind.Compressed:
        return this.#readCompressed(m, 0, into);
      case Kind.Data:
        return this.file.pread(m.host, into);
    }
  }

  /** Queues the cluster an entry pointed to for release after the next write-back. */
  #freeOld(m: Mapping): void {
    if (m.kind === Kind.Compressed) this.#pendingFrees.push([m.host, m.bytes]);
    else if (m.host !== 0) this.#pendingFrees.push([m.host, this.#cb]);
  }

  /** Sets guest cluster ci's L2 entry (in the cache), allocating or un-sharing its L2 table first. */
  async #setEntry(ci: number, hi: number, lo: number): Promise<void> {
    const l1i = Math.floor(ci / this.#l2Entries);
    const l2Offset = await this.#ensureL2(l1i);
    const t0 = this.#l2.get(l2Offset);
    const table = t0 instanceof Promise ? await t0 : t0;
    const idx = (ci % this.#l2Entries) * 8;
    table.writeUInt32BE(hi >>> 0, idx);
    table.writeUInt32BE(lo >>> 0, idx + 4);
    this.#l2.markDirty(l2Offset, table);
  }

  /** A writable L2 table for L1 index l1i: allocated if missing, copied if shared (not COPIED). */
  #ensureL2(l1i: number): Promise<number> | number {
    const cur = this.#l1Entry(l1i);
    if (cur.offset !== 0 && cur.copied) return cur.offset;
    let p = this.#l2Alloc.get(l1i);
    if (!p) {
      p = (async () => {
        try {
          await this.#markDirty();
          let content = Buffer.alloc(this.#cb);
          if (cur.offset !== 0) {
            const old = await this.#l2.get(cur.offset);
            content = Buffer.from(old);
            // The copy shares every cluster with the old table: none of them is COPIED any more.
            for (let i = 0; i < content.length; i += 8) {
              content.writeUInt32BE((content.readUInt32BE(i) & ~QCOW_OFLAG_COPIED_HI) >>> 0, i);
            }
          }
          const offset = await this.#r.allocCluster();
          this.#l2.create(offset, content);
          this.#l1.writeUInt32BE((QCOW_OFLAG_COPIED_HI | Math.floor(offset / 2 ** 32)) >>> 0, l1i * 8);
          this.#l1.writeUInt32BE(offset % 2 ** 32, l1i * 8 + 4);
          this.#l1Dirty.add(l1i);
          if (cur.offset !== 0) this.#pendingFrees.push([cur.offset, this.#cb]);
          return offset;
        } finally {
          this.#l2Alloc.delete(l1i);
        }
      })();
      this.#l2Alloc.set(l1i, p);
    }
    return p;
  }

  /** Sets the dirty bit (v3) before the first metadata change of this session; clears unknown autoclear bits. */
  #markDirty(): Promise<void> {
    this.#dirtyMarked ??= this.#headerMutex
      .run(async () => {
        if (this.header.version !== 3) return;
        const b = Buffer.alloc(24);
        this.#incompatible |= QCOW2_INCOMPAT_DIRTY;
        writeU64(b, 0, this.#incompatible);
        writeU64(b, 8, this.header.compatible);
        // Unknown autoclear features describe data this driver does not keep up to date: clearing
        // them tells QEMU to ignore them, as the spec asks. Bitmaps (bit 0) it keeps (bitmaps.ts).
        writeU64(b, 16, this.#bitmaps?.autoclear ?? 0);
        await this.file.pwrite(72, [b], {});
        await this.file.flush();
      })
      .catch((err) => {
        this.#dirtyMarked = null;
        throw err;
      });
    return this.#dirtyMarked;
  }

  // ---- zeroes and discard ----

  async pwriteZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (this.header.version !== 3) throw new BlockError("ENOTSUP", "qcow2 v2 has no zero clusters");
    await this.#zeroRange(offset, length, {
      keep: !flags.mayTrim,
      fast: flags.fastZero ?? false,
      discard: false,
    });
  }

  async pdiscard(offset: number, length: number): Promise<void> {
    if (this.header.version !== 3) {
      // v2: whole clusters become unallocated where nothing shows through; the rest is left alone.
      if (this.backing !== null) return;
      await this.#zeroRange(offset, length, { keep: false, fast: true, discard: true, partial: false });
      return;
    }
    await this.#zeroRange(offset, length, { keep: false, fast: false, discard: true });
  }

  async #zeroRange(
    offset: number,
    length: number,
    how: { keep: boolean; fast: boolean; discard: boolean; partial?: boolean },
  ): Promise<void> {
    this.#checkWritable();
    if (length === 0) return;
    const cb = this.#cb;
    const first = Math.floor(offset / cb);
    const last = Math.floor((offset + length - 1) / cb);
    const lock = this.#locks.acquire(first, last);
    const release = lock instanceof Promise ? await lock : lock;
    try {
      const end = offset + length;
      let pos = offset;
      while (pos < end) {
        const ci = Math.floor(pos / cb);
        const within = pos - ci * cb;
        const n = Math.min(cb - within, end - pos);
        // Without a backing image, a whole unallocated L2 range already reads as zeros: skip it.
        const l1i = Math.floor(ci / this.#l2Entries);
        if (within === 0 && this.backing === null && this.#l1Entry(l1i).offset === 0) {
          const wholeEnd = end % cb === 0 || end === this.size() ? end : Math.floor(end / cb) * cb;
          const skipTo = Math.min((l1i + 1) * this.#l2Entries * cb, wholeEnd);
          if (skipTo > pos) {
            pos = skipTo;
            continue;
          }
        }
        const m0 = this.#mapping(ci);
        const m = m0 instanceof Promise ? await m0 : m0;
        const whole = n === cb || (within === 0 && pos + n === this.size());
        if (whole) await this.#zeroCluster(ci, m, how);
        else if (how.partial !== false && !this.#readsZero(ci, m)) {
          if (how.fast)
            throw new BlockError("ENOTSUP", "qcow2: zeroing part of a cluster needs a data write");
          await this.#allocOrInPlace(ci, m, within, n);
        }
        pos += n;
      }
    } finally {
      release();
    }
    await this.#writebackIfFull();
  }

  /** Writes n zero bytes at `within` in cluster ci: in place if allowed, else through allocation. */
  #allocOrInPlace(ci: number, m: Mapping, within: number, n: number): Promise<void> {
    const pieces = [this.#zeros.subarray(0, n)];
    if (m.kind === Kind.Data && m.copied) return this.#writeData(m.host + within, pieces, n);
    return this.#allocWrite(ci, m, within, pieces);
  }

  #readsZero(ci: number, m: Mapping): boolean {
    if (m.kind === Kind.Zero) return true;
    return m.kind === Kind.Unallocated && (this.backing === null || ci * this.#cb >= this.backing.size());
  }

  async #zeroCluster(ci: number, m: Mapping, how: { keep: boolean; discard: boolean }): Promise<void> {
    const nothingBelow = this.backing === null || ci * this.#cb >= this.backing.size();
    if (m.kind === Kind.Unallocated && nothingBelow) return;
    if (m.kind === Kind.Zero && (how.keep || m.host === 0)) return;
    const keep = how.keep && m.kind === Kind.Data && m.copied;
    await this.#markDirty();
    if (keep) {
      await this.#setEntry(
        ci,
        (QCOW_OFLAG_COPIED_HI | Math.floor(m.host / 2 ** 32)) >>> 0,
        (m.host % 2 ** 32) | QCOW_OFLAG_ZERO,
      );
      return;
    }
    // A discard where nothing shows through leaves the cluster unallocated, as QEMU does; v2 has no
    // zero flag and only gets here when nothing shows through.
    const unallocate = (how.discard && nothingBelow) || this.header.version !== 3;
    await this.#setEntry(ci, 0, unallocate ? 0 : QCOW_OFLAG_ZERO);
    this.#freeOld(m);
  }

  // ---- flush and write-back ----

  /** A write-back when a cache is full of dirty tables or too many frees wait; else nothing. */
  #writebackIfFull(): Promise<void> | undefined {
    if (
      this.#l2.overCapacity ||
      this.#r.overCapacity ||
      this.#pendingFrees.length > QCOW2_PENDING_FREES_MAX
    ) {
      return this.#writeback();
    }
    return undefined;
  }

  /** Writes dirty metadata back in crash-safe order (see the module comment). */
  #writeback(): Promise<void> {
    return this.#flushMutex.run(async () => {
      const frees = this.#pendingFrees;
      this.#pendingFrees = [];
      const refTables = this.#r.snapshotDirty();
      const l2Tables = this.#l2.snapshotDirty();
      const l1Indices = [...this.#l1Dirty].sort((a, b) => a - b);
      const l1Copies = l1Indices.map((i) => Buffer.from(this.#l1.subarray(i * 8, i * 8 + 8)));
      this.#l1Dirty.clear();
      try {
        await this.#r.writeDirty(refTables);
        if (l2Tables.length > 0 || l1Indices.length > 0) {
          await this.file.flush();
          for (const t of l2Tables) {
            await this.file.pwrite(t.offset, [t.copy], {});
            this.#l2.written(t);
          }
        }
        if (l1Indices.length > 0) {
          await this.file.flush();
          for (let k = 0; k < l1Indices.length; k++) {
            await this.file.pwrite(this.header.l1Offset + l1Indices[k] * 8, [l1Copies[k]], {});
          }
        }
        await this.file.flush();
      } catch (err) {
        for (const i of l1Indices) this.#l1Dirty.add(i);
        this.#pendingFrees.unshift(...frees);
        throw toBlockError(err);
      }
      // Nothing on disk references these any more, and once the reads that may have mapped them are
      // done nothing in memory does: their refcounts may drop, and they may be reused.
      if (frees.length > 0) await this.#readsStartedBefore();
      for (const [off, bytes] of frees) await this.#r.change(off, bytes, -1);
    });
  }

  async flush(): Promise<void> {
    if (this.readOnly) return;
    await this.#writeback();
  }

  /** Everything written back (frees too), then the dirty bit cleared: a clean image. */
  async #flushClean(): Promise<void> {
    for (let round = 0; round < 4; round++) {
      await this.#writeback();
      if (this.#pendingFrees.length === 0 && this.#r.dirtyCount === 0 && this.#l2.dirtyCount === 0) break;
    }
    if (this.#dirtyMarked !== null && this.header.version === 3) {
      await this.#dirtyMarked;
      this.#incompatible &= ~QCOW2_INCOMPAT_DIRTY;
      const b = Buffer.alloc(8);
      writeU64(b, 0, this.#incompatible);
      await this.#headerMutex.run(async () => {
        await this.file.pwrite(72, [b], {});
        await this.file.flush();
      });
      this.#dirtyMarked = null;
    }
  }

  // ---- the backing image at runtime ----

  /**
   * Replaces the backing image (block-stream, block-commit, blockdev-snapshot); the caller has drained
   * the node, since requests in flight read through the old one. With `name` (null: none) the header
   * names the new backing too: everything written so far is made durable first, then cluster 0 is
   * rewritten and flushed. A crash before that leaves the old chain, which jobs keep complete until
   * they relink; after it, the new one. The old backing is returned; the caller closes it if `owned`.
   */
  async changeBacking(
    backing: BlockDriver | null,
    o: { readonly owns: boolean; readonly name?: BackingName | null },
  ): Promise<{ old: BlockDriver | null; owned: boolean }> {
    const name = o.name;
    if (name !== undefined) {
      this.#checkWritable();
      await this.#writeback();
      // Cluster 0 is shared with the other header writers (bitmaps, dirty bit, refcount table).
      await this.#flushMutex.run(() =>
        this.#headerMutex.run(async () => {
          const first = Buffer.alloc(Math.min(this.#cb, this.#hostLimit()));
          await this.file.pread(0, first);
          const out = withBackingName(first, this.header.headerBytes, this.#cb, name);
          // The dirty bit as this session holds it (the disk may not have caught up with memory).
          if (this.header.version === 3) writeU64(out, 72, this.#incompatible);
          await this.file.pwrite(0, [out], {});
          await this.file.flush();
        }),
      );
      this.header = { ...this.header, backingFile: name?.file ?? null, backingFormat: name?.format ?? null };
    }
    const old = { old: this.backing, owned: this.#ownsBacking };
    this.backing = backing;
    this.#ownsBacking = o.owns;
    return old;
  }

  /**
   * Whether the clusters from `offset` are allocated in this image itself (data, compressed or zero:
   * each hides the backing image), and for how many bytes that holds, up to `length`. QEMU's
   * bdrv_is_allocated, which stream and commit use to copy only what a layer holds.
   */
  async allocatedHere(offset: number, length: number): Promise<{ allocated: boolean; bytes: number }> {
    const cb = this.#cb;
    const end = Math.min(offset + length, this.size());
    let allocated: boolean | undefined;
    let pos = offset;
    while (pos < end) {
      const m0 = this.#mapping(Math.floor(pos / cb));
      const m = m0 instanceof Promise ? await m0 : m0;
      const here = m.kind !== Kind.Unallocated;
      if (allocated === undefined) allocated = here;
      else if (here !== allocated) break;
      pos = Math.min((Math.floor(pos / cb) + 1) * cb, end);
    }
    return { allocated: allocated ?? false, bytes: pos - offset };
  }

  // ---- block status ----

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const cb = this.#cb;
    const out: Extent[] = [];
    const push = (e: Extent): void => {
      const last = out[out.length - 1];
      const same = last && last.hole === e.hole && last.zero === e.zero && last.backing === e.backing;
      if (same && last.offset + last.length === e.offset) {
        out[out.length - 1] = { ...last, length: last.length + e.length };
      } else out.push(e);
    };
    const end = offset + length;
    let pos = offset;
    while (pos < end && out.length < QCOW2_EXTENTS_MAX) {
      const ci = Math.floor(pos / cb);
      const n = Math.min((ci + 1) * cb, end) - pos;
      const m0 = this.#mapping(ci);
      const m = m0 instanceof Promise ? await m0 : m0;
      if (m.kind === Kind.Data || m.kind === Kind.Compressed)
        push({ offset: pos, length: n, hole: false, zero: false });
      else if (m.kind === Kind.Zero) push({ offset: pos, length: n, hole: true, zero: true });
      else {
        // Unallocated here: the run goes to the backing image's status in one call.
        let runEnd = pos + n;
        while (runEnd < end) {
          const next = this.#mapping(Math.floor(runEnd / cb));
          const nm = next instanceof Promise ? await next : next;
          if (nm.kind !== Kind.Unallocated) break;
          runEnd = Math.min(runEnd + cb, end);
        }
        for (const e of await this.#statusBelow(pos, runEnd - pos)) push(e);
        pos = runEnd;
        continue;
      }
      pos += n;
    }
    return out;
  }

  async #statusBelow(offset: number, length: number): Promise<Extent[]> {
    const b = this.backing;
    const backEnd = b === null ? 0 : Math.min(offset + length, b.size());
    const out: Extent[] = [];
    let pos = offset;
    while (pos < backEnd && out.length < QCOW2_EXTENTS_MAX) {
      const got = await b!.blockStatus(pos, backEnd - pos);
      if (got.length === 0) break;
      for (const e of got) {
        const stop = Math.min(e.offset + e.length, backEnd);
        if (stop <= pos) continue;
        out.push({ offset: pos, length: stop - pos, hole: e.hole, zero: e.zero, backing: true });
        pos = stop;
      }
    }
    // Past the backing image's end (or without one) this layer's unallocated clusters read zeros;
    // they still come from below when there is a backing image (a target sharing it reads the same).
    if (pos < offset + length)
      out.push({ offset: pos, length: offset + length - pos, hole: true, zero: true, backing: b !== null });
    return out;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    try {
      if (!this.readOnly) {
        // The bitmaps go in first (they allocate), then everything is written back clean.
        let stored: unknown;
        await this.#bitmaps?.storeAll().catch((err: unknown) => (stored = err));
        await this.#flushClean();
        if (stored !== undefined) throw stored;
      }
    } finally {
      this.#closed = true;
      if (this.ownsFile) await this.file.close();
      if (this.#ownsBacking && this.backing) await this.backing.close();
    }
  }
}

/** Waits for every task, then throws the first failure (no child request is left running). */
/**
 * Awaits a cluster's mapping while child requests of earlier clusters run: their failures are
 * handled (settleAll or endedAll reports them later), not left as unhandled rejections meanwhile.
 */
function whileStarted<T>(tasks: readonly Promise<void>[], mapping: Promise<T>): Promise<T> {
  for (const p of tasks) p.catch(ignore);
  return mapping;
}

function ignore(): void {}

/** A request failed part-way: the child requests it started end before it reports the failure. */
async function endedAll(tasks: readonly Promise<void>[]): Promise<void> {
  await Promise.allSettled(tasks);
}

async function settleAll(tasks: Promise<void>[]): Promise<void> {
  if (tasks.length === 1) return tasks[0];
  const results = await Promise.allSettled(tasks);
  for (const r of results) if (r.status === "rejected") throw r.reason;
}

/** The clusters that [offset, offset + length) touches: index, start within it, bytes, bytes before. */
function* clusterSpans(
  offset: number,
  length: number,
  clusterBytes: number,
): Generator<{ pos: number; ci: number; within: number; n: number; done: number }> {
  let done = 0;
  while (done < length) {
    const pos = offset + done;
    const ci = Math.floor(pos / clusterBytes);
    const within = pos - ci * clusterBytes;
    const n = Math.min(clusterBytes - within, length - done);
    yield { pos, ci, within, n, done };
    done += n;
  }
}

/** The views of `bytes` bytes starting `skip` bytes into the buffers (no copy). */
function sliceIov(data: readonly Buffer[], skip: number, bytes: number): Buffer[] {
  const out: Buffer[] = [];
  for (const b of data) {
    if (bytes === 0) break;
    if (skip >= b.length) {
      skip -= b.length;
      continue;
    }
    const n = Math.min(b.length - skip, bytes);
    out.push(b.subarray(skip, skip + n));
    bytes -= n;
    skip = 0;
  }
  return out;
}
