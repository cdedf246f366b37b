/**
 * `drivetap journal stat`: one pass over a journal's valid prefix that sums what it holds: entries per
 * kind, bytes written, zeroed and discarded, a power-of-two size histogram, the hottest regions, the
 * time span and the marks. `journal report` draws the same numbers, so the analysis lives here as a
 * pure function of the entries (analyzeJournal), apart from the command that prints it.
 */
import type { Command } from "commander";
import type { EntryKind } from "../block/drivers/journal-format.js";
import { formatSize, MiB } from "../core/units.js";
import { isoTime, runJournalAction, scanOrFail } from "./journal-common.js";

/** Hot regions are counted per aligned region of this size. */
export const HOT_REGION_BYTES = MiB;
export const HOT_REGIONS_MAX = 10;
/** stat lists at most this many marks (the count is always exact). */
export const MARKS_LISTED_MAX = 1000;

export function log2Floor(n: number): number {
  if (n < 2 ** 32) return 31 - Math.clz32(n);
  return 32 + log2Floor(Math.floor(n / 2 ** 32));
}

export interface SizeBucket {
  /** Lengths in [fromBytes, toBytes). */
  readonly fromBytes: number;
  readonly toBytes: number;
  write: number;
  zero: number;
  discard: number;
}

export interface HotRegion {
  readonly offset: number;
  bytesWritten: number;
  writes: number;
}

export interface MarkInfo {
  readonly seq: number;
  readonly name: string;
  readonly time: string;
  readonly wallUs: number;
}

export interface JournalStat {
  readonly journal: string;
  readonly diskBytes: number;
  readonly data: boolean;
  readonly created: string;
  readonly entries: number;
  readonly kinds: Record<EntryKind, number>;
  /** Writes and write-zeroes with FUA. */
  readonly fua: number;
  readonly bytes: { written: number; zeroed: number; discarded: number };
  /** Non-empty buckets, smallest first, over writes, write-zeroes and discards of length > 0. */
  readonly sizeHistogram: SizeBucket[];
  /** The regions of HOT_REGION_BYTES with the most bytes written (writes, not zeroes), most first. */
  readonly hotRegions: { regionBytes: number; top: HotRegion[] };
  /** Smallest and largest wall-clock time of an entry (null for an empty journal). */
  readonly time: { first: string; last: string; firstUs: number; lastUs: number; spanMs: number } | null;
  readonly markCount: number;
  /** The first MARKS_LISTED_MAX marks in seq order. */
  readonly marks: MarkInfo[];
  readonly validBytes: number;
  readonly fileBytes: number;
  /** Why the valid prefix ends before the file does, if it does. */
  readonly ignoredTail?: string;
}

/** Sums a journal's valid prefix in one scan; memory grows with regions written, not with entries. */
export function analyzeJournal(path: string): JournalStat {
  const kinds: Record<EntryKind, number> = { write: 0, zero: 0, discard: 0, flush: 0, mark: 0 };
  const bytes = { written: 0, zeroed: 0, discarded: 0 };
  const buckets = new Map<number, SizeBucket>();
  const regions = new Map<number, HotRegion>();
  const marks: MarkInfo[] = [];
  let markCount = 0;
  let fua = 0;
  let minUs = Infinity;
  let maxUs = -Infinity;
  const s = scanOrFail(path, (e) => {
    kinds[e.kind]++;
    if (e.wallUs < minUs) minUs = e.wallUs;
    if (e.wallUs > maxUs) maxUs = e.wallUs;
    if (e.fua) fua++;
    if (e.kind === "mark") {
      markCount++;
      if (marks.length < MARKS_LISTED_MAX)
        marks.push({ seq: e.seq, name: e.name ?? "", time: isoTime(e.wallUs), wallUs: e.wallUs });
      return;
    }
    if (e.kind === "flush") return;
    if (e.kind === "write") bytes.written += e.length;
    else if (e.kind === "zero") bytes.zeroed += e.length;
    else bytes.discarded += e.length;
    if (e.length > 0) {
      const k = log2Floor(e.length);
      let b = buckets.get(k);
      if (!b)
        buckets.set(k, (b = { fromBytes: 2 ** k, toBytes: 2 ** (k + 1), write: 0, zero: 0, discard: 0 }));
      b[e.kind]++;
    }
    if (e.kind !== "write") return;
    // Split the write over the regions it touches.
    const end = e.offset + e.length;
    for (let r = Math.floor(e.offset / HOT_REGION_BYTES); r * HOT_REGION_BYTES < end; r++) {
      const from = Math.max(e.offset, r * HOT_REGION_BYTES);
      const to = Math.min(end, (r + 1) * HOT_REGION_BYTES);
      let region = regions.get(r);
      if (!region) regions.set(r, (region = { offset: r * HOT_REGION_BYTES, bytesWritten: 0, writes: 0 }));
      region.bytesWritten += to - from;
      region.writes++;
    }
  });
  const entries = s.entryCount;
  const top = [...regions.values()]
    .sort((a, b) => b.bytesWritten - a.bytesWritten || a.offset - b.offset)
    .slice(0, HOT_REGIONS_MAX);
  return {
    journal: path,
    diskBytes: s.header.diskBytes,
    data: s.header.data,
    created: new Date(s.header.createdMs).toISOString(),
    entries,
    kinds,
    fua,
    bytes,
    sizeHistogram: [...buckets.entries()].sort((a, b) => a[0] - b[0]).map(([, b]) => b),
    hotRegions: { regionBytes: HOT_REGION_BYTES, top },
    time:
      entries === 0
        ? null
        : {
            first: isoTime(minUs),
            last: isoTime(maxUs),
            firstUs: minUs,
            lastUs: maxUs,
            spanMs: (maxUs - minUs) / 1000,
          },
    markCount,
    marks,
    validBytes: s.validBytes,
    fileBytes: s.fileBytes,
    ignoredTail: s.validBytes < s.fileBytes ? s.stopReason : undefined,
  };
}

