/**
 * Backup sync=stream, the seed's mode: every write, write-zeroes and discard accepted after the job
 * starts is applied to the target with the writer's own data; the source is never read for it.
 *
 * - Ordering: the hook is serialising, so an overlapping write waits until the earlier one has ended,
 *   and a request ends only after its target write has finished (after()). Overlapping writes thus
 *   land on the target in the order they land on the source.
 * - Parallelism: the target write starts in before() and is awaited in after(), so source and target
 *   writes run at the same time; the guest is answered after both.
 * - Discards: the target must read what the source reads, and a discard may leave data behind, so a
 *   discard the source zeroes reaches the target as write-zeroes (target-op.ts has the rule).
 * - Durability: guest flushes and FUA are forwarded to the target.
 * - Divergence: if exactly one side fails, the range is marked in a dirty bitmap and repaired later by
 *   copying from the source (the only time the source is read). While the job is paused (by the user
 *   or by on-target-error=stop) writes are only marked; resume repairs them.
 * - The guest's write never fails because of the target.
 * - Cancel (not forced) repairs what is still dirty, waits for in-flight duplicates and flushes the
 *   target, so afterwards target == source.
 */
import { JournalDriver } from "../block/drivers/journal.js";
import { BlockError, toBlockError } from "../core/errors.js";
import { rangesOverlap } from "../core/ranges.js";
import { MiB } from "../core/units.js";
import type { BlockNode } from "../io/block-node.js";
import { DirtyBitmap } from "../io/dirty-bitmap.js";
import type { TrackedRequest, WriteHook } from "../io/tracked-request.js";
import { applyToTarget, isTargetOutage, sourceDiscard } from "./target-op.js";
import { BACKUP_CLUSTER_BYTES, BackupJobBase, type BackupOptions } from "./backup-common.js";

/**
 * A stream target opened without a size (a journal added without `size`) takes its source's size
 * when a stream job is about to claim it: the journal's header is written now. Returns the undo, for
 * a job that is then not started (an aborted transaction), or null when the target had a size.
 */
export function sizeStreamTarget(source: BlockNode, target: BlockNode): (() => void) | null {
  const driver = unsizedJournal(target);
  if (!driver) return null;
  driver.setSize(source.size());
  return () => driver.unsetSize();
}

/** Whether `target` waits for a stream job to give it a size (sizeStreamTarget). */
export function isUnsizedStreamTarget(target: BlockNode): boolean {
  return unsizedJournal(target) !== null;
}

function unsizedJournal(target: BlockNode): JournalDriver | null {
  const driver = target.driver;
  return driver instanceof JournalDriver && !driver.sized ? driver : null;
}

/** One repair copies at most this much. */
export const REPAIR_BYTES_MAX = 1 * MiB;
/** After a failed repair under on-target-error=ignore, wait this long before trying again. */
export const REPAIR_RETRY_MS = 1000;

interface RepairLock {
  readonly offset: number;
  readonly length: number;
  readonly done: Promise<void>;
}

export class StreamJob extends BackupJobBase {
  readonly dirty: DirtyBitmap;
  /** Target operations started in before(), awaited in after(). */
  readonly #pending = new Map<TrackedRequest, Promise<Error | undefined>>();
  /** Hooked requests between before() and the end of after(). */
  readonly #hooked = new Set<TrackedRequest>();
  #repair: RepairLock | null = null;
  #fatal: Error | null = null;
  #retryAfterMs = 0;
  #cursor = 0;
  /** The target is unreachable: writes are only recorded until its link is back (mirror.ts too). */
  #degraded = false;
  #resyncing = false;

  constructor(options: BackupOptions) {
    super(options);
    this.dirty = new DirtyBitmap(this.source.size(), BACKUP_CLUSTER_BYTES);
  }

  /** Bytes the target is known to miss. */
  get dirtyBytes(): number {
    return this.dirty.dirtyBytes;
  }

