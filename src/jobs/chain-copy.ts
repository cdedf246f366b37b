/**
 * What block-stream and block-commit share: which clusters the layers of a backing chain hold
 * (QEMU's bdrv_is_allocated_above), and the job that walks the disk in steps under QEMU's on-error
 * policy, then relinks the chain at finalize.
 */
import type { BlockDriver } from "../block/driver.js";
import { Qcow2Driver } from "../block/drivers/qcow2/qcow2.js";
import { type BlockError, toBlockError } from "../core/errors.js";
import { Job, type ErrorAction, type JobOptions } from "./job.js";

/** Stream and commit copy at most this much per step (and hold a guest range lock at most this long). */
export const CHAIN_COPY_BYTES_MAX = 1024 * 1024;

/**
 * Whether some layer of `layers` (top first) holds [offset, ...), and for how many bytes (up to
 * `length`) the answer holds. A qcow2 layer holds what it has allocated (data or zero clusters); a
 * layer without backing (raw) holds what its block status says is not a hole. Past a layer's end
 * counts as held: the layer above reads zeros there, which dropping the layer must keep.
 */
export async function allocatedInLayers(
  layers: readonly BlockDriver[],
  offset: number,
  length: number,
): Promise<{ allocated: boolean; bytes: number }> {
  let bytes = length;
  for (const layer of layers) {
    if (offset >= layer.size()) return { allocated: true, bytes };
    bytes = Math.min(bytes, layer.size() - offset);
    const here = await allocatedIn(layer, offset, bytes);
    if (here.allocated) return here;
    bytes = here.bytes;
  }
  return { allocated: false, bytes };
}

async function allocatedIn(
  layer: BlockDriver,
  offset: number,
  length: number,
): Promise<{ allocated: boolean; bytes: number }> {
  if (layer instanceof Qcow2Driver) return layer.allocatedHere(offset, length);
  const [first] = await layer.blockStatus(offset, length);
  if (first === undefined) return { allocated: true, bytes: length };
  const bytes = Math.max(Math.min(first.offset + first.length - offset, length), 1);
  return { allocated: !first.hole, bytes };
}

/**
 * The runs of [offset, offset + length) that `layers` hold: what a stream or commit must copy there.
 */
export async function heldRuns(
  layers: readonly BlockDriver[],
  offset: number,
  length: number,
): Promise<Array<{ offset: number; length: number }>> {
  const out: Array<{ offset: number; length: number }> = [];
  for (let pos = offset; pos < offset + length;) {
    const r = await allocatedInLayers(layers, pos, offset + length - pos);
    if (r.allocated) {
      const last = out[out.length - 1];
      if (last && last.offset + last.length === pos) last.length += r.bytes;
      else out.push({ offset: pos, length: r.bytes });
    }
    pos += r.bytes;
  }
  return out;
}

/** A failed step, with the side that failed (BLOCK_JOB_ERROR's operation). */
export class StepError extends Error {
  constructor(
    readonly operation: "read" | "write",
    readonly error: BlockError,
  ) {
    super(error.message);
  }
}

/** Runs `p`, turning its failure into a StepError of `operation`. */
export async function step<V>(operation: "read" | "write", p: Promise<V>): Promise<V> {
  try {
    return await p;
  } catch (err) {
    throw new StepError(operation, toBlockError(err));
  }
}

export interface ChainCopyOptions extends JobOptions {
  /** The disk's size: steps cover [0, sizeBytes). */
  readonly sizeBytes: number;
  readonly onError?: ErrorAction;
  /** On success, at finalize, after `flushBefore`: the chain changes (the graph's work). */
  readonly relink: () => Promise<void>;
  readonly flushBefore: () => Promise<void>;
  /** Once at the end, whatever the outcome: the graph lets go of the nodes. */
  readonly release: () => void;
}

/**
 * Stream and commit: the disk in steps of CHAIN_COPY_BYTES_MAX, paced by speed. Errors follow
 * on-error as in QEMU's stream and commit: report ends the job, stop pauses it and retries the step
 * on resume, ignore goes on but the job still fails at the end (the chain stays as it was).
 */
export abstract class ChainCopyJob extends Job {
  readonly #sizeBytes: number;
  readonly #onError: ErrorAction;
  readonly #relink: () => Promise<void>;
  readonly #flushBefore: () => Promise<void>;
  readonly #release: () => void;
  /** One step at a time, so one buffer serves every copy. */
  protected readonly buffer = Buffer.allocUnsafe(CHAIN_COPY_BYTES_MAX);

  constructor(o: ChainCopyOptions) {
    super(o);
    this.#sizeBytes = o.sizeBytes;
    this.#onError = o.onError ?? "report";
    this.#relink = o.relink;
    this.#flushBefore = o.flushBefore;
    this.#release = o.release;
  }

  /** Copies what [offset, offset + length) needs; throws a StepError (or anything: a write error). */
  protected abstract copyStep(offset: number, length: number): Promise<void>;

  protected async run(): Promise<void> {
    const size = this.#sizeBytes;
    this.progressTotal = size;
    let ignored: BlockError | null = null;
    for (let pos = 0; pos < size;) {
      if (await this.pausePoint()) return;
      const n = Math.min(CHAIN_COPY_BYTES_MAX, size - pos);
      if (!(await this.rate.take(n))) continue; // woken by pause or cancel: look again
      try {
        await this.copyStep(pos, n);
      } catch (err) {
        const e = err instanceof StepError ? err : new StepError("write", toBlockError(err));
        const action = this.reportIoError(e.operation, this.#onError, e.error);
        if (action === "report") throw e.error;
        if (action === "stop") continue; // paused: the same step again after resume
        ignored ??= e.error;
      }
      pos += n;
      this.progressCurrent += n;
    }
    if (ignored) throw ignored;
  }

  protected override onCancel(): void {
    this.rate.wake();
  }

  protected override async onFinalize(success: boolean): Promise<void> {
    try {
      if (success) {
        await this.#flushBefore();
        await this.#relink();
      }
    } finally {
      this.#release();
    }
  }
}
