/**
 * `drivetap journal report J -o report.html`: one self-contained HTML page (inline CSS and script, no
 * network, no files beside it) with a heatmap of bytes written by disk offset and time, a timeline of
 * flushes, FUA writes and marks on the same time axis, and the size histogram of `journal stat`.
 *
 * The journal is reduced here to fixed-size grids (HEATMAP_TIME_BINS x HEATMAP_OFFSET_BINS), so the
 * page stays small whatever the journal's length; the page only draws them, on canvases. The drawing
 * code is a real function of this module (type-checked against the DOM), embedded with
 * Function.prototype.toString, so it must use nothing from outside its own body.
 *
 * The page reports how drawing went on <html data-report>: "ok" once every chart is drawn, or
 * "error: ..." from window.onerror or console.error. Tests read it back from a headless browser.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import type { Command } from "commander";
import { runJournalAction, scanOrFail } from "./journal-common.js";
import { analyzeJournal, type JournalStat } from "./journal-stat.js";

export const HEATMAP_TIME_BINS = 240;
export const HEATMAP_OFFSET_BINS = 128;

export interface ReportData {
  readonly title: string;
  readonly stat: JournalStat;
  readonly timeBins: number;
  readonly offsetBins: number;
  /** Wall-clock µs of the first time bin's start; the bins cover [t0Us, t0Us + spanUs]. */
  readonly t0Us: number;
  readonly spanUs: number;
  /** Bytes written (writes and write-zeroes) per cell, row-major by time bin: cells[t * offsetBins + o]. */
  readonly cells: number[];
  /** Discarded bytes per cell, same layout. */
  readonly discardCells: number[];
  readonly flushBins: number[];
  readonly fuaBins: number[];
}

/** Reduces a journal to the report's grids (two scans: the first finds the time span). */
export function buildReportData(journal: string): ReportData {
  const stat = analyzeJournal(journal);
  const T = HEATMAP_TIME_BINS;
  const O = HEATMAP_OFFSET_BINS;
  const cells = new Array<number>(T * O).fill(0);
  const discardCells = new Array<number>(T * O).fill(0);
  const flushBins = new Array<number>(T).fill(0);
  const fuaBins = new Array<number>(T).fill(0);
  const t0Us = stat.time?.firstUs ?? 0;
  const spanUs = stat.time ? stat.time.lastUs - stat.time.firstUs : 0;
  const disk = Math.max(1, stat.diskBytes);
  const binBytes = disk / O;
  const timeBin = (us: number): number =>
    spanUs === 0 ? 0 : Math.min(T - 1, Math.max(0, Math.floor(((us - t0Us) / spanUs) * T)));
  scanOrFail(journal, (e) => {
    const t = timeBin(e.wallUs);
    if (e.kind === "flush") flushBins[t]++;
    if (e.fua) fuaBins[t]++;
    if (e.kind !== "write" && e.kind !== "zero" && e.kind !== "discard") return;
    const grid = e.kind === "discard" ? discardCells : cells;
    const end = Math.min(e.offset + e.length, disk);
    for (let o = Math.floor(e.offset / binBytes); o < O && o * binBytes < end; o++) {
      const from = Math.max(e.offset, o * binBytes);
      const to = Math.min(end, (o + 1) * binBytes);
      if (to > from) grid[t * O + o] += to - from;
    }
  });
  return {
    title: `Journal report: ${path.basename(journal)}`,
    stat,
    timeBins: T,
    offsetBins: O,
    t0Us,
    spanUs,
    cells: cells.map((v) => Math.round(v)),
    discardCells: discardCells.map((v) => Math.round(v)),
    flushBins,
    fuaBins,
  };
}

