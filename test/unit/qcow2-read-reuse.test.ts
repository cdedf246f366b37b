/**
 * A qcow2 read must never return another guest offset's data. A read maps its data clusters and
 * reads them later; a discard meanwhile frees a mapped cluster, and once a flush has dropped its
 * refcount an allocation may reuse it and overwrite it. A gated child holds the read at the child
 * to make that order certain.
 */
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import type { BlockDriver, Extent, WriteFlags, ZeroFlags } from "../../src/block/driver.js";
import { FileDriver } from "../../src/block/drivers/file.js";
import { createQcow2 } from "../../src/block/drivers/qcow2/create.js";
import { Qcow2Driver } from "../../src/block/drivers/qcow2/qcow2.js";
import { tempDir } from "../helpers/run.js";

const CLUSTER = 65536;

/** A pass-through child whose next pread, once armed, waits until `release`. */
class GatedChild implements BlockDriver {
  readonly driverName = "gated";
  readonly #next: BlockDriver;
  #armed = false;
  #open: (() => void) | null = null;
  #heldResolve: (() => void) | null = null;
  /** Resolves once the armed pread is waiting. */
  held: Promise<void> = Promise.resolve();

  constructor(next: BlockDriver) {
    this.#next = next;
  }
  get capabilities() {
    return this.#next.capabilities;
  }
  arm(): void {
    this.#armed = true;
    this.held = new Promise((resolve) => (this.#heldResolve = resolve));
  }
  release(): void {
    this.#open?.();
    this.#open = null;
  }
  size(): number {
    return this.#next.size();
  }
  async pread(offset: number, into: Buffer): Promise<void> {
    if (this.#armed) {
      this.#armed = false;
      await new Promise<void>((resolve) => {
        this.#open = resolve;
        this.#heldResolve!();
      });
    }
    return this.#next.pread(offset, into);
  }
  pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    return this.#next.pwrite(offset, data, flags);
  }
  pwriteZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.#next.pwriteZeroes(offset, length, flags);
  }
  pdiscard(offset: number, length: number): Promise<void> {
    return this.#next.pdiscard(offset, length);
  }
  flush(): Promise<void> {
    return this.#next.flush();
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.#next.blockStatus(offset, length);
  }
  close(): Promise<void> {
    return this.#next.close();
  }
}

test("qcow2: a read racing a discard, a flush and a reuse of its cluster never returns the other offset's data", async (t) => {
  const image = join(tempDir(t, "drivetap-qcow2-reuse-"), "r.qcow2");
  writeFileSync(image, "");
  const f = FileDriver.open(image);
  await createQcow2(f, 16 * CLUSTER, { clusterSize: CLUSTER });
  await f.close();
  const child = new GatedChild(FileDriver.open(image));
  let heldFrees = 0;
  const q = await Qcow2Driver.open(child, {
    backing: null,
    // The flush holds the freed cluster while the read is in flight: let the read finish.
    onFreesWaitForReads: () => {
      heldFrees++;
      child.release();
    },
  });
  t.after(() => q.close());

  await q.pwrite(0, [Buffer.alloc(CLUSTER, 0xaa)], {});
  await q.flush();
  // The read maps guest cluster 0 (its L2 table is cached) and stops at the child.
  child.arm();
  const into = Buffer.alloc(CLUSTER);
  const read = q.pread(0, into);
  await child.held;
  // Meanwhile the guest discards cluster 0, a flush completes (dropping the freed cluster's refcount,
  // unless it waits for the read) and another offset is written into a newly allocated cluster.
  await q.pdiscard(0, CLUSTER);
  await q.flush();
  await q.pwrite(5 * CLUSTER, [Buffer.alloc(CLUSTER, 0xbb)], {});
  child.release();
  await read;
  const seen = [...new Set(into)];
  assert.deepEqual(seen, [0xaa], "the read returns what cluster 0 held when it was mapped");
  assert.equal(heldFrees, 1, "the flush waited for the read once");
  const other = Buffer.alloc(CLUSTER);
  await q.pread(5 * CLUSTER, other);
  assert.ok(
    other.every((b) => b === 0xbb),
    "the other offset holds its own data",
  );
});
