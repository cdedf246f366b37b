/**
 * block-commit: merges the layers from `top` down to the base (not included) into the base.
 *
 * - Intermediate commit (top is below the active layer): nothing the guest writes reaches these
 *   layers, and everything copied lands in the base under clusters some layer above it still holds,
 *   so the copy changes nothing anyone reads and needs no lock. At finalize the layer above top gets
 *   the base as its backing and the layers between are dropped (the graph does that: `relink`); the
 *   job completes by itself.
 * - Active commit (top is the active layer, the one exports use): a mirror from top to the base, whose
 *   bitmap starts with what the layers above the base hold. BLOCK_JOB_READY once the base is in sync,
 *   guest writes mirrored meanwhile, and block-job-complete pivots the exports to the base (the
 *   mirror's machinery, jobs/mirror.ts, with the type "commit").
 */
import type { BlockDriver } from "../block/driver.js";
import type { BlockNode } from "../io/block-node.js";
import type { DirtyBitmap } from "../io/dirty-bitmap.js";
import { ChainCopyJob, heldRuns, step, type ChainCopyOptions } from "./chain-copy.js";
import { MirrorJob, type MirrorOptions } from "./mirror.js";

export interface CommitOptions extends Omit<ChainCopyOptions, "type" | "sizeBytes" | "flushBefore"> {
  /** Top's driver: reads through it show the layers' data where they hold it. */
  readonly top: BlockDriver;
  /** From top down to the base, the base not included: what is merged. */
  readonly layers: readonly BlockDriver[];
  readonly base: BlockNode;
}

export class CommitJob extends ChainCopyJob {
  readonly base: BlockNode;
  readonly #top: BlockDriver;
  readonly #layers: readonly BlockDriver[];

  constructor(o: CommitOptions) {
    super({ ...o, type: "commit", sizeBytes: o.top.size(), flushBefore: () => o.base.flush() });
    this.base = o.base;
    this.#top = o.top;
    this.#layers = o.layers;
  }

  protected async copyStep(offset: number, length: number): Promise<void> {
    for (const run of await heldRuns(this.#layers, offset, length)) {
      const buf = this.buffer.subarray(0, run.length);
      await step("read", this.#top.pread(run.offset, buf));
      await this.base.write(run.offset, [buf]);
    }
  }
}

/** An active commit: the mirror from the active layer to the base, starting from what the layers hold. */
export function activeCommitJob(
  o: Omit<MirrorOptions, "sync" | "copyMode" | "jobType" | "fillDirty"> & {
    readonly layers: readonly BlockDriver[];
  },
): MirrorJob {
  return new MirrorJob({
    ...o,
    sync: "top",
    copyMode: "background",
    jobType: "commit",
    fillDirty: async (dirty: DirtyBitmap) => {
      for (const run of await heldRuns(o.layers, 0, o.source.size())) dirty.setRange(run.offset, run.length);
    },
  });
}
