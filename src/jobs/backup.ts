/**
 * Backup sync=full, top and none: a point-in-time copy of the source as it was when the job started,
 * made with copy-before-write (CBW).
 *
 * - full: a background loop copies every cluster; holes are written as zeroes.
 * - top: like full, but only the source's top layer: clusters its top layer does not allocate (read
 *   from its backing image, which a sync=top target shares) are skipped, and so are its holes where
 *   the target already reads zeros (top-extents.ts). A zero cluster over backing data is copied as
 *   zeros.
 * - none: no background copy. Before a cluster of the source is first changed after the start (write,
 *   write-zeroes or discard), its old contents are copied to the target. So the target ends holding,
 *   for every cluster overwritten since the start, the data it had at the start, and nothing else.
 *   Together with the source it gives the point-in-time image; on its own it is the set of old blocks.
 *   The job runs until cancelled.
 *
 * CBW: a before-write hook copies each not-yet-copied cluster of the request's range before the
 * request reaches the source driver. A cluster being copied (by the hook or the background loop) is
 * locked: others wait for that copy. Requests already in flight when the job starts are waited for
 * before any copy, so the snapshot is the state after them.
 *
 * - bitmap (and QEMU's incremental): like full, but only the clusters dirty in the named bitmap when
 *   the job starts are copied (and copied before write); the rest counts as done.
 *
 * With a bitmap (sync=bitmap, or full/top with one), the bitmap keeps recording during the job; the job
 * also records the writes since its start. At the end, per bitmap-mode (on-success: if the job
 * succeeded; always; never), every cluster the job copied and nobody wrote since the start is cleared,
 * so the bitmap then holds exactly what the next incremental backup must copy.
 *
 * Errors: a failed CBW copy breaks the snapshot, so the job fails (the guest's write still succeeds).
 * Background copy errors follow on-source-error / on-target-error: report fails the job, stop pauses
 * it and retries the cluster on resume, ignore retries later.
 */
import { toBlockError } from "../core/errors.js";
import { DirtyBitmap } from "../io/dirty-bitmap.js";
import type { NamedBitmap } from "../io/named-bitmaps.js";
import type { TrackedRequest, WriteHook } from "../io/tracked-request.js";
import { BACKUP_CLUSTER_BYTES, BackupJobBase, type BackupOptions, type BitmapMode } from "./backup-common.js";
import { forEachTopRange } from "./top-extents.js";

export const BACKGROUND_RETRY_MS = 1000;

export class CbwBackupJob extends BackupJobBase {
  /** Set bit: the cluster needs no more copying (copied, or skipped by sync=top). */
  readonly done: DirtyBitmap;
  readonly #inProgress = new Map<number, Promise<void>>();
  #startBarrier: Promise<unknown> = Promise.resolve();
  #broken: Error | null = null;
  readonly #bitmap: NamedBitmap | null;
  readonly #bitmapMode: BitmapMode;
  /** The bitmap's clusters when the job started (sync=bitmap copies these). */
  #toCopy: DirtyBitmap | null = null;
  /** What was written since the job started, at the bitmap's granularity. */
  #since: DirtyBitmap | null = null;

  constructor(options: BackupOptions) {
    super(options);
    this.done = new DirtyBitmap(this.source.size(), BACKUP_CLUSTER_BYTES);
    this.#bitmap = options.bitmap ?? null;
    this.#bitmapMode = options.bitmapMode ?? "on-success";
  }

  /** Takes the bitmap's point in time; runs in the same synchronous step as attaching the hook. */
  #startBitmap(): void {
    const bm = this.#bitmap;
    if (!bm) return;
    this.#since = new DirtyBitmap(bm.bits.sizeBytes, bm.bits.granularity);
    bm.followers.add(this.#since);
    if (this.sync !== "bitmap") return;
    const toCopy = (this.#toCopy = bm.bits.clone());
    this.done.setAll();
    for (let c = toCopy.nextSet(0); c >= 0; c = toCopy.nextSet(c + 1)) {
      const [offset, length] = toCopy.rangeOf(c);
      this.done.clearRange(offset, length);
    }
  }

  /** Clears from the bitmap what the job copied and nobody wrote since, if bitmap-mode says so. */
  async #finishBitmap(success: boolean): Promise<void> {
    const bm = this.#bitmap;
    const since = this.#since;
    if (!bm || !since) return;
    bm.followers.delete(since);
    if (this.#bitmapMode === "never" || (this.#bitmapMode === "on-success" && !success)) return;
    const bits = bm.bits;
    const candidates = this.#toCopy ?? bits.clone();
    for (let c = candidates.nextSet(0); c >= 0; c = candidates.nextSet(c + 1)) {
      const [offset, length] = bits.rangeOf(c);
      if (!since.get(c) && this.done.allSet(offset, length)) bits.clear(c);
    }
    await bm.changed(0, bits.clusterCount);
  }

  protected override async onFinalize(success: boolean): Promise<void> {
    try {
      await this.#finishBitmap(success);
    } finally {
      await super.onFinalize(success);
    }
  }

  readonly #hook: WriteHook = {
    name: `backup-cbw:${this.id}`,
    before: (req) => this.#beforeWrite(req),
  };

