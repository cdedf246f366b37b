/**
 * Refcounts: the refcount table (held in memory, bounded by QCOW2_REFTABLE_BYTES_MAX), refcount blocks
 * (16-bit entries, in a bounded write-back cache) and cluster allocation.
 *
 * Allocation takes the first cluster with refcount 0 at or after a hint, so clusters freed earlier are
 * reused before the file grows. A range with no refcount block gets one placed at its own first free
 * cluster, where it describes itself; a host offset past the table's reach grows the table: the new
 * table and the blocks it needs go at the end of the file, are written and flushed, then the header
 * points at them (flushed), and only then is the old table freed. So the image on disk is always
 * consistent, whichever write a crash interrupts.
 *
 * Every mutation runs under one mutex: allocation awaits block loads, and two allocations must not
 * hand out the same cluster.
 */
import { BlockError } from "../../../core/errors.js";
import type { BlockDriver } from "../../driver.js";
import { formatError, QCOW2_REFTABLE_BYTES_MAX, readU64, writeU64 } from "./format.js";
import { Mutex } from "./mutex.js";
import { TableCache, type DirtyTable } from "./table-cache.js";

/** The largest refcount a 16-bit entry holds. */
export const REFCOUNT_MAX = 0xffff;

export interface RefcountsOptions {
  readonly child: BlockDriver;
  readonly clusterBits: number;
  readonly tableOffset: number;
  readonly tableClusters: number;
  /** Host bytes the image may reference: the file size at open (grown by allocations). */
  readonly hostLimit: () => number;
  /** The file's size at open: clusters past it that this session never allocated read as zeros. */
  readonly openedFileBytes: number;
  readonly cacheTables: number;
  /** Writes refcount_table_offset and refcount_table_clusters into the header (not flushed). */
  readonly writeHeaderTable: (offset: number, clusters: number) => Promise<void>;
  /** Called when a cluster's refcount drops to 0, so caches forget what it held. */
  readonly onFreed: (offset: number) => void;
}

export class Refcounts {
  readonly #o: RefcountsOptions;
  readonly #clusterBytes: number;
  /** Refcount entries per block. */
  readonly #blockEntries: number;
  readonly #cache: TableCache;
  readonly #mutex = new Mutex();
  #table: Buffer = Buffer.alloc(0);
  #tableOffset: number;
  #tableClusters: number;
  /** Every cluster below this index has a non-zero refcount (or did when last looked at). */
  #freeHint = 0;
  /** One past the highest cluster this session allocated (for the host size bound). */
  #allocatedEnd = 0;

  private constructor(o: RefcountsOptions) {
    this.#o = o;
    this.#clusterBytes = 2 ** o.clusterBits;
    this.#blockEntries = this.#clusterBytes / 2;
    this.#cache = new TableCache(o.child, this.#clusterBytes, o.cacheTables);
    this.#tableOffset = o.tableOffset;
    this.#tableClusters = o.tableClusters;
  }

  /** Loads and checks the refcount table: every block offset is aligned and inside the file. */
  static async open(o: RefcountsOptions): Promise<Refcounts> {
    const r = new Refcounts(o);
    const table = Buffer.alloc(o.tableClusters * r.#clusterBytes);
    await o.child.pread(o.tableOffset, table);
    const limit = o.hostLimit();
    for (let i = 0; i < table.length; i += 8) {
      const off = readU64(table, i);
      if (off === 0) continue;
      if (off % r.#clusterBytes !== 0 || off < r.#clusterBytes || off + r.#clusterBytes > limit) {
        throw formatError(`refcount block offset ${off} (table entry ${i / 8}) is invalid`);
      }
    }
    r.#table = table;
    return r;
  }

  get tableOffset(): number {
    return this.#tableOffset;
  }
  get tableBytes(): number {
    return this.#tableClusters * this.#clusterBytes;
  }
  /** One past the last host byte this session allocated. */
  get allocatedEnd(): number {
    return this.#allocatedEnd * this.#clusterBytes;
  }

  #entries(): number {
    return this.#table.length / 8;
  }

