/** Half-open byte ranges [offset, offset + length). */
export function rangesOverlap(aOffset: number, aLength: number, bOffset: number, bLength: number): boolean {
  return aOffset < bOffset + bLength && bOffset < aOffset + aLength;
}

/** Total bytes in a list of buffers (an I/O vector). */
export function iovLength(iov: readonly Buffer[]): number {
  let n = 0;
  for (const b of iov) n += b.length;
  return n;
}
