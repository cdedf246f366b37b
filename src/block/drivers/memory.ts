/**
 * The memory driver: a sparse disk held in fixed-size chunks. Unwritten and discarded chunks take no
 * memory and read as zeros; block status reports them as holes.
 */
import { type BlockDriver, type DriverCapabilities, type Extent } from "../driver.js";
import { KiB } from "../../core/units.js";

export const MEMORY_CHUNK_BYTES = 64 * KiB;

export class MemoryDriver implements BlockDriver {
  readonly driverName = "memory";
  readonly capabilities: DriverCapabilities = {
    zeroes: "native",
    fua: "native",
    discard: true,
    // Whole chunks are freed and partial ones zero-filled: every discarded byte reads as zero.
    discardZeroes: true,
    blockStatus: true,
  };
  #size: number;
  readonly #chunks = new Map<number, Buffer>();

  constructor(size: number) {
    this.#size = size;
  }
  size(): number {
    return this.#size;
  }

  /** Bytes of chunk memory in use (for tests and stats). */
  allocatedBytes(): number {
    return this.#chunks.size * MEMORY_CHUNK_BYTES;
  }

  async pread(offset: number, into: Buffer): Promise<void> {
    let done = 0;
    while (done < into.length) {
      const pos = offset + done;
      const index = Math.floor(pos / MEMORY_CHUNK_BYTES);
      const within = pos - index * MEMORY_CHUNK_BYTES;
      const n = Math.min(MEMORY_CHUNK_BYTES - within, into.length - done);
      const chunk = this.#chunks.get(index);
      if (chunk) chunk.copy(into, done, within, within + n);
      else into.fill(0, done, done + n);
      done += n;
    }
  }

  async pwrite(offset: number, data: readonly Buffer[]): Promise<void> {
    let pos = offset;
    for (const buf of data) {
      let done = 0;
      while (done < buf.length) {
        const index = Math.floor(pos / MEMORY_CHUNK_BYTES);
        const within = pos - index * MEMORY_CHUNK_BYTES;
        const n = Math.min(MEMORY_CHUNK_BYTES - within, buf.length - done);
        let chunk = this.#chunks.get(index);
        if (!chunk) {
          chunk = Buffer.alloc(MEMORY_CHUNK_BYTES);
          this.#chunks.set(index, chunk);
        }
        buf.copy(chunk, within, done, done + n);
        done += n;
        pos += n;
      }
    }
  }

  async pwriteZeroes(offset: number, length: number): Promise<void> {
    this.#zero(offset, length);
  }

  async pdiscard(offset: number, length: number): Promise<void> {
    this.#zero(offset, length);
  }

  /** Drops whole chunks, zero-fills partial ones: either way the range reads as zeros. */
  #zero(offset: number, length: number): void {
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const index = Math.floor(pos / MEMORY_CHUNK_BYTES);
      const within = pos - index * MEMORY_CHUNK_BYTES;
      const n = Math.min(MEMORY_CHUNK_BYTES - within, end - pos);
      const chunk = this.#chunks.get(index);
      if (chunk) {
        if (n === MEMORY_CHUNK_BYTES) this.#chunks.delete(index);
        else chunk.fill(0, within, within + n);
      }
      pos += n;
    }
  }

  async flush(): Promise<void> {}

  /**
   * Shrinking frees the chunks past the new end and zeroes the cut part of the last one, so growing
   * again reads zeros there, as a truncated and re-extended file does.
   */
  async resize(sizeBytes: number): Promise<void> {
    if (sizeBytes < this.#size) {
      for (const index of [...this.#chunks.keys()]) {
        if (index * MEMORY_CHUNK_BYTES >= sizeBytes) this.#chunks.delete(index);
      }
      const within = sizeBytes % MEMORY_CHUNK_BYTES;
      if (within !== 0) this.#chunks.get(Math.floor(sizeBytes / MEMORY_CHUNK_BYTES))?.fill(0, within);
    }
    this.#size = sizeBytes;
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const out: Extent[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const index = Math.floor(pos / MEMORY_CHUNK_BYTES);
      const n = Math.min((index + 1) * MEMORY_CHUNK_BYTES, end) - pos;
      const hole = !this.#chunks.has(index);
      const last = out[out.length - 1];
      if (last && last.hole === hole) out[out.length - 1] = { ...last, length: last.length + n };
      else out.push({ offset: pos, length: n, hole, zero: hole });
      pos += n;
    }
    return out;
  }

  async close(): Promise<void> {
    this.#chunks.clear();
  }
}
