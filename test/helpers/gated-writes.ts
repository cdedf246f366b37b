/**
 * A filter over a memory disk that holds the writes, write-zeroes and discards its `gate` selects until
 * the test releases them, and records every one that reached it: for tests that must stop a request
 * half-way (in the driver) and look at what else could happen meanwhile.
 */
import type { WriteFlags, ZeroFlags } from "../../src/block/driver.js";
import { MemoryDriver } from "../../src/block/drivers/memory.js";
import { FilterDriver } from "../../src/block/filters/filter.js";

export interface HeldWrite {
  readonly offset: number;
  readonly length: number;
  release(): void;
}

export class GatedWrites extends FilterDriver {
  gate: (offset: number, length: number) => boolean = () => false;
  readonly held: HeldWrite[] = [];
  /** Every write that reached the driver, held or not, in arrival order. */
  readonly entered: Array<{ offset: number; length: number }> = [];
  readonly memory: MemoryDriver;
  #arrived: Array<() => void> = [];

  constructor(sizeBytes: number) {
    const memory = new MemoryDriver(sizeBytes);
    super("gated", memory);
    this.memory = memory;
  }

  /** Resolves once `count` writes are held. */
  async heldCount(count: number): Promise<void> {
    while (this.held.length < count) await new Promise<void>((resolve) => this.#arrived.push(resolve));
  }

  async #enter(offset: number, length: number): Promise<void> {
    this.entered.push({ offset, length });
    if (!this.gate(offset, length)) return;
    await new Promise<void>((release) => {
      this.held.push({ offset, length, release });
      const waiters = this.#arrived;
      this.#arrived = [];
      for (const w of waiters) w();
    });
  }

  override async pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    let length = 0;
    for (const b of data) length += b.length;
    await this.#enter(offset, length);
    return super.pwrite(offset, data, flags);
  }

  override async pwriteZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    await this.#enter(offset, length);
    return super.pwriteZeroes(offset, length, flags);
  }

  override async pdiscard(offset: number, length: number): Promise<void> {
    await this.#enter(offset, length);
    return super.pdiscard(offset, length);
  }
}
