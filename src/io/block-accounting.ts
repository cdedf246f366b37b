/**
 * QEMU-style block accounting for query-blockstats, next to the node's plain counters (NodeStats):
 * total time per kind of request, failed and invalid counts, the highest offset written and when
 * the last request ended. "Failed" means the driver or a hook failed the request; "invalid" means the
 * node refused it before it started (out of range, read-only, closed), QEMU's two classes.
 * Write-zeroes count as writes for times and failures, as QEMU's devices account them.
 */
import { performance } from "node:perf_hooks";

export type AcctKind = "read" | "write" | "flush" | "discard";

export interface AcctCounters {
  totalTimeNs: number;
  failed: number;
  invalid: number;
}

function counters(): AcctCounters {
  return { totalTimeNs: 0, failed: 0, invalid: 0 };
}

const NS_PER_MS = 1e6;

export class BlockAccounting {
  readonly read = counters();
  readonly write = counters();
  readonly flush = counters();
  readonly discard = counters();
  /** End of the highest write or write-zeroes that succeeded (QEMU's wr_highest_offset). */
  writeHighestOffset = 0;
  #lastEndMs: number | undefined;

  /** A start time to hand back to done() or failed(). */
  static now(): number {
    return performance.now();
  }

  done(kind: AcctKind, startMs: number): void {
    const end = performance.now();
    this[kind].totalTimeNs += Math.round((end - startMs) * NS_PER_MS);
    this.#lastEndMs = end;
  }

  failed(kind: AcctKind, startMs: number): void {
    this[kind].failed++;
    this.done(kind, startMs);
  }

  invalid(kind: AcctKind): void {
    this[kind].invalid++;
  }

  wrote(end: number): void {
    if (end > this.writeHighestOffset) this.writeHighestOffset = end;
  }

  /** Nanoseconds since the last request ended; undefined before the first (QEMU omits it then). */
  idleTimeNs(): number | undefined {
    return this.#lastEndMs === undefined
      ? undefined
      : Math.round((performance.now() - this.#lastEndMs) * NS_PER_MS);
  }
}
