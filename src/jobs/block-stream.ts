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
 * Errors follow on-error (chain-copy.ts).
 */
import type { BlockDriver } from "../block/driver.js";
import type { Qcow2Driver } from "../block/drivers/qcow2/qcow2.js";
import type { BlockNode } from "../io/block-node.js";
import { ChainCopyJob, heldRuns, step, type ChainCopyOptions } from "./chain-copy.js";

export interface BlockStreamOptions extends Omit<ChainCopyOptions, "type" | "sizeBytes" | "flushBefore"> {
  /** The image streamed into (guest writes reach it through this node). */
  readonly top: BlockNode;
  /** Top's qcow2 driver; null when top has no backing (nothing to stream: the job just completes). */
  readonly topDriver: Qcow2Driver | null;
  /** The layers below top, down to the base, the base not included: what is copied up. */
  readonly layers: readonly BlockDriver[];
}

export class BlockStreamJob extends ChainCopyJob {
  readonly top: BlockNode;
  readonly #topDriver: Qcow2Driver | null;
  readonly #layers: readonly BlockDriver[];

  constructor(o: BlockStreamOptions) {
    super({ ...o, type: "stream", sizeBytes: o.top.size(), flushBefore: () => o.top.flush() });
    this.top = o.top;
    this.#topDriver = o.topDriver;
    this.#layers = o.layers;
  }

  /** One range under the lock: what top does not hold and the layers below do is copied up. */
  protected async copyStep(offset: number, length: number): Promise<void> {
    const topDriver = this.#topDriver;
    if (topDriver === null) return;
    const unlock = await this.top.lockRange(offset, length);
    try {
      for (let pos = offset; pos < offset + length;) {
        const here = await topDriver.allocatedHere(pos, offset + length - pos);
        if (!here.allocated) {
          for (const run of await heldRuns(this.#layers, pos, here.bytes)) {
            const buf = this.buffer.subarray(0, run.length);
            // Top does not hold the range, so its read shows the layers below.
            await step("read", topDriver.pread(run.offset, buf));
            await topDriver.pwrite(run.offset, [buf], {});
          }
        }
        pos += here.bytes;
      }
    } finally {
      unlock();
    }
  }
}
