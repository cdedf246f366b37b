/**
 * A bounded write-back cache of cluster-sized metadata tables (L2 tables, refcount blocks), keyed by
 * host offset. Lookups that hit cost a Map access; concurrent misses of one table share one read.
 *
 * Callers never hold a table across an await: the table may be evicted meanwhile. Dirty tables are
 * never evicted; the owner writes them back in the order crash safety needs (qcow2.ts, `flush`), and
 * `snapshotDirty` hands it copies, so a table changed during its write-back stays dirty.
 */
import type { BlockDriver } from "../../driver.js";

interface Entry {
  readonly table: Buffer;
  /** Bumped on every change; write-back clears `dirty` only if nothing changed since its copy. */
  generation: number;
  dirty: boolean;
}

export interface DirtyTable {
  readonly offset: number;
  readonly copy: Buffer;
  readonly generation: number;
}

export class TableCache {
  readonly #child: BlockDriver;
  readonly #tableBytes: number;
  readonly #capacity: number;
  /** Insertion order is recency order: a hit moves the entry to the end. */
  readonly #entries = new Map<number, Entry>();
  readonly #loading = new Map<number, Promise<Buffer>>();
  /** Checks a freshly read table before it is used (hostile images). */
  readonly #validate: (offset: number, table: Buffer) => void;

  constructor(
    child: BlockDriver,
    tableBytes: number,
    capacity: number,
    validate: (offset: number, table: Buffer) => void = () => {},
  ) {
    this.#child = child;
    this.#tableBytes = tableBytes;
    this.#capacity = capacity;
    this.#validate = validate;
  }

  /** The table if cached (and marks it recently used), else undefined. */
  peek(offset: number): Buffer | undefined {
    const e = this.#entries.get(offset);
    if (!e) return undefined;
    this.#entries.delete(offset);
    this.#entries.set(offset, e);
    return e.table;
  }

  get(offset: number): Buffer | Promise<Buffer> {
    return this.peek(offset) ?? this.#load(offset);
  }

  #load(offset: number): Promise<Buffer> {
    let p = this.#loading.get(offset);
    if (!p) {
      p = (async () => {
        const table = Buffer.alloc(this.#tableBytes);
        try {
          await this.#child.pread(offset, table);
          this.#validate(offset, table);
        } finally {
          this.#loading.delete(offset);
        }
        // A table created meanwhile (a new one at a reused offset) wins over what the disk held.
        const existing = this.#entries.get(offset);
        if (existing) return existing.table;
        this.#insert(offset, { table, generation: 0, dirty: false });
        return table;
      })();
      this.#loading.set(offset, p);
    }
    return p;
  }

  /** Puts a new table (its content given) into the cache, dirty unless it is already on disk. */
  create(offset: number, table: Buffer, dirty = true): Buffer {
    const e = this.#entries.get(offset);
    if (e) {
      table.copy(e.table);
      if (dirty) this.markDirty(offset, e.table);
      return e.table;
    }
    this.#insert(offset, { table, generation: 1, dirty });
    return table;
  }

  /**
   * Records a change the caller made to `table` (got from this cache, with no await since). If the
   * table was evicted meanwhile (a full cache evicts even a fresh clean table), it goes back in.
   */
  markDirty(offset: number, table: Buffer): void {
    const e = this.#entries.get(offset);
    if (!e || e.table !== table) {
      this.#entries.set(offset, { table, generation: (e?.generation ?? 0) + 1, dirty: true });
      return;
    }
    e.generation++;
    e.dirty = true;
  }

  /** Copies of the dirty tables, in offset order. */
  snapshotDirty(): DirtyTable[] {
    const out: DirtyTable[] = [];
    for (const [offset, e] of this.#entries) {
      if (e.dirty) out.push({ offset, copy: Buffer.from(e.table), generation: e.generation });
    }
    return out.sort((a, b) => a.offset - b.offset);
  }

  /** A copy written: the table is clean unless it changed after the copy. */
  written(t: DirtyTable): void {
    const e = this.#entries.get(t.offset);
    if (e && e.generation === t.generation) e.dirty = false;
    this.#trim();
  }

  get dirtyCount(): number {
    let n = 0;
    for (const e of this.#entries.values()) if (e.dirty) n++;
    return n;
  }

  /** Whether the cache holds more than its bound because every table over it is dirty. */
  get overCapacity(): boolean {
    return this.#entries.size > this.#capacity;
  }

  /** Forgets a table (its cluster was freed): a later reuse of the offset must not see it. */
  drop(offset: number): void {
    this.#entries.delete(offset);
  }

  #insert(offset: number, e: Entry): void {
    this.#entries.set(offset, e);
    this.#trim();
  }

  /** Evicts clean tables, least recently used first, down to the bound. */
  #trim(): void {
    if (this.#entries.size <= this.#capacity) return;
    let left = this.#entries.size - 1; // never the newest: its caller is about to use it
    for (const [offset, e] of this.#entries) {
      if (this.#entries.size <= this.#capacity || left-- === 0) break;
      if (!e.dirty) this.#entries.delete(offset);
    }
  }
}
