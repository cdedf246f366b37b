/** What the micro benchmarks share: 4 KiB writes at a fixed concurrency, timed per write. */
import { randomBytes } from "node:crypto";

export const BLOCK_BYTES = 4096;
export const DISK_BYTES = 1 << 30;

/**
 * Issues `writes` writes of 4 KiB at scattered offsets, `concurrency` at a time, each worker with a
 * buffer of its own (as NBD requests would bring), and returns the wall time per write in µs.
 */
export async function timeConcurrentWrites(
  writes: number,
  concurrency: number,
  write: (offset: number, data: Buffer) => Promise<void>,
): Promise<number> {
  const buffers = Array.from({ length: concurrency }, () => randomBytes(BLOCK_BYTES));
  const blocks = DISK_BYTES / BLOCK_BYTES;
  let next = 0;
  const worker = async (w: number): Promise<void> => {
    while (next < writes) {
      const i = next++;
      await write(((i * 2654435761) % blocks) * BLOCK_BYTES, buffers[w]);
    }
  };
  const start = process.hrtime.bigint();
  await Promise.all(Array.from({ length: concurrency }, (_, w) => worker(w)));
  return Number(process.hrtime.bigint() - start) / 1000 / writes;
}
