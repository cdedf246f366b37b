/**
 * Recycled buffers for large read replies. A fresh multi-megabyte buffer costs a page fault per 4 KiB
 * on first touch: reading 1 MiB from the page cache into a fresh buffer takes about 350 us here, into a
 * reused one about 100 us. Buffers go back to the pool when the socket has taken the reply (the write
 * callback); idle memory in the pool is bounded.
 *
 * Size classes are multiples of 64 KiB, not powers of two: a 32 MiB read reply (32 MiB plus a
 * header) takes 32 MiB + 64 KiB, not 64 MiB. Clients use a handful of request sizes, so the classes
 * that matter stay few.
 */
import { KiB, MiB } from "../../core/units.js";

/** Replies smaller than this are plain allocations (small ones come from Node's own pool). */
export const POOLED_REPLY_BYTES_MIN = 64 * KiB;
/**
 * Idle bytes the pool keeps: room for two of the largest replies (32 MiB + a header, rounded up), so
 * that clients doing the largest reads reuse buffers instead of leaving 32 MiB of garbage per read.
 * Garbage is what the buffer budget cannot see: it lives until the next full collection.
 */
export const REPLY_POOL_IDLE_BYTES_MAX = 2 * (32 * MiB + 64 * KiB);

const CLASS_GRANULE_BYTES = 64 * KiB;

/** Idle buffers, each whole (byteOffset 0, length = its class), smallest first. */
const idle: Buffer[] = [];
let idleBytes = 0;

/** The allocation a reply of n bytes gets (what the buffer budget counts). */
export function replyAllocationBytes(n: number): number {
  if (n < POOLED_REPLY_BYTES_MIN) return n;
  return Math.ceil(n / CLASS_GRANULE_BYTES) * CLASS_GRANULE_BYTES;
}

/**
 * A buffer of exactly n bytes, backed by a pooled allocation when n is large: the smallest idle
 * buffer that holds n and is at most twice its size, else a new one of n's class.
 */
export function takeReplyBuffer(n: number): Buffer {
  if (n < POOLED_REPLY_BYTES_MIN) return Buffer.allocUnsafe(n);
  const cls = replyAllocationBytes(n);
  for (let i = 0; i < idle.length; i++) {
    const b = idle[i];
    if (b.length < cls) continue;
    if (b.length > 2 * cls) break;
    idle.splice(i, 1);
    idleBytes -= b.length;
    return b.subarray(0, n);
  }
  return Buffer.allocUnsafeSlow(cls).subarray(0, n);
}

/** Gives a buffer from takeReplyBuffer back once nothing reads it any more. */
export function giveReplyBuffer(b: Buffer): void {
  if (b.length < POOLED_REPLY_BYTES_MIN || b.byteOffset !== 0) return;
  const whole = Buffer.from(b.buffer, 0, b.buffer.byteLength);
  const size = whole.length;
  if (size % CLASS_GRANULE_BYTES !== 0 || size > REPLY_POOL_IDLE_BYTES_MAX) return;
  // Over the bound: the smallest idle buffers make room (large ones are the costly ones to remake).
  while (idleBytes + size > REPLY_POOL_IDLE_BYTES_MAX && idle.length > 0 && idle[0].length < size) {
    idleBytes -= idle.shift()!.length;
  }
  if (idleBytes + size > REPLY_POOL_IDLE_BYTES_MAX) return;
  let i = 0;
  while (i < idle.length && idle[i].length < size) i++;
  idle.splice(i, 0, whole);
  idleBytes += size;
}
