/** Half-open byte ranges [offset, offset + length). An empty range overlaps nothing. */
export function rangesOverlap(aOffset: number, aLength: number, bOffset: number, bLength: number): boolean {
  return aLength > 0 && bLength > 0 && aOffset < bOffset + bLength && bOffset < aOffset + aLength;
}

/** Total bytes in a list of buffers (an I/O vector). */
export function iovLength(iov: readonly Buffer[]): number {
  let n = 0;
  for (const b of iov) n += b.length;
  return n;
}