  async #beforeWrite(req: TrackedRequest): Promise<void> {
    if (req.kind === "flush" || this.#broken) return;
    await this.#startBarrier;
    const [first, end] = this.done.clustersOf(req.offset, req.length);
    try {
      for (let c = first; c < end; c++) await this.#copyCluster(c, false);
    } catch (err) {
      // The old data is lost for this snapshot: fail the job, never the guest's write.
      this.#broken ??= toBlockError(err);
      this.reportIoError("write", "report", this.#broken);
      this.wake();
    }
  }

  /** Copies one cluster unless done; concurrent callers share the copy in progress. */
  async #copyCluster(c: number, background: boolean): Promise<void> {
    for (;;) {
      if (this.done.get(c)) return;
      const running = this.#inProgress.get(c);
      if (!running) break;
      await running.catch(() => undefined);
    }
    const copy = (async () => {
      const [offset, length] = this.done.rangeOf(c);
      let zero = false;
      if (background) {
        const extents = await this.source.blockStatus(offset, length);
        zero = extents.every((x) => x.zero) && extents.reduce((n, x) => n + x.length, 0) >= length;
      }
      if (zero) {
        await this.target.writeZeroes(offset, length, { mayTrim: true });
      } else {
        const buf = Buffer.allocUnsafe(length);
        await this.source.read(offset, buf);
        await this.target.write(offset, [buf]);
      }
      this.done.set(c);
      this.progressCurrent += length;
    })();
    this.#inProgress.set(c, copy);
    try {
      await copy;
    } finally {
      this.#inProgress.delete(c);
    }
  }

  protected async run(): Promise<void> {
    const earlier = [...this.source.inFlight()].filter((r) => r.kind !== "read" && r.kind !== "block-status");
    const detach = this.source.addWriteHook(this.#hook);
    this.#startBitmap();
    this.#startBarrier = Promise.all(earlier.map((r) => r.whenEnded()));
    try {
      await this.#startBarrier;
      if (this.sync === "top") await this.#skipUnallocated();
      // QEMU's len: the disk for full and none (none copies only what is overwritten, but QEMU counts
      // the whole disk as the job's extent), what is left to copy after top's skip and bitmap's choice.
      this.progressTotal =
        this.sync === "none" ? this.done.sizeBytes : this.done.sizeBytes - this.done.dirtyBytes;
      if (this.sync === "none") await this.#waitForCancel();
      else await this.#backgroundCopy();
      if (this.#broken) throw this.#broken;
    } finally {
      detach();
      await Promise.all([...this.#inProgress.values()].map((p) => p.catch(() => undefined)));
    }
    if (this.sync === "none" && this.cancelled && !this.forceCancelled) await this.target.flush();
  }

  /** sync=top: marks done every cluster the target need not receive (see top-extents.ts). */
  async #skipUnallocated(): Promise<void> {
    const needed = new DirtyBitmap(this.done.sizeBytes, this.done.granularity);
    await forEachTopRange(this.source, this.target, (offset, length) => needed.setRange(offset, length));
    for (let c = 0; c < this.done.clusterCount; c++) if (!needed.get(c)) this.done.set(c);
  }

  async #waitForCancel(): Promise<void> {
    while (!this.cancelled && !this.#broken) await this.waitForKick();
  }

  async #backgroundCopy(): Promise<void> {
    let c = 0;
    while (c < this.done.clusterCount) {
      if (await this.pausePoint()) return;
      if (this.#broken) return;
      if (this.done.get(c)) {
        c++;
        continue;
      }
      const [, length] = this.done.rangeOf(c);
      if (!(await this.rate.take(length))) continue;
      try {
        await this.#copyCluster(c, true);
        c++;
      } catch (err) {
        const e = toBlockError(err);
        // Which side failed: a read error mentions the source only if the source read threw.
        const sourceSide = await this.#sourceReadable(c);
        const action = this.reportIoError(
          sourceSide ? "write" : "read",
          sourceSide ? this.onTargetError : this.onSourceError,
          e,
        );
        if (action === "report") throw e;
        if (action === "ignore") await new Promise((r) => setTimeout(r, BACKGROUND_RETRY_MS));
        // "stop" paused the job: pausePoint() waits for resume, then the cluster is retried.
      }
    }
  }

  async #sourceReadable(c: number): Promise<boolean> {
    const [offset, length] = this.done.rangeOf(c);
    try {
      await this.source.read(offset, Buffer.allocUnsafe(length));
      return true;
    } catch {
      return false;
    }
  }
}
