/**
 * `drivetap journal show|replay`: offline tools for journal files (block/drivers/journal.ts). They read
 * the valid prefix of a journal and ignore a torn or corrupt tail, saying so on stderr.
 *
 * replay applies entries in seq order onto IMAGE, which must be a copy of the disk as it was when the
 * journal started (for example the stream target's initial copy). --until selects the last entry
 * applied, inclusively:
 * - mark:NAME: every entry before the first mark named NAME (the disk as it was at the mark);
 * - seq:N: every entry with seq <= N;
 * - time:ISO8601: every entry whose wall-clock time is <= the given time.
 * Write-zeroes and discards become zeros on IMAGE (punched holes where the filesystem allows).
 */
import * as fs from "node:fs";
import { Command } from "commander";
import { type Entry, type JournalScan } from "../block/drivers/journal.js";
import {
  isoTime,
  JournalCliError,
  runJournalAction,
  scanOrFail,
  warnTail,
  writeAll,
  zeroRange,
} from "./journal-common.js";
import { addJournalExportCommand } from "./journal-export.js";
import { addJournalReportCommand } from "./journal-report.js";
import { addJournalStatCommand } from "./journal-stat.js";
import { addCrashcheckCommand } from "./journal-crashcheck.js";

type Until =
  | { readonly type: "mark"; readonly name: string }
  | { readonly type: "seq"; readonly seq: number }
  | { readonly type: "time"; readonly wallUs: number };

export function parseUntil(text: string): Until {
  const m = /^(mark|seq|time):(.+)$/s.exec(text);
  if (!m) throw new JournalCliError(`--until wants mark:NAME, seq:N or time:ISO8601, not '${text}'`);
  if (m[1] === "mark") return { type: "mark", name: m[2] };
  if (m[1] === "seq") {
    const seq = Number(m[2]);
    if (!Number.isSafeInteger(seq) || seq < 0) throw new JournalCliError(`not a sequence number: ${m[2]}`);
    return { type: "seq", seq };
  }
  const ms = Date.parse(m[2]);
  if (Number.isNaN(ms)) throw new JournalCliError(`not an ISO 8601 time: ${m[2]}`);
  return { type: "time", wallUs: ms * 1000 };
}

/** One `show --json` line. */
export function entryJson(e: Entry): Record<string, unknown> {
  const out: Record<string, unknown> = {
    seq: e.seq,
    time: isoTime(e.wallUs),
    kind: e.kind,
    offset: e.offset,
    length: e.length,
    fua: e.fua,
  };
  if (e.kind === "zero") out.mayTrim = e.mayTrim;
  if (e.kind === "mark") out.name = e.name;
  if (e.payloadKind === "hash") out.sha256 = e.payload.toString("hex");
  return out;
}

function show(path: string, opts: { json?: boolean }): void {
  const lines: string[] = [];
  const out = (line: string): void => {
    lines.push(line);
    if (lines.length >= 1024) process.stdout.write(lines.splice(0).join(""));
  };
  if (!opts.json) out(`${"seq".padStart(8)}  ${"time".padEnd(27)}  ${"kind".padEnd(7)}  offset+length\n`);
  const s = scanOrFail(path, (e) => {
    if (opts.json) {
      out(JSON.stringify(entryJson(e)) + "\n");
      return;
    }
    const what =
      e.kind === "mark" ? JSON.stringify(e.name) : e.kind === "flush" ? "" : `${e.offset}+${e.length}`;
    const flags = [e.fua ? "fua" : "", e.kind === "zero" && e.mayTrim ? "may-trim" : ""].filter(Boolean);
    const row = `${String(e.seq).padStart(8)}  ${isoTime(e.wallUs).padEnd(27)}  ${e.kind.padEnd(7)}  ${what}${flags.length ? `  (${flags.join(",")})` : ""}`;
    out(row.trimEnd() + "\n");
  });
  process.stdout.write(lines.join(""));
  if (!opts.json) {
    process.stdout.write(
      `${s.entryCount} entries, disk ${s.header.diskBytes} bytes, ${s.header.data ? "with data" : "hashes only"}, created ${new Date(s.header.createdMs).toISOString()}\n`,
    );
  }
  warnTail(path, s);
}