/** A size for people: exact units where they divide, else one decimal. */
export function humanBytes(n: number): string {
  const exact = formatSize(n);
  if (!exact.endsWith("bytes") || n < 1024) return exact;
  for (const [unit, scale] of [
    ["GiB", 1024 ** 3],
    ["MiB", 1024 ** 2],
    ["KiB", 1024],
  ] as const) {
    if (n >= scale) return `${(n / scale).toFixed(1)} ${unit}`;
  }
  return exact;
}

/** The short name of a power-of-two bucket bound: 512, 4K, 1M, 2G. */
export function pow2Label(n: number): string {
  for (const [unit, scale] of [
    ["G", 1024 ** 3],
    ["M", 1024 ** 2],
    ["K", 1024],
  ] as const) {
    if (n >= scale) return `${n / scale}${unit}`;
  }
  return String(n);
}

export function formatStat(st: JournalStat): string {
  const lines: string[] = [];
  lines.push(`journal ${st.journal}`);
  lines.push(
    `  disk ${humanBytes(st.diskBytes)}, ${st.data ? "with data" : "hashes only"}, created ${st.created}`,
  );
  lines.push(
    `  ${st.entries} entries: ` +
      (Object.keys(st.kinds) as EntryKind[]).map((k) => `${st.kinds[k]} ${k}`).join(", ") +
      `; ${st.fua} with FUA`,
  );
  lines.push(
    `  bytes: ${st.bytes.written} written (${humanBytes(st.bytes.written)}), ` +
      `${st.bytes.zeroed} zeroed (${humanBytes(st.bytes.zeroed)}), ` +
      `${st.bytes.discarded} discarded (${humanBytes(st.bytes.discarded)})`,
  );
  if (st.time) lines.push(`  time: ${st.time.first} .. ${st.time.last} (${st.time.spanMs.toFixed(3)} ms)`);
  if (st.sizeHistogram.length > 0) {
    lines.push("  sizes (bytes):        write     zero  discard");
    for (const b of st.sizeHistogram) {
      const range = `[${pow2Label(b.fromBytes)}, ${pow2Label(b.toBytes)})`;
      lines.push(
        `    ${range.padEnd(16)} ${String(b.write).padStart(8)} ${String(b.zero).padStart(8)} ${String(b.discard).padStart(8)}`,
      );
    }
  }
  if (st.hotRegions.top.length > 0) {
    lines.push(`  hottest ${humanBytes(st.hotRegions.regionBytes)} regions by bytes written:`);
    for (const r of st.hotRegions.top) {
      lines.push(
        `    offset ${String(r.offset).padStart(14)}  ${String(r.bytesWritten).padStart(12)} bytes  ${r.writes} writes`,
      );
    }
  }
  lines.push(`  marks: ${st.markCount}`);
  for (const m of st.marks)
    lines.push(`    ${String(m.seq).padStart(8)}  ${m.time}  ${JSON.stringify(m.name)}`);
  if (st.markCount > st.marks.length) lines.push(`    ... and ${st.markCount - st.marks.length} more`);
  if (st.ignoredTail)
    lines.push(`  ignored ${st.fileBytes - st.validBytes} bytes at the end (${st.ignoredTail})`);
  return lines.join("\n") + "\n";
}

function stat(path: string, opts: { json?: boolean }): void {
  const st = analyzeJournal(path);
  process.stdout.write(opts.json ? JSON.stringify(st) + "\n" : formatStat(st));
  if (st.ignoredTail)
    process.stderr.write(
      `drivetap journal: ${path}: ignoring ${st.fileBytes - st.validBytes} bytes at the end (${st.ignoredTail})\n`,
    );
}

export function addJournalStatCommand(journal: Command): void {
  journal
    .command("stat")
    .description(
      "Summarise a journal: entries per kind, bytes, a size histogram, the hottest regions, time span, marks",
    )
    .argument("<journal>", "journal file")
    .option("--json", "one JSON object")
    .action((path: string, opts: { json?: boolean }) => runJournalAction(() => stat(path, opts)));
}
