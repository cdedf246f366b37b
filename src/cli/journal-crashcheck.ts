/**
 * `drivetap journal crashcheck J IMAGE --fsck CMD`: the crash-consistency check dm-log-writes users
 * script by hand. A flush is the point a crash may leave the disk at with everything before it durable,
 * so each flush point is a state the filesystem must recover from. Starting from a scratch copy of
 * IMAGE (the disk as it was when the journal started; IMAGE itself is never changed), the entries are
 * applied incrementally up to each flush; the state there is copied (reflink or sparse copy: the
 * checker may write, and the replay continues from the uncopied state) and CMD runs with {} replaced
 * by the copy's path. Exit 0 only when every point checked passed.
 *
 * Consecutive flushes with no change between them leave the same state: it is checked once and the
 * later points report the same result.
 */
import { spawnSync } from "node:child_process";
import * as fs from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Command } from "commander";
import { scanJournalFile, SCAN_STOPPED_BY_CALLER, type Entry } from "../block/drivers/journal.js";
import { JournalFormatError } from "../block/drivers/journal-format.js";
import { isoTime, writeAll, zeroRange } from "./journal-common.js";

/** One checker run may take this long before it counts as failed. */
export const CHECKER_TIMEOUT_MS = 10 * 60_000;
/** Checker output kept for a failed point's report. */
const CHECKER_OUTPUT_BYTES_MAX = 4096;

class CrashcheckError extends Error {}

export interface CrashcheckOptions {
  readonly fsck: string;
  readonly maxPoints?: number;
  readonly scratchDir?: string;
}

export interface PointResult {
  readonly seq: number;
  readonly time: string;
  readonly exitCode: number | null;
  readonly pass: boolean;
  /** The seq of the earlier point with the same state, when the checker did not run again. */
  readonly sameAs?: number;
}

