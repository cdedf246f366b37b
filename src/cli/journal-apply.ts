/**
 * Applying journal entries to a raw image, shared by the offline journal tools. Synchronous I/O: the
 * journal scanner's payload views live only during its callback.
 */
import * as fs from "node:fs";
import { native } from "../block/drivers/native.js";

/** An entry's wall-clock time in ISO 8601, keeping the microseconds (entries often share a ms). */
export function isoTime(wallUs: number): string {
  const ms = Math.floor(wallUs / 1000);
  const us = String(wallUs % 1000).padStart(3, "0");
  return new Date(ms).toISOString().replace("Z", `${us}Z`);
}

export function writeAll(fd: number, data: Buffer, offset: number): void {
  let done = 0;
  while (done < data.length) done += fs.writeSync(fd, data, done, data.length - done, offset + done);
}

const ZERO_CHUNK = Buffer.alloc(1024 * 1024);

/** Punches a hole (reads as zeros) where the filesystem can, else writes zeros. */
export function zeroRange(fd: number, offset: number, length: number): void {
  if (native && native.punchHole(fd, offset, length) >= 0) return;
  for (let pos = offset; pos < offset + length; pos += ZERO_CHUNK.length) {
    writeAll(fd, ZERO_CHUNK.subarray(0, Math.min(ZERO_CHUNK.length, offset + length - pos)), pos);
  }
}