function escapeHtml(s: string): string {
  return s.replace(
    /[&<>"']/g,
    (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c] ?? c,
  );
}

/** JSON that is safe inside a <script> element (a mark name may hold "</script>"). */
function scriptJson(v: unknown): string {
  return JSON.stringify(v)
    .replace(/</g, "\\u003c")
    .replace(/>/g, "\\u003e")
    .replace(/&/g, "\\u0026")
    .replace(/\u2028/g, "\\u2028")
    .replace(/\u2029/g, "\\u2029");
}

// ---- the page's drawing code (runs in the browser) --------------------------------------------------

function renderReport(): void {
  const root = document.documentElement;
  const fail = (msg: string): void => {
    root.dataset.report = `error: ${msg}`;
  };
  window.addEventListener("error", (ev) => fail(String(ev.message)));
  const consoleError = console.error.bind(console);
  console.error = (...args: unknown[]) => {
    fail(args.map(String).join(" "));
    consoleError(...args);
  };

  const el = document.getElementById("report-data");
  if (!el || !el.textContent) throw new Error("report data missing");
  const d = JSON.parse(el.textContent) as ReportData;
  const st = d.stat;

  const units: [string, number][] = [
    ["T", 1024 ** 4],
    ["G", 1024 ** 3],
    ["M", 1024 ** 2],
    ["K", 1024],
  ];
  const bytesLabel = (n: number): string => {
    for (const [u, s] of units) {
      if (n >= s) {
        const v = n / s;
        return `${Number.isInteger(v) ? v : v.toFixed(1)}${u}`;
      }
    }
    return `${Math.round(n)}`;
  };
  /** "10.0 MiB", "512 B": for the summary and the legend. */
  const bytesLong = (n: number): string => {
    const s = bytesLabel(n);
    return /[KMGT]$/.test(s) ? `${s}iB` : `${s} B`;
  };
  const timeLabel = (us: number): string => {
    if (us === 0) return "0";
    if (us < 1000) return `${us.toFixed(0)} µs`;
    if (us < 1e6) return `${(us / 1000).toFixed(us < 1e4 ? 2 : 1)} ms`;
    return `${(us / 1e6).toFixed(us < 1e7 ? 2 : 1)} s`;
  };

  // Summary line.
  const summary = document.getElementById("summary");
  if (summary) {
    const k = st.kinds;
    summary.textContent =
      `${st.entries} entries (${k.write} writes, ${k.zero} write-zeroes, ${k.discard} discards, ` +
      `${k.flush} flushes, ${k.mark} marks) · ${bytesLong(st.bytes.written)} written, ` +
      `${bytesLong(st.bytes.zeroed)} zeroed, ${bytesLong(st.bytes.discarded)} discarded · disk ` +
      `${bytesLong(st.diskBytes)} · ` +
      (st.time ? `${st.time.first} .. ${st.time.last} (${timeLabel(d.spanUs)})` : "no entries");
  }

  const canvas = (id: string): CanvasRenderingContext2D => {
    const c = document.getElementById(id) as HTMLCanvasElement | null;
    const ctx = c?.getContext("2d");
    if (!c || !ctx) throw new Error(`no canvas ${id}`);
    ctx.font = "12px sans-serif";
    ctx.fillStyle = "#fff";
    ctx.fillRect(0, 0, c.width, c.height);
    return ctx;
  };

  /** A canvas and its plot area (the canvas less the axis margins). */
  const plotArea = (id: string, top: number, bottom: number) => {
    const ctx = canvas(id);
    const W = ctx.canvas.width;
    const H = ctx.canvas.height;
    return { ctx, W, H, pw: W - left - right, ph: H - top - bottom };
  };
  // One plot area for the heatmap and the timeline, so their time axes line up.
  const left = 70;
  const right = 110;

  // A perceptual ramp (dark blue -> teal -> yellow) for log(bytes).
  const stops: [number, number, number][] = [
    [68, 1, 84],
    [59, 82, 139],
    [33, 145, 140],
    [94, 201, 98],
    [253, 231, 37],
  ];
  const ramp = (x: number): string => {
    const p = Math.max(0, Math.min(1, x)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(p));
    const f = p - i;
    const c = stops[i].map((v, j) => Math.round(v + (stops[i + 1][j] - v) * f));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  };

  const timeTicks = (ctx: CanvasRenderingContext2D, x0: number, w: number, y: number): void => {
    ctx.fillStyle = "#333";
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let i = 0; i <= 6; i++) {
      const x = x0 + (w * i) / 6;
      ctx.fillRect(x, y, 1, 4);
      ctx.fillText(timeLabel((d.spanUs * i) / 6), x, y + 6);
    }
  };

  // ---- heatmap
  {
    const top = 10;
    const bottom = 44;
    const { ctx, H, pw, ph } = plotArea("heatmap", top, bottom);
    ctx.fillStyle = "#f2f2f2";
    ctx.fillRect(left, top, pw, ph);
    let max = 0;
    for (const v of d.cells) if (v > max) max = v;
    const cw = pw / d.timeBins;
    const ch = ph / d.offsetBins;
    for (let t = 0; t < d.timeBins; t++) {
      for (let o = 0; o < d.offsetBins; o++) {
        const v = d.cells[t * d.offsetBins + o];
        const dv = d.discardCells[t * d.offsetBins + o];
        if (v > 0) {
          ctx.fillStyle = ramp(Math.log1p(v) / Math.log1p(max));
          ctx.fillRect(left + t * cw, top + o * ch, Math.max(cw, 1), Math.max(ch, 1));
        } else if (dv > 0) {
          ctx.fillStyle = "#e8a0a0";
          ctx.fillRect(left + t * cw, top + o * ch, Math.max(cw, 1), Math.max(ch, 1));
        }
      }
    }
    ctx.strokeStyle = "#999";
    ctx.strokeRect(left + 0.5, top + 0.5, pw, ph);
    // y axis: disk offset, 0 at the top
    ctx.fillStyle = "#333";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = top + (ph * i) / 4;
      ctx.fillRect(left - 4, y, 4, 1);
      ctx.fillText(bytesLabel((st.diskBytes * i) / 4), left - 6, y);
    }
    ctx.save();
    ctx.translate(14, top + ph / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "center";
    ctx.fillText("disk offset (bytes)", 0, 0);
    ctx.restore();
    timeTicks(ctx, left, pw, top + ph);
    ctx.textAlign = "center";
    ctx.fillText("time since the first entry", left + pw / 2, H - 14);
    // legend: colour bar
    const lx = left + pw + 24;
    const lh = ph - 60;
    for (let i = 0; i < lh; i++) {
      ctx.fillStyle = ramp(1 - i / lh);
      ctx.fillRect(lx, top + i, 16, 1);
    }
    ctx.fillStyle = "#333";
    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillText(bytesLong(max), lx + 20, top);
    ctx.textBaseline = "bottom";
    ctx.fillText("1 B", lx + 20, top + lh);
    ctx.fillStyle = "#e8a0a0";
    ctx.fillRect(lx, top + lh + 14, 16, 10);
    ctx.fillStyle = "#333";
    ctx.textBaseline = "top";
    ctx.fillText("discard", lx + 20, top + lh + 12);
    ctx.fillText("bytes/cell", lx - 4, top + lh + 34);
  }

  // ---- timeline: flushes, FUA, marks
  {
    const ctx = canvas("timeline");
    const W = ctx.canvas.width;
    const H = ctx.canvas.height;
    const pw = W - left - right;
    const rows: [string, number[] | null, string][] = [
      ["flush", d.flushBins, "#1f5fbf"],
      ["FUA", d.fuaBins, "#c27c0e"],
      ["mark", null, "#b0203a"],
    ];
    const rowH = 22;
    const top = 8;
    const cw = pw / d.timeBins;
    rows.forEach(([name, bins, colour], r) => {
      const y = top + r * rowH;
      ctx.fillStyle = "#333";
      ctx.textAlign = "right";
      ctx.textBaseline = "middle";
      ctx.fillText(name, left - 6, y + rowH / 2);
      ctx.fillStyle = "#f2f2f2";
      ctx.fillRect(left, y + 2, pw, rowH - 4);
      ctx.fillStyle = colour;
      if (bins) {
        let max = 0;
        for (const v of bins) if (v > max) max = v;
        bins.forEach((v, t) => {
          if (v === 0) return;
          const h = 4 + ((rowH - 8) * v) / max;
          ctx.fillRect(left + t * cw, y + rowH / 2 - h / 2, Math.max(cw - 0.5, 1.5), h);
        });
      } else {
        ctx.textAlign = "left";
        ctx.textBaseline = "middle";
        let lastLabelEnd = -Infinity;
        for (const m of st.marks) {
          const x = left + (d.spanUs === 0 ? 0 : ((m.wallUs - d.t0Us) / d.spanUs) * pw);
          ctx.fillRect(x, y + 2, 2, rowH - 4);
          const w = ctx.measureText(m.name).width;
          if (x + 4 > lastLabelEnd && x + 4 + w < left + pw) {
            ctx.fillText(m.name, x + 4, y + rowH / 2);
            lastLabelEnd = x + 4 + w + 6;
          }
        }
      }
    });
    const axisY = top + rows.length * rowH + 2;
    timeTicks(ctx, left, pw, axisY);
    ctx.textAlign = "center";
    ctx.fillText("time since the first entry", left + pw / 2, H - 14);
  }

  // ---- size histogram: stacked bars per power-of-two bucket
  {
    const top = 12;
    const bottom = 44;
    const { ctx, H, pw, ph } = plotArea("histogram", top, bottom);
    const h = st.sizeHistogram;
    const kinds: ["write" | "zero" | "discard", string][] = [
      ["write", "#2a6fb0"],
      ["zero", "#7fb86a"],
      ["discard", "#e8a0a0"],
    ];
    let max = 0;
    for (const b of h) max = Math.max(max, b.write + b.zero + b.discard);
    ctx.strokeStyle = "#999";
    ctx.strokeRect(left + 0.5, top + 0.5, pw, ph);
    ctx.fillStyle = "#333";
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = top + ph - (ph * i) / 4;
      ctx.fillRect(left - 4, y, 4, 1);
      ctx.fillText(String(Math.round((max * i) / 4)), left - 6, y);
    }
    ctx.save();
    ctx.translate(14, top + ph / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "center";
    ctx.fillText("entries", 0, 0);
    ctx.restore();
    const slot = h.length > 0 ? pw / h.length : pw;
    h.forEach((b, i) => {
      let y = top + ph;
      for (const [k, colour] of kinds) {
        const bh = max === 0 ? 0 : (ph * b[k]) / max;
        ctx.fillStyle = colour;
        ctx.fillRect(left + i * slot + slot * 0.15, y - bh, slot * 0.7, bh);
        y -= bh;
      }
      ctx.fillStyle = "#333";
      ctx.textAlign = "center";
      ctx.textBaseline = "top";
      ctx.fillText(
        `${bytesLabel(b.fromBytes)}–${bytesLabel(b.toBytes)}`,
        left + (i + 0.5) * slot,
        top + ph + 6,
      );
    });
    if (h.length === 0) {
      ctx.textAlign = "center";
      ctx.fillText("no writes, zeroes or discards", left + pw / 2, top + ph / 2);
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    ctx.fillStyle = "#333";
    ctx.fillText("request size (bytes, power-of-two buckets)", left + pw / 2, H - 18);
    kinds.forEach(([k, colour], i) => {
      const y = top + 6 + i * 18;
      ctx.fillStyle = colour;
      ctx.fillRect(left + pw + 16, y, 14, 12);
      ctx.fillStyle = "#333";
      ctx.textAlign = "left";
      ctx.fillText(k, left + pw + 36, y);
    });
  }

  if (!root.dataset.report) root.dataset.report = "ok";
}

const CSS = `
body { font: 13px/1.4 system-ui, sans-serif; margin: 12px 20px; color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 2px; }
h2 { font-size: 14px; margin: 10px 0 2px; }
#summary, .sub { color: #555; margin: 0; }
canvas { display: block; }
`;

export function renderReportHtml(data: ReportData): string {
  const title = escapeHtml(data.title);
  return `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'">
<title>${title}</title>
<style>${CSS}</style>
</head>
<body>
<h1>${title}</h1>
<p class="sub">${escapeHtml(data.stat.journal)}</p>
<p id="summary"></p>
<h2>Writes by disk offset and time (bytes written per cell; discards in pink)</h2>
<canvas id="heatmap" width="1150" height="330"></canvas>
<h2>Flushes, FUA writes and marks</h2>
<canvas id="timeline" width="1150" height="112"></canvas>
<h2>Request sizes</h2>
<canvas id="histogram" width="1150" height="220"></canvas>
<noscript>This report draws its charts with JavaScript.</noscript>
<script type="application/json" id="report-data">${scriptJson(data)}</script>
<script>
(${renderReport.toString()})();
</script>
</body>
</html>
`;
}

function report(journal: string, opts: { output: string }): void {
  const data = buildReportData(journal);
  fs.writeFileSync(opts.output, renderReportHtml(data));
  const st = data.stat;
  if (st.ignoredTail)
    process.stderr.write(
      `drivetap journal: ${journal}: ignoring ${st.fileBytes - st.validBytes} bytes at the end (${st.ignoredTail})\n`,
    );
  process.stdout.write(`drivetap journal: wrote ${opts.output} (${data.stat.entries} entries)\n`);
}

export function addJournalReportCommand(journal: Command): void {
  journal
    .command("report")
    .description(
      "Write a self-contained HTML page: a heatmap of writes (offset x time), a size histogram and a timeline of flushes and marks",
    )
    .argument("<journal>", "journal file")
    .requiredOption("-o, --output <file>", "the HTML file to write")
    .action((journal: string, opts: { output: string }) => runJournalAction(() => report(journal, opts)));
}