/** Finds the seq of the last entry to apply; null when nothing is to be applied. */
function lastSeqFor(path: string, until: Until): { lastSeq: number | null; scan: JournalScan } {
  let lastSeq: number | null = null;
  let found = false;
  const s = scanOrFail(path, (e) => {
    switch (until.type) {
      case "mark":
        if (e.kind === "mark" && e.name === until.name) {
          found = true;
          lastSeq = e.seq;
          return false;
        }
        break;
      case "seq":
        if (e.seq > until.seq) return false;
        if (e.seq === until.seq) found = true;
        break;
      case "time":
        if (e.wallUs > until.wallUs) return false;
        break;
    }
    lastSeq = e.seq;
  });
  if (until.type === "mark" && !found)
    throw new JournalCliError(`no mark named '${until.name}' in the valid part of ${path}`);
  if (until.type === "seq" && !found)
    throw new JournalCliError(`no entry with seq ${until.seq} in the valid part of ${path}`);
  return { lastSeq, scan: s };
}

function replay(path: string, image: string, opts: { until?: string }): void {
  const until = opts.until !== undefined ? parseUntil(opts.until) : null;
  // Check everything before touching the image: a bad --until must leave it as it was.
  const first = until ? lastSeqFor(path, until) : null;
  const header = first?.scan.header ?? scanOrFail(path, () => false).header;
  if (!header.data) {
    throw new JournalCliError(
      `${path} was recorded with data=false (hashes only): it cannot be replayed, only shown`,
    );
  }
  const imageBytes = fs.statSync(image).size;
  if (imageBytes !== header.diskBytes) {
    throw new JournalCliError(
      `${image} is ${imageBytes} bytes but the journal is for a disk of ${header.diskBytes} bytes`,
    );
  }
  const lastSeq = first ? first.lastSeq : Infinity;
  // Synchronous I/O: the scanner's payload views live only during its callback, and one entry at a
  // time keeps memory bounded by the largest entry.
  const fd = fs.openSync(image, "r+");
  let applied = 0;
  try {
    const s = scanOrFail(path, (e) => {
      if (lastSeq === null || e.seq > lastSeq) return false;
      if (e.kind === "mark" && until?.type === "mark" && e.seq === lastSeq) return false;
      if (e.kind === "write") writeAll(fd, e.payload, e.offset);
      else if (e.kind === "zero" || e.kind === "discard") zeroRange(fd, e.offset, e.length);
      else return; // flush and mark change nothing
      applied++;
    });
    fs.fdatasyncSync(fd);
    warnTail(path, s);
  } finally {
    fs.closeSync(fd);
  }
  process.stdout.write(
    `drivetap journal: applied ${applied} changes from ${path} to ${image}` +
      (lastSeq === null ? " (nothing to apply)" : lastSeq === Infinity ? "" : ` (through seq ${lastSeq})`) +
      "\n",
  );
}

export function addJournalCommands(program: Command): void {
  const journal = program
    .command("journal")
    .description("Inspect and replay journal files written by a journal node (a sync=stream target)");
  journal
    .command("show")
    .description("List a journal's entries (the valid prefix; a torn tail is reported on stderr)")
    .argument("<journal>", "journal file")
    .option("--json", "one JSON object per line: seq, time, kind, offset, length, fua (and name for marks)")
    .action((path: string, opts: { json?: boolean }) => runJournalAction(() => show(path, opts)));
  journal
    .command("replay")
    .description(
      "Apply a journal's entries in order onto IMAGE, a copy of the disk as it was when the journal started",
    )
    .argument("<journal>", "journal file (recorded with data: true)")
    .argument("<image>", "raw image to change in place")
    .option(
      "--until <point>",
      "stop after mark:NAME (entries before the mark), seq:N (through seq N) or time:ISO8601 (entries at or before it)",
    )
    .action((path: string, image: string, opts: { until?: string }) =>
      runJournalAction(() => replay(path, image, opts)),
    );
  addJournalStatCommand(journal);
  addJournalExportCommand(journal);
  addJournalReportCommand(journal);
  addCrashcheckCommand(journal);
}
