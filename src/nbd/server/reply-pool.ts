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

/**
 * Replies smaller than this are plain allocations. A 4 KiB read's reply (4 KiB and a header) is
 * past Node's own buffer pool, so without recycling every small read allocates fresh memory, and
 * reading into fresh memory costs page faults inside pread: 4 KiB QD32 reads measured 20-25% slower.
 */
export const POOLED_REPLY_BYTES_MIN = 4 * KiB;
/** Classes below this are kept apart, so that small buffers cannot crowd out the large ones. */
const LARGE_CLASS_BYTES_MIN = 1 * MiB;
/** Idle bytes kept in small classes. */
export const REPLY_POOL_SMALL_IDLE_BYTES_MAX = 8 * MiB;
/**
 * Idle bytes kept in large classes: room for two of the largest replies (32 MiB + a header, rounded
 * up), so that clients doing the largest reads reuse buffers instead of leaving 32 MiB of garbage per
 * read. Garbage is what the buffer budget cannot see: it lives until the next full collection.
 */
export const REPLY_POOL_IDLE_BYTES_MAX = 2 * (32 * MiB + 64 * KiB);

/** Idle allocations by size; a Buffer view is made only when one is taken. */
const free = new Map<number, ArrayBuffer[]>();
let smallIdleBytes = 0;
let largeIdleBytes = 0;

/** The allocation a reply of n bytes gets (what the buffer budget counts): 4 KiB steps below 64 KiB, 64 KiB steps above. */
export function replyAllocationBytes(n: number): number {
  if (n < POOLED_REPLY_BYTES_MIN) return n;
  const granule = n < 64 * KiB ? 4 * KiB : 64 * KiB;
  return Math.ceil(n / granule) * granule;
}

function pop(cls: number): ArrayBuffer | undefined {
  const b = free.get(cls)?.pop();
  if (b === undefined) return undefined;
  if (cls < LARGE_CLASS_BYTES_MIN) smallIdleBytes -= cls;
  else largeIdleBytes -= cls;
  return b;
}

/**
 * A buffer of exactly n bytes, backed by a pooled allocation: an idle one of n's class, or for large
 * replies one of up to twice the size, else a new one of n's class.
 */
export function takeReplyBuffer(n: number): Buffer {
  if (n < POOLED_REPLY_BYTES_MIN) return Buffer.allocUnsafe(n);
  const cls = replyAllocationBytes(n);
  let whole = pop(cls);
  if (whole === undefined && cls >= LARGE_CLASS_BYTES_MIN) {
    for (const [size, list] of free) {
      if (size > cls && size <= 2 * cls && list.length > 0) {
        whole = pop(size);
        break;
      }
    }
  }
  if (whole === undefined) return Buffer.allocUnsafeSlow(cls).subarray(0, n);
  return Buffer.from(whole, 0, n);
}

/** Gives a buffer from takeReplyBuffer back once nothing reads it any more. */
export function giveReplyBuffer(b: Buffer): void {
  if (b.length < POOLED_REPLY_BYTES_MIN || b.byteOffset !== 0) return;
  const size = b.buffer.byteLength;
  if (size !== replyAllocationBytes(size)) return;
  if (size < LARGE_CLASS_BYTES_MIN) {
    if (smallIdleBytes + size > REPLY_POOL_SMALL_IDLE_BYTES_MAX) return;
    smallIdleBytes += size;
  } else {
    if (largeIdleBytes + size > REPLY_POOL_IDLE_BYTES_MAX) return;
    largeIdleBytes += size;
  }
  let list = free.get(size);
  if (!list) free.set(size, (list = []));
  list.push(b.buffer as ArrayBuffer);
}