function shellQuote(s: string): string {
  return `'${s.replace(/'/g, `'\\''`)}'`;
}

/** Copies a state for the checker: a reflink where the filesystem can, else a sparse copy. */
function snapshot(from: string, to: string): void {
  const r = spawnSync("cp", ["--reflink=auto", "--sparse=always", from, to], { encoding: "utf8" });
  if (r.error) throw r.error;
  if (r.status !== 0) throw new CrashcheckError(`cp ${from} ${to} failed: ${r.stderr.trim()}`);
}

function runChecker(template: string, path: string): { exitCode: number | null; output: string } {
  const cmd = template.includes("{}")
    ? template.split("{}").join(shellQuote(path))
    : `${template} ${shellQuote(path)}`;
  const r = spawnSync("/bin/sh", ["-c", cmd], {
    encoding: "utf8",
    timeout: CHECKER_TIMEOUT_MS,
    maxBuffer: 64 * 1024 * 1024,
  });
  if (r.error && (r.error as NodeJS.ErrnoException).code !== "ETIMEDOUT") throw r.error;
  const output = `${r.stdout ?? ""}${r.stderr ?? ""}`;
  return { exitCode: r.status, output: output.slice(-CHECKER_OUTPUT_BYTES_MAX) };
}

export function crashcheck(
  journal: string,
  image: string,
  opts: CrashcheckOptions,
  out: (line: string) => void = (l) => process.stdout.write(l),
): PointResult[] {
  const maxPoints = opts.maxPoints ?? Infinity;
  let header;
  try {
    header = scanJournalFile(journal, () => false).header;
  } catch (err) {
    if (err instanceof JournalFormatError) throw new CrashcheckError(`${journal}: ${err.message}`);
    throw err;
  }
  if (!header.data)
    throw new CrashcheckError(`${journal} was recorded with data=false (hashes only): it cannot be replayed`);
  const imageBytes = fs.statSync(image).size;
  if (imageBytes !== header.diskBytes)
    throw new CrashcheckError(
      `${image} is ${imageBytes} bytes but the journal is for a disk of ${header.diskBytes} bytes`,
    );

  const dir = fs.mkdtempSync(join(opts.scratchDir ?? tmpdir(), "drivetap-crashcheck-"));
  const state = join(dir, "state.img");
  const check = join(dir, "check.img");
  const results: PointResult[] = [];
  try {
    snapshot(image, state);
    const fd = fs.openSync(state, "r+");
    let changed = true;
    try {
      const s = scanJournalFile(journal, (e: Entry) => {
        if (results.length >= maxPoints) return false;
        if (e.kind === "write") writeAll(fd, e.payload, e.offset);
        else if (e.kind === "zero" || e.kind === "discard") zeroRange(fd, e.offset, e.length);
        if (e.kind !== "flush") {
          if (e.kind !== "mark") changed = true;
          return;
        }
        const time = isoTime(e.wallUs);
        const prev = results[results.length - 1];
        let r: PointResult;
        if (!changed && prev) {
          r = { seq: e.seq, time, exitCode: prev.exitCode, pass: prev.pass, sameAs: prev.sameAs ?? prev.seq };
        } else {
          fs.rmSync(check, { force: true });
          snapshot(state, check);
          const c = runChecker(opts.fsck, check);
          r = { seq: e.seq, time, exitCode: c.exitCode, pass: c.exitCode === 0 };
          if (!r.pass) out(c.output.replace(/^/gm, "    | ").trimEnd() + "\n");
        }
        changed = false;
        results.push(r);
        out(
          `${String(r.seq).padStart(8)}  ${r.time}  exit ${String(r.exitCode ?? "timeout").padStart(3)}  ${r.pass ? "PASS" : "FAIL"}` +
            (r.sameAs !== undefined ? `  (no change since seq ${r.sameAs})` : "") +
            "\n",
        );
      });
      if (s.validBytes < s.fileBytes && s.stopReason !== SCAN_STOPPED_BY_CALLER)
        process.stderr.write(
          `drivetap journal: ${journal}: ignoring ${s.fileBytes - s.validBytes} bytes after entry ${s.nextSeq - 1} (${s.stopReason})\n`,
        );
    } finally {
      fs.closeSync(fd);
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
  const failed = results.filter((r) => !r.pass).length;
  out(
    `${results.length} flush points checked${results.length >= maxPoints ? ` (--max-points ${maxPoints})` : ""}: ` +
      `${results.length - failed} passed, ${failed} failed\n`,
  );
  return results;
}

function positiveInt(text: string): number {
  const n = Number(text);
  if (!Number.isSafeInteger(n) || n < 1) throw new CrashcheckError(`not a positive integer: ${text}`);
  return n;
}

export function addCrashcheckCommand(journal: Command): void {
  journal
    .command("crashcheck")
    .description(
      "Replay to every flush point in order and run a checker on a copy of each state (IMAGE is not changed)",
    )
    .argument("<journal>", "journal file (recorded with data: true)")
    .argument("<image>", "raw image: the disk as it was when the journal started")
    .requiredOption("--fsck <command>", "checker run by /bin/sh; {} is replaced by the state's path")
    .option("--max-points <n>", "check at most this many flush points (default: all)")
    .option("--scratch-dir <dir>", "where the scratch copies go (default: the temp directory)")
    .action((path: string, image: string, o: { fsck: string; maxPoints?: string; scratchDir?: string }) => {
      try {
        const results = crashcheck(path, image, {
          fsck: o.fsck,
          maxPoints: o.maxPoints !== undefined ? positiveInt(o.maxPoints) : undefined,
          scratchDir: o.scratchDir,
        });
        if (results.length === 0) {
          process.stderr.write(`drivetap journal: ${path} has no flush point to check\n`);
          process.exitCode = 1;
        } else if (results.some((r) => !r.pass)) process.exitCode = 1;
      } catch (err) {
        process.stderr.write(`drivetap journal: ${(err as Error).message}\n`);
        process.exitCode = 1;
      }
    });
}
