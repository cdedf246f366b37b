/**
 * block-stream: copies into an image (`top`) every cluster the layers below it hold, down to the base
 * (not included), so that the image no longer needs them; at finalize the image's backing becomes the
 * base (or none) and the layers between are dropped (the graph does that: `relink`).
 *
 * A guest write wins. Each step takes a range lock on top's node (overlapping guest writes in flight
 * end first, later ones wait), then looks at what top holds *under the lock* and copies only what it
 * does not: a cluster the guest wrote, zeroed or discarded since the job started is top's own, and is
 * never overwritten with older data from below. The copy goes to top's driver directly, under the
 * lock: it changes nothing the guest can read, so hooks (bitmaps, other jobs) have nothing to see.
 *
 * Errors follow on-error as in QEMU's stream: report ends the job, stop pauses it and retries the
 * range on resume, ignore goes on but the job still fails at the end (the chain stays as it was).
 */
import type { BlockDriver } from "../block/driver.js";
import type { Qcow2Driver } from "../block/drivers/qcow2/qcow2.js";
import { BlockError, toBlockError } from "../core/errors.js";
import type { BlockNode } from "../io/block-node.js";
import { CHAIN_COPY_BYTES_MAX, heldRuns } from "./chain-copy.js";
import { Job, type ErrorAction, type JobOptions } from "./job.js";

export interface BlockStreamOptions extends Omit<JobOptions, "type"> {
  /** The image streamed into (guest writes reach it through this node). */
  readonly top: BlockNode;
  /** Top's qcow2 driver; null when top has no backing (nothing to stream: the job just completes). */
  readonly topDriver: Qcow2Driver | null;
  /** The layers below top, down to the base, the base not included: what is copied up. */
  readonly layers: readonly BlockDriver[];
  readonly onError?: ErrorAction;
  /** On success, at finalize: top's backing becomes the base (the graph's work). */
  readonly relink: () => Promise<void>;
  /** Once at the end, whatever the outcome: the graph lets go of the nodes. */
  readonly release: () => void;
}

/** A failed step, with the side that failed (BLOCK_JOB_ERROR's operation). */
class StepError extends Error {
  constructor(
    readonly operation: "read" | "write",
    readonly error: BlockError,
  ) {
    super(error.message);
  }
}

export class BlockStreamJob extends Job {
  readonly top: BlockNode;
  readonly #topDriver: Qcow2Driver | null;
  readonly #layers: readonly BlockDriver[];
  readonly #onError: ErrorAction;
  readonly #relink: () => Promise<void>;
  readonly #release: () => void;
  readonly #buffer = Buffer.allocUnsafe(CHAIN_COPY_BYTES_MAX);

  constructor(o: BlockStreamOptions) {
    super({ ...o, type: "stream" });
    this.top = o.top;
    this.#topDriver = o.topDriver;
    this.#layers = o.layers;
    this.#onError = o.onError ?? "report";
    this.#relink = o.relink;
    this.#release = o.release;
  }

  protected async run(): Promise<void> {
    const size = this.top.size();
    this.progressTotal = size;
    let ignored: BlockError | null = null;
    for (let pos = 0; pos < size;) {
      if (await this.pausePoint()) return;
      if (this.#topDriver === null) {
        this.progressCurrent = size;
        break;
      }
      const n = Math.min(CHAIN_COPY_BYTES_MAX, size - pos);
      if (!(await this.rate.take(n))) continue; // woken by pause or cancel: look again
      try {
        await this.#copyStep(pos, n);
      } catch (err) {
        const e = err instanceof StepError ? err : new StepError("write", toBlockError(err));
        const action = this.reportIoError(e.operation, this.#onError, e.error);
        if (action === "report") throw e.error;
        if (action === "stop") continue; // paused: the same range again after resume
        ignored ??= e.error;
      }
      pos += n;
      this.progressCurrent += n;
    }
    if (ignored) throw ignored;
  }

  /** One range under the lock: what top does not hold and the layers below do is copied up. */
  async #copyStep(offset: number, length: number): Promise<void> {
    const topDriver = this.#topDriver!;
    const unlock = await this.top.lockRange(offset, length);
    try {
      for (let pos = offset; pos < offset + length;) {
        const here = await topDriver.allocatedHere(pos, offset + length - pos);
        if (!here.allocated) {
          for (const run of await heldRuns(this.#layers, pos, here.bytes)) {
            const buf = this.#buffer.subarray(0, run.length);
            // Top does not hold the range, so its read shows the layers below.
            await topDriver.pread(run.offset, buf).catch((err: unknown) => {
              throw new StepError("read", toBlockError(err));
            });
            await topDriver.pwrite(run.offset, [buf], {});
          }
        }
        pos += here.bytes;
      }
    } finally {
      unlock();
    }
  }

  protected override onCancel(): void {
    this.rate.wake();
  }

  protected override async onFinalize(success: boolean): Promise<void> {
    try {
      if (success) {
        await this.top.flush();
        await this.#relink();
      }
    } finally {
      this.#release();
    }
  }
}
