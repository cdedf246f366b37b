/**
 * A dirty bitmap: one bit per `granularity` bytes of a disk. Jobs use it to remember what a target
 * missed (stream and mirror) or what is already copied (backup).
 */
import { assert } from "../core/assert.js";

export class DirtyBitmap {
  readonly granularity: number;
  readonly sizeBytes: number;
  readonly #bits: Uint8Array;
  #count = 0;

  constructor(sizeBytes: number, granularity: number) {
    assert(granularity > 0 && (granularity & (granularity - 1)) === 0, "granularity must be a power of two");
    this.granularity = granularity;
    this.sizeBytes = sizeBytes;
    this.#bits = new Uint8Array(Math.ceil(Math.ceil(sizeBytes / granularity) / 8));
  }

  get clusterCount(): number {
    return Math.ceil(this.sizeBytes / this.granularity);
  }

  /** Number of set bits. */
  get count(): number {
    return this.#count;
  }

  /** Bytes covered by set bits (the last cluster may be short). */
  get dirtyBytes(): number {
    let bytes = this.#count * this.granularity;
    const last = this.clusterCount - 1;
    if (this.#count > 0 && this.get(last))
      bytes -= last * this.granularity + this.granularity - this.sizeBytes;
    return bytes;
  }

  get(cluster: number): boolean {
    return (this.#bits[cluster >> 3] & (1 << (cluster & 7))) !== 0;
  }

  #put(cluster: number, value: boolean): void {
    const mask = 1 << (cluster & 7);
    const was = (this.#bits[cluster >> 3] & mask) !== 0;
    if (was === value) return;
    if (value) {
      this.#bits[cluster >> 3] |= mask;
      this.#count++;
    } else {
      this.#bits[cluster >> 3] &= ~mask;
      this.#count--;
    }
  }

  /** The clusters touching [offset, offset + length). */
  clustersOf(offset: number, length: number): [first: number, end: number] {
    if (length <= 0) return [0, 0];
    return [
      Math.floor(offset / this.granularity),
      Math.ceil(Math.min(offset + length, this.sizeBytes) / this.granularity),
    ];
  }

  setRange(offset: number, length: number): void {
    const [first, end] = this.clustersOf(offset, length);
    for (let c = first; c < end; c++) this.#put(c, true);
  }

  clearRange(offset: number, length: number): void {
    const [first, end] = this.clustersOf(offset, length);
    for (let c = first; c < end; c++) this.#put(c, false);
  }

  set(cluster: number): void {
    this.#put(cluster, true);
  }

  clear(cluster: number): void {
    this.#put(cluster, false);
  }

  setAll(): void {
    for (let c = 0; c < this.clusterCount; c++) this.#put(c, true);
  }

  clearAll(): void {
    this.#bits.fill(0);
    this.#count = 0;
  }

  /** The first set cluster at or after `from`, or -1. */
  nextSet(from: number): number {
    if (this.#count === 0) return -1;
    for (let c = from; c < this.clusterCount; c++) {
      if (this.#bits[c >> 3] === 0) {
        c |= 7;
        continue;
      }
      if (this.get(c)) return c;
    }
    return -1;
  }

  /** Byte range of a cluster, clamped to the disk. */
  rangeOf(cluster: number): [offset: number, length: number] {
    const offset = cluster * this.granularity;
    return [offset, Math.min(this.granularity, this.sizeBytes - offset)];
  }
}
