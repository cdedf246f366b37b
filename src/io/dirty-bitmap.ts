/**
 * A dirty bitmap: one bit per `granularity` bytes of a disk. Jobs use it to remember what a target
 * missed (stream and mirror) or what is already copied (backup); named bitmaps (io/named-bitmaps.ts)
 * use it for what changed since a point in time. Bit c is bit (c & 7) of byte (c >> 3), the layout
 * the sidecar file stores.
 */
import { assert } from "../core/assert.js";
import { MiB } from "../core/units.js";

/**
 * Bit bytes one bitmap may take when a disk is resized (32 TiB at the default 64 KiB granularity):
 * a hostile block_resize of a sparse memory disk to 2^53 bytes must not allocate gigabytes.
 */
export const DIRTY_BITMAP_BYTES_MAX = 64 * MiB;

/** The bit bytes a bitmap of `granularity` needs for a disk of `sizeBytes`. */
export function bitmapBytesFor(sizeBytes: number, granularity: number): number {
  return Math.ceil(Math.ceil(sizeBytes / granularity) / 8);
}

export class DirtyBitmap {
  readonly granularity: number;
  #sizeBytes: number;
  #bits: Uint8Array;
  #count = 0;

  constructor(sizeBytes: number, granularity: number) {
    assert(granularity > 0 && (granularity & (granularity - 1)) === 0, "granularity must be a power of two");
    this.granularity = granularity;
    this.#sizeBytes = sizeBytes;
    this.#bits = new Uint8Array(bitmapBytesFor(sizeBytes, granularity));
  }

  get sizeBytes(): number {
    return this.#sizeBytes;
  }

  /**
   * Follows a resized disk, as QEMU's bitmaps do: clusters past a new end are dropped, grown ones
   * start clean (a resize writes no data), and clusters that remain keep their bits.
   */
  resize(sizeBytes: number): void {
    const bits = new Uint8Array(bitmapBytesFor(sizeBytes, this.granularity));
    bits.set(this.#bits.subarray(0, Math.min(bits.length, this.#bits.length)));
    const clusters = Math.ceil(sizeBytes / this.granularity);
    const tail = clusters & 7;
    if (tail !== 0 && bits.length > 0) bits[bits.length - 1] &= (1 << tail) - 1;
    let n = 0;
    for (const b of bits) n += popcount8(b);
    this.#bits = bits;
    this.#sizeBytes = sizeBytes;
    this.#count = n;
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

  /** The first clear cluster at or after `from`, or -1. */
  nextClear(from: number): number {
    for (let c = from; c < this.clusterCount; c++) {
      if (this.#bits[c >> 3] === 0xff) {
        c |= 7;
        continue;
      }
      if (!this.get(c)) return c;
    }
    return -1;
  }

  /** True when any cluster touching [offset, offset + length) is set. */
  anySet(offset: number, length: number): boolean {
    const [first, end] = this.clustersOf(offset, length);
    for (let c = first; c < end; c++) if (this.get(c)) return true;
    return false;
  }

  /** True when every cluster touching [offset, offset + length) is set. */
  allSet(offset: number, length: number): boolean {
    const [first, end] = this.clustersOf(offset, length);
    for (let c = first; c < end; c++) if (!this.get(c)) return false;
    return true;
  }

  /**
   * Sets every cluster that overlaps a set cluster of `other` (same disk size, any granularity).
   * Returns the number of newly set clusters.
   */
  merge(other: DirtyBitmap): number {
    assert(other.sizeBytes === this.sizeBytes, "merged bitmaps must cover the same disk");
    const before = this.#count;
    if (other.granularity === this.granularity) {
      for (let i = 0; i < this.#bits.length; i++) {
        const add = other.#bits[i] & ~this.#bits[i];
        if (add === 0) continue;
        this.#bits[i] |= add;
        this.#count += popcount8(add);
      }
      return this.#count - before;
    }
    for (let c = other.nextSet(0); c >= 0; c = other.nextSet(c + 1)) {
      const [offset, length] = other.rangeOf(c);
      this.setRange(offset, length);
    }
    return this.#count - before;
  }

  /** A copy with the same bits. */
  clone(): DirtyBitmap {
    const copy = new DirtyBitmap(this.sizeBytes, this.granularity);
    copy.#bits.set(this.#bits);
    copy.#count = this.#count;
    return copy;
  }

  /** Replaces every bit with `other`'s (same size and granularity). */
  copyFrom(other: DirtyBitmap): void {
    assert(
      other.sizeBytes === this.sizeBytes && other.granularity === this.granularity,
      "copyFrom needs the same geometry",
    );
    this.#bits.set(other.#bits);
    this.#count = other.#count;
  }

  /** The bit bytes (persistence reads them; callers must not write). */
  get bytes(): Uint8Array {
    return this.#bits;
  }

  /** Loads bit bytes written by `bytes` (bits past the last cluster are ignored). */
  loadBytes(src: Uint8Array, at = 0): void {
    this.#bits.set(src.subarray(0, Math.min(src.length, this.#bits.length - at)), at);
    const tail = this.clusterCount & 7;
    if (tail !== 0 && this.#bits.length > 0) this.#bits[this.#bits.length - 1] &= (1 << tail) - 1;
    let n = 0;
    for (const b of this.#bits) n += popcount8(b);
    this.#count = n;
  }

  /**
   * Runs of equal state from offset, clamped to offset + length and the disk: the first run starts at
   * offset, each later one at a cluster boundary.
   */
  extents(offset: number, length: number): Array<{ length: number; dirty: boolean }> {
    const end = Math.min(offset + length, this.sizeBytes);
    const out: Array<{ length: number; dirty: boolean }> = [];
    let pos = offset;
    while (pos < end) {
      const c = Math.floor(pos / this.granularity);
      const dirty = this.get(c);
      const next = dirty ? this.nextClear(c) : this.nextSet(c);
      const runEnd = next < 0 ? end : Math.min(end, next * this.granularity);
      out.push({ length: runEnd - pos, dirty });
      pos = runEnd;
    }
    return out;
  }

  /** Byte range of a cluster, clamped to the disk. */
  rangeOf(cluster: number): [offset: number, length: number] {
    const offset = cluster * this.granularity;
    return [offset, Math.min(this.granularity, this.sizeBytes - offset)];
  }
}

function popcount8(b: number): number {
  b = b - ((b >> 1) & 0x55);
  b = (b & 0x33) + ((b >> 2) & 0x33);
  return (b + (b >> 4)) & 0x0f;
}
