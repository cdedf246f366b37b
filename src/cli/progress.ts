/**
 * Human output for jobs: byte counts, a progress line, and a reporter that redraws one line on a
 * terminal and, on anything else (a log, a pipe), prints a plain line at most once per interval so logs
 * stay short.
 */

const UNITS = ["KiB", "MiB", "GiB", "TiB"] as const;

/** 512 -> "512 B", 1536 -> "1.5 KiB", 16 MiB -> "16.0 MiB". */
export function formatBytes(bytes: number): string {
  if (bytes < 1024) return `${bytes} B`;
  let value = bytes;
  let unit = "B";
  for (const u of UNITS) {
    if (value < 1024) break;
    value /= 1024;
    unit = u;
  }
  return `${value.toFixed(1)} ${unit}`;
}

/** Whole percent, rounded down so 100% means done; 0 while the length is unknown. */
export function percent(offset: number, len: number): number {
  if (len <= 0) return 0;
  return Math.min(100, Math.floor((offset * 100) / len));
}

export interface ProgressSample {
  readonly offset: number;
  readonly len: number;
  readonly status: string;
  readonly ioStatus: string;
}

/** Non-TTY output: at most one line per this interval (plus the final one). */
export const PLAIN_LINE_INTERVAL_MS = 1_000;
const BAR_WIDTH_MAX = 30;
const TEXT_ROOM = 48;

export class ProgressReporter {
  readonly #out: NodeJS.WriteStream;
  readonly #label: string;
  readonly #tty: boolean;
  readonly #startMs = Date.now();
  #lastPlainMs = -Infinity;
  #lastText = "";
  #drawn = false;

  constructor(out: NodeJS.WriteStream, label: string) {
    this.#out = out;
    this.#label = label;
    this.#tty = out.isTTY === true;
  }

  #describe(s: ProgressSample): string {
    const elapsedS = (Date.now() - this.#startMs) / 1000;
    const rate = elapsedS > 0.5 ? `, ${formatBytes(Math.round(s.offset / elapsedS))}/s` : "";
    let text = `${percent(s.offset, s.len)}% ${formatBytes(s.offset)} of ${formatBytes(s.len)}${rate}`;
    if (s.status !== "running" && s.status !== "concluded") text += ` (${s.status})`;
    if (s.ioStatus !== "ok") text += ` io-status ${s.ioStatus}`;
    return text;
  }

  /** Shows a new sample; `force` prints even when a plain line was printed less than a second ago. */
  update(s: ProgressSample, force = false): void {
    const text = this.#describe(s);
    if (this.#tty) {
      const columns = this.#out.columns || 80;
      const head = `${this.#label} `;
      // Room for the longest usual text, so the bar keeps its width as the rate appears.
      const width = Math.min(BAR_WIDTH_MAX, columns - head.length - Math.max(text.length, TEXT_ROOM) - 4);
      let line = head;
      if (width >= 10) {
        const filled = Math.round((percent(s.offset, s.len) * width) / 100);
        line += `[${"#".repeat(filled)}${".".repeat(width - filled)}] `;
      }
      line += text;
      this.#out.write(`\r${line.slice(0, columns - 1)}\x1b[K`);
      this.#drawn = true;
      return;
    }
    const now = Date.now();
    if (!force && (now - this.#lastPlainMs < PLAIN_LINE_INTERVAL_MS || text === this.#lastText)) return;
    this.#lastPlainMs = now;
    this.#lastText = text;
    this.#out.write(`${this.#label} ${text}\n`);
  }

  /** Ends the redrawn line so that later output starts on a line of its own. */
  finish(): void {
    if (this.#tty && this.#drawn) this.#out.write("\n");
    this.#drawn = false;
  }
}
