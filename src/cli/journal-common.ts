/**
 * What the offline journal tools (show, replay, stat, export, report, crashcheck) share: reading a
 * journal with format errors turned into CLI errors, the torn-tail warning, the action wrapper, times,
 * and applying entries to a raw image. Synchronous I/O: the journal scanner's payload views live only
 * during its callback.
 */
import * as fs from "node:fs";
import {
  SCAN_STOPPED_BY_CALLER,
  scanJournalFile,
  type Entry,
  type JournalScan,
} from "../block/drivers/journal.js";
import { JournalFormatError } from "../block/drivers/journal-format.js";
import { native } from "../block/drivers/native.js";

/** A journal the command cannot use; its message is printed as is. */
export class JournalCliError extends Error {}

export function scanOrFail(path: string, onEntry: (e: Entry) => boolean | void): JournalScan {
  try {
    return scanJournalFile(path, onEntry);
  } catch (err) {
    if (err instanceof JournalFormatError) throw new JournalCliError(`${path}: ${err.message}`);
    throw err;
  }
}

/** Says on stderr that a torn or corrupt tail was left out. */
export function warnTail(path: string, s: JournalScan): void {
  if (s.validBytes < s.fileBytes && s.stopReason !== SCAN_STOPPED_BY_CALLER) {
    process.stderr.write(
      `drivetap journal: ${path}: ignoring ${s.fileBytes - s.validBytes} bytes after entry ${s.nextSeq - 1} (${s.stopReason})\n`,
    );
  }
}

/** Runs a subcommand: an error is printed on stderr and makes the exit code 1. */
export async function runJournalAction(action: () => void | Promise<void>): Promise<void> {
  try {
    await action();
  } catch (err) {
    process.stderr.write(`drivetap journal: ${(err as Error).message}\n`);
    process.exitCode = 1;
  }
}

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