  #duplicating(): boolean {
    return !this.paused && !this.#degraded && this.#fatal === null;
  }

  get degraded(): boolean {
    return this.#degraded;
  }

  /** The range a repair is copying now, whose bits are already clear (for verify). */
  *copiesInFlight(): Iterable<{ offset: number; length: number }> {
    if (this.#repair) yield { offset: this.#repair.offset, length: this.#repair.length };
  }

  override blockJobInfo(): Record<string, unknown> {
    return { ...super.blockJobInfo(), "x-degraded": this.#degraded, "x-dirty-bytes": this.dirty.dirtyBytes };
  }

  #updateProgress(): void {
    this.progressTotal = this.progressCurrent + this.dirty.dirtyBytes;
  }

  protected override onPause(): void {
    this.wake();
  }
  protected override onResume(): void {
    this.#retryAfterMs = 0;
    this.wake();
  }

  // ---- the hook --------------------------------------------------------------------------------------

  readonly #hook: WriteHook = {
    name: `stream:${this.id}`,
    serialise: true,
    before: (req) => this.#before(req),
    after: (req, err) => this.#after(req, err),
  };

  /** Synchronous unless a repair holds the range (the common path allocates no extra promise). */
  #before(req: TrackedRequest): Promise<void> | void {
    if (req.kind === "flush") {
      if (this.#duplicating()) this.#pending.set(req, this.#targetOp(req));
      return;
    }
    if (this.#repair && rangesOverlap(this.#repair.offset, this.#repair.length, req.offset, req.length)) {
      return this.#repair.done.then(() => this.#before(req));
    }
    this.#hooked.add(req);
    const discard = req.kind === "discard" ? sourceDiscard(this.source) : null;
    if (discard === "unchanged") return; // the source keeps its data, so the target keeps its own
    if (!this.#duplicating() || discard === "unknown") {
      // A repair copies the range once this request has ended (it waits for #hooked).
      this.dirty.setRange(req.offset, req.length);
      this.#updateProgress();
      return;
    }
    this.#pending.set(req, this.#targetOp(req));
  }

  #targetOp(req: TrackedRequest): Promise<Error | undefined> {
    return applyToTarget(this.target, req, req.data);
  }

  /**
   * Not async: the request waits for its target operation (one `then` on it, which never rejects:
   * applyToTarget hands errors back as values), and a request that was not duplicated waits for
   * nothing. An async frame here cost a few hundred bytes of garbage per guest write.
   */
  #after(req: TrackedRequest, sourceError: Error | undefined): Promise<void> | void {
    const op = this.#pending.get(req);
    if (!op) {
      // Not duplicated: already marked dirty, or a discard that changed nothing.
      this.#hooked.delete(req);
      return;
    }
    this.#pending.delete(req);
    return op.then(
      (targetError) => this.#afterTarget(req, sourceError, targetError),
      (err: unknown) => {
        // Not expected (see above), but a request left in #hooked would hold every repair back.
        this.#hooked.delete(req);
        throw err;
      },
    );
  }

  #afterTarget(req: TrackedRequest, sourceError: Error | undefined, targetError: Error | undefined): void {
    try {
      if (req.kind === "flush") {
        if (targetError) this.#targetFailed(targetError);
        return;
      }
      // The target was zeroed, but the source's discard may have kept its data after all.
      const sourceKept = req.kind === "discard" && sourceDiscard(this.source) !== "zeroes";
      if (sourceError || targetError || sourceKept) {
        // One side (or both) may now differ from the other: repair from the source.
        this.dirty.setRange(req.offset, req.length);
        this.#updateProgress();
        if (targetError) this.#targetFailed(targetError);
        else this.wake();
        return;
      }
      this.progressCurrent += req.length;
      this.#updateProgress();
    } finally {
      this.#hooked.delete(req);
    }
  }

  #targetFailed(err: Error): void {
    if (isTargetOutage(this.target, err)) {
      if (!this.#degraded) {
        this.#degraded = true;
        this.#resyncing = false;
        this.log.warn({ err: err.message }, "stream target unreachable: recording what it misses");
        this.events.emit("BLOCK_JOB_DEGRADED", { type: this.type, device: this.id, reason: err.message });
      }
      this.wake();
      return;
    }
    const action = this.reportIoError("write", this.onTargetError, err);
    if (action === "report") this.#fatal = err;
    else if (action === "ignore") this.#retryAfterMs = Date.now() + REPAIR_RETRY_MS;
    this.wake();
  }

  // ---- the body --------------------------------------------------------------------------------------

  protected async run(): Promise<void> {
    const detach = this.source.addWriteHook(this.#hook);
    const unwatch = this.target.driver.link?.watch(() => this.wake());
    let forced = false;
    try {
      for (;;) {
        if (this.#fatal) throw this.#fatal;
        if (this.cancelled) {
          forced = this.forceCancelled;
          if (!forced) await this.#repairAll();
          break;
        }
        if (this.paused) {
          await this.waitForKick();
          continue;
        }
        if (this.#degraded) {
          if (this.target.driver.link?.connected === false) {
            await this.waitForKick();
            continue;
          }
          this.#degraded = false;
          this.#resyncing = true;
        }
        if (this.dirty.count > 0 && Date.now() >= this.#retryAfterMs) {
          await this.#repairOne();
          continue;
        }
        if (this.#resyncing && this.dirty.count === 0) {
          this.#resyncing = false;
          this.events.emit("BLOCK_JOB_RESYNCED", { type: this.type, device: this.id });
        }
        await this.waitForKick(this.dirty.count > 0 ? this.#retryAfterMs - Date.now() : undefined);
      }
    } finally {
      detach();
      unwatch?.();
      // Requests that started before the detach still duplicate; wait for them.
      await Promise.all([...this.#pending.values()]);
    }
    if (!forced) {
      if (this.dirty.count > 0) {
        throw new BlockError("EIO", `target still misses ${this.dirty.dirtyBytes} bytes after cancel`);
      }
      await this.target.flush();
    }
  }

  /** On a non-forced cancel: repair everything dirty, trying each range once more. */
  async #repairAll(): Promise<void> {
    let attempts = this.dirty.count + 1;
    while (this.dirty.count > 0 && attempts-- > 0 && !this.#fatal) {
      if (!(await this.#repairOne())) break;
    }
  }

  /** Copies the next dirty range from source to target. Returns false if a side failed. */
  async #repairOne(): Promise<boolean> {
    let first = this.dirty.nextSet(this.#cursor);
    if (first < 0) first = this.dirty.nextSet(0);
    if (first < 0) return true;
    let end = first + 1;
    const clustersMax = REPAIR_BYTES_MAX / this.dirty.granularity;
    while (end - first < clustersMax && end < this.dirty.clusterCount && this.dirty.get(end)) end++;
    this.#cursor = end;
    const offset = first * this.dirty.granularity;
    const length = Math.min(end * this.dirty.granularity, this.dirty.sizeBytes) - offset;

    if (!(await this.rate.take(length))) return true; // woken: re-check state first
    let unlock!: () => void;
    this.#repair = { offset, length, done: new Promise<void>((r) => (unlock = r)) };
    try {
      // Wait for writes to the range already past their before(): the source must be settled.
      for (const req of [...this.#hooked]) {
        if (rangesOverlap(req.offset, req.length, offset, length)) await req.whenEnded();
      }
      this.dirty.clearRange(offset, length);
      const buf = Buffer.allocUnsafe(length);
      try {
        await this.source.read(offset, buf);
      } catch (err) {
        this.dirty.setRange(offset, length);
        const action = this.reportIoError("read", this.onSourceError, toBlockError(err));
        if (action === "report") this.#fatal = toBlockError(err);
        else this.#retryAfterMs = Date.now() + REPAIR_RETRY_MS;
        return false;
      }
      try {
        await this.target.write(offset, [buf]);
      } catch (err) {
        this.dirty.setRange(offset, length);
        this.#targetFailed(toBlockError(err));
        return false;
      }
      this.progressCurrent += length;
      return true;
    } finally {
      this.#repair = null;
      unlock();
      this.#updateProgress();
    }
  }
}
