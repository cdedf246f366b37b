/**
 * Recycled buffers for large read replies. A fresh multi-megabyte buffer costs a page fault per 4 KiB
 * on first touch: reading 1 MiB from the page cache into a fresh buffer takes about 350 us here, into a
 * reused one about 100 us. Buffers come in power-of-two size classes and go back to the pool when the
 * socket has taken the reply (the write callback); idle memory in the pool is bounded.
 *
 * Size classes are multiples of 64 KiB, not powers of two: a 32 MiB read reply (32 MiB plus a
 * header) takes 32 MiB + 64 KiB, not 64 MiB. Clients use a handful of request sizes, so the classes
 * that matter stay few.
 */
import { KiB, MiB } from "../../core/units.js";

/** Replies smaller than this are plain allocations (small ones come from Node's own pool). */
export const POOLED_REPLY_BYTES_MIN = 64 * KiB;
/** Idle bytes the pool keeps, over all size classes. */
export const REPLY_POOL_IDLE_BYTES_MAX = 32 * MiB;

const free = new Map<number, Buffer[]>();
let idleBytes = 0;

const CLASS_GRANULE_BYTES = 64 * KiB;

/** The allocation a reply of n bytes gets (what the buffer budget counts). */
export function replyAllocationBytes(n: number): number {
  if (n < POOLED_REPLY_BYTES_MIN) return n;
  return Math.ceil(n / CLASS_GRANULE_BYTES) * CLASS_GRANULE_BYTES;
}

function sizeClass(n: number): number {
  return replyAllocationBytes(n);
}

/** A buffer of exactly n bytes, backed by a pooled allocation when n is large. */
export function takeReplyBuffer(n: number): Buffer {
  if (n < POOLED_REPLY_BYTES_MIN) return Buffer.allocUnsafe(n);
  const cls = sizeClass(n);
  const list = free.get(cls);
  const whole = list?.pop();
  if (whole) {
    idleBytes -= cls;
    return whole.subarray(0, n);
  }
  return Buffer.allocUnsafeSlow(cls).subarray(0, n);
}

/** Gives a buffer from takeReplyBuffer back once nothing reads it any more. */
export function giveReplyBuffer(b: Buffer): void {
  if (b.length < POOLED_REPLY_BYTES_MIN) return;
  const cls = b.buffer.byteLength;
  if (b.byteOffset !== 0 || cls !== sizeClass(cls) || idleBytes + cls > REPLY_POOL_IDLE_BYTES_MAX) return;
  let list = free.get(cls);
  if (!list) free.set(cls, (list = []));
  list.push(Buffer.from(b.buffer, 0, cls));
  idleBytes += cls;
}