  #blockOffset(tableIndex: number): number {
    return tableIndex < this.#entries() ? readU64(this.#table, tableIndex * 8) : 0;
  }

  /** The refcount of the cluster at host offset `offset`. */
  async get(offset: number): Promise<number> {
    const ci = Math.floor(offset / this.#clusterBytes);
    const blockOff = this.#blockOffset(Math.floor(ci / this.#blockEntries));
    if (blockOff === 0) return 0;
    const block = await this.#cache.get(blockOff);
    return block.readUInt16BE((ci % this.#blockEntries) * 2);
  }

  /** Allocates one cluster (refcount 1 in the cache) and returns its host offset. */
  async allocCluster(): Promise<number> {
    return (await this.allocData()).offset;
  }

  /**
   * Allocates one cluster, and says whether it is *fresh*: past the end of the file as opened and
   * never allocated before in this session, so nothing was ever written there and it reads as zeros
   * (a file reads zeros past its end and in holes). A new data cluster that would be filled with
   * zeros needs only its data written then.
   */
  allocData(): Promise<{ offset: number; fresh: boolean }> {
    return this.#mutex.run(async () => {
      for (;;) {
        const ci = this.#freeHint;
        const ti = Math.floor(ci / this.#blockEntries);
        if (ti >= this.#entries()) {
          await this.#grow(ci);
          continue;
        }
        const blockOff = this.#blockOffset(ti);
        if (blockOff === 0) {
          await this.#newBlock(ti, ci);
          continue;
        }
        const b0 = this.#cache.get(blockOff);
        const block = b0 instanceof Promise ? await b0 : b0;
        let i = ci % this.#blockEntries;
        while (i < this.#blockEntries && block.readUInt16BE(i * 2) !== 0) i++;
        if (i === this.#blockEntries) {
          this.#freeHint = (ti + 1) * this.#blockEntries;
          continue;
        }
        block.writeUInt16BE(1, i * 2);
        this.#cache.markDirty(blockOff, block);
        const found = ti * this.#blockEntries + i;
        const fresh = found >= this.#allocatedEnd && found * this.#clusterBytes >= this.#o.openedFileBytes;
        this.#freeHint = found + 1;
        this.#allocatedEnd = Math.max(this.#allocatedEnd, found + 1);
        return { offset: found * this.#clusterBytes, fresh };
      }
    });
  }

  /**
   * Adds `delta` to the refcount of every cluster that [offset, offset + bytes) touches (compressed
   * data shares clusters, so a range, not a cluster). A refcount that would leave 0..REFCOUNT_MAX
   * means the image is corrupt.
   */
  change(offset: number, bytes: number, delta: number): Promise<void> {
    return this.#mutex.run(async () => {
      const first = Math.floor(offset / this.#clusterBytes);
      const last = Math.floor((offset + bytes - 1) / this.#clusterBytes);
      for (let ci = first; ci <= last; ci++) {
        const blockOff = this.#blockOffset(Math.floor(ci / this.#blockEntries));
        if (blockOff === 0) throw formatError(`cluster at ${ci * this.#clusterBytes} has no refcount block`);
        const block = await this.#cache.get(blockOff);
        const at = (ci % this.#blockEntries) * 2;
        const v = block.readUInt16BE(at) + delta;
        if (v < 0 || v > REFCOUNT_MAX) {
          throw formatError(`refcount of the cluster at ${ci * this.#clusterBytes} would become ${v}`);
        }
        block.writeUInt16BE(v, at);
        this.#cache.markDirty(blockOff, block);
        if (v === 0) {
          this.#freeHint = Math.min(this.#freeHint, ci);
          this.#o.onFreed(ci * this.#clusterBytes);
        }
      }
    });
  }

  /** A refcount block for range `ti`, placed at its own free cluster `ci`, which it marks used. */
  async #newBlock(ti: number, ci: number): Promise<void> {
    const block = Buffer.alloc(this.#clusterBytes);
    block.writeUInt16BE(1, (ci % this.#blockEntries) * 2);
    const offset = ci * this.#clusterBytes;
    const { child } = this.#o;
    // The block is on disk before the table entry that points at it.
    await child.pwrite(offset, [block], {});
    await child.flush();
    const entry = Buffer.alloc(8);
    writeU64(entry, 0, offset);
    await child.pwrite(this.#tableOffset + ti * 8, [entry], {});
    entry.copy(this.#table, ti * 8);
    this.#cache.create(offset, block, false);
    this.#freeHint = ci + 1;
    this.#allocatedEnd = Math.max(this.#allocatedEnd, ci + 1);
  }

  /**
   * Grows the refcount table so that it reaches cluster `ci` and beyond: `ci` is the first cluster
   * of the ranges the table does not cover, so it and everything after it is free.
   */
  async #grow(ci: number): Promise<void> {
    const cb = this.#clusterBytes;
    const be = this.#blockEntries;
    const oldEntries = this.#entries();
    let tableClusters = this.#tableClusters;
    let blocks = 0;
    // The new table and its blocks sit at [ci, ci + tableClusters + blocks); both numbers depend on
    // each other, so iterate to the fixed point (two or three rounds).
    for (;;) {
      const lastRange = Math.floor((ci + tableClusters + blocks - 1) / be);
      const needBlocks = lastRange - Math.floor(ci / be) + 1;
      const needEntries = Math.max(lastRange + 1, oldEntries * 2);
      const needClusters = Math.max(this.#tableClusters, Math.ceil((needEntries * 8) / cb));
      if (needBlocks === blocks && needClusters === tableClusters) break;
      blocks = needBlocks;
      tableClusters = needClusters;
    }
    if (tableClusters * cb > QCOW2_REFTABLE_BYTES_MAX) {
      throw new BlockError(
        "ENOSPC",
        `qcow2: the refcount table would exceed ${QCOW2_REFTABLE_BYTES_MAX} bytes`,
      );
    }
    const table = Buffer.alloc(tableClusters * cb);
    this.#table.copy(table);
    const firstRange = Math.floor(ci / be);
    const used = ci + tableClusters + blocks;
    const { child } = this.#o;
    const newBlocks: Array<[number, Buffer]> = [];
    for (let b = 0; b < blocks; b++) {
      const range = firstRange + b;
      const offset = (ci + tableClusters + b) * cb;
      writeU64(table, range * 8, offset);
      const block = Buffer.alloc(cb);
      for (let k = Math.max(ci, range * be); k < Math.min(used, (range + 1) * be); k++) {
        block.writeUInt16BE(1, (k % be) * 2);
      }
      newBlocks.push([offset, block]);
    }
    for (const [offset, block] of newBlocks) await child.pwrite(offset, [block], {});
    await child.pwrite(ci * cb, [table], {});
    await child.flush();
    await this.#o.writeHeaderTable(ci * cb, tableClusters);
    await child.flush();
    const oldOffset = this.#tableOffset;
    const oldBytes = this.#table.length;
    this.#table = table;
    this.#tableOffset = ci * cb;
    this.#tableClusters = tableClusters;
    for (const [offset, block] of newBlocks) this.#cache.create(offset, block, false);
    this.#allocatedEnd = Math.max(this.#allocatedEnd, used);
    this.#freeHint = used;
    // The header no longer points at the old table (durably): free it now. Under the mutex already.
    for (let off = oldOffset; off < oldOffset + oldBytes; off += cb) {
      const c = off / cb;
      const blockOff = this.#blockOffset(Math.floor(c / be));
      if (blockOff === 0) continue;
      const block = await this.#cache.get(blockOff);
      const at = (c % be) * 2;
      const v = block.readUInt16BE(at);
      if (v > 0) {
        block.writeUInt16BE(v - 1, at);
        this.#cache.markDirty(blockOff, block);
        if (v === 1) this.#freeHint = Math.min(this.#freeHint, c);
      }
    }
  }

  snapshotDirty(): DirtyTable[] {
    return this.#cache.snapshotDirty();
  }

  async writeDirty(tables: readonly DirtyTable[]): Promise<void> {
    for (const t of tables) {
      await this.#o.child.pwrite(t.offset, [t.copy], {});
      this.#cache.written(t);
    }
  }

  get dirtyCount(): number {
    return this.#cache.dirtyCount;
  }

  get overCapacity(): boolean {
    return this.#cache.overCapacity;
  }

  /** Whether host offset `offset` lies in the refcount table (writes must never land there). */
  inTable(offset: number, bytes: number): boolean {
    return offset < this.#tableOffset + this.#table.length && offset + bytes > this.#tableOffset;
  }
}
