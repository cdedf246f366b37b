/**
 * The mirror job (blockdev-mirror / drive-mirror): copies the source to the target, driven by a dirty
 * bitmap, announces BLOCK_JOB_READY when the target is in sync, then keeps it in sync until cancelled
 * (the target stays a consistent copy) or completed (the served disk pivots onto the target).
 *
 * - Bulk phase: `sync` sets the bitmap (full: everything, top: what the source's top layer holds and
 *   the target does not already read, see top-extents.ts; none: nothing). Up to
 *   buf-size bytes of copies run at once; each copy locks its range on the source (BlockNode.lockRange:
 *   it waits for overlapping writes in flight, including their target duplicates, and holds new ones
 *   back before the hooks), so a copy never overwrites newer data on the target. Ranges the source
 *   reports as zero are written as zeroes, without reading.
 * - copy-mode write-blocking: every write, write-zeroes, discard and flush is duplicated to the target
 *   with the writer's buffers before the guest is answered, with stream's ordering (a serialising hook).
 *   Discards are not dropped: one the source zeroes reaches the target as write-zeroes, because a
 *   target may ignore a discard (target-op.ts has the rule).
 * - copy-mode background: writes only mark the bitmap until READY; after READY they are also forwarded
 *   without blocking the guest (a copy of the data), as long as the bytes in flight stay under buf-size;
 *   past that bound, or when a forward would overlap a copy or another forward, the write falls back
 *   to the bitmap.
 * - Outages: when the target is unreachable (ENOTCONN from a remote driver) the job turns degraded:
 *   writes succeed and are only recorded in the bitmap, BLOCK_JOB_DEGRADED is emitted, and when the
 *   target's link is back the job resyncs by itself and emits BLOCK_JOB_RESYNCED. Other target errors
 *   follow on-target-error.
 */
import { BlockError, toBlockError } from "../core/errors.js";
import { rangesOverlap } from "../core/ranges.js";
import { MiB } from "../core/units.js";
import { DirtyBitmap } from "../io/dirty-bitmap.js";
import type { TrackedRequest, WriteHook } from "../io/tracked-request.js";
import { applyToTarget, isTargetOutage, sourceDiscard } from "./target-op.js";
import { BackupJobBase, type BackupOptions } from "./backup-common.js";
import { forEachTopRange } from "./top-extents.js";

export type CopyMode = "background" | "write-blocking";
export type MirrorSync = "full" | "top" | "none";

export const MIRROR_GRANULARITY_DEFAULT = 64 * 1024;
export const MIRROR_BUF_SIZE_DEFAULT = 16 * MiB;
/** One copy moves at most this much. */
export const MIRROR_COPY_BYTES_MAX = 1 * MiB;
/** After a failed copy under on-*-error=ignore or stop/resume, wait this long before trying again. */
export const MIRROR_RETRY_MS = 1000;

export interface MirrorOptions extends Omit<BackupOptions, "sync" | "type"> {
  readonly sync: MirrorSync;
  readonly copyMode: CopyMode;
  readonly granularity?: number;
  readonly bufSize?: number;
  /** block-job-complete: make the served disk use the target. Called with all writes held. */
  readonly pivot?: () => Promise<void>;
  /** The job's type in events and queries ("commit" for an active commit); "mirror" by default. */
  readonly jobType?: string;
  /** Sets the initial bitmap instead of `sync` (an active commit: what the layers above the base hold). */
  readonly fillDirty?: (dirty: DirtyBitmap) => Promise<void>;
}

interface Range {
  readonly offset: number;
  readonly length: number;
  readonly done: Promise<unknown>;
}

export class MirrorJob extends BackupJobBase {
  readonly dirty: DirtyBitmap;
  readonly copyMode: CopyMode;
  readonly bufSize: number;
  readonly #mirrorSync: MirrorSync;
  readonly #pivot?: () => Promise<void>;
  readonly #fillDirty?: (dirty: DirtyBitmap) => Promise<void>;
  /** Target operations started in before(), awaited in after() (write-blocking). */
  readonly #pending = new Map<TrackedRequest, Promise<Error | undefined>>();
  readonly #copies = new Set<Range>();
  /** Background mode: writes that overlapped another in flight (never forwarded). */
  readonly #contended = new WeakSet<TrackedRequest>();
  #copyingBytes = 0;
  /** Background forwards in flight after READY. */
  readonly #forwards = new Set<Range>();
  #lagBytes = 0;
  /** The most bytes forwarded and not yet on the target at once, and writes that fell back. */
  #lagBytesMax = 0;
  #lagFallbacks = 0;
  #fatal: Error | null = null;
  #retryAfterMs = 0;
  #cursor = 0;
  #degraded = false;
  #resyncing = false;
  #completeRequested = false;
  /** Set while the served disk switches to the target: late writes on the source go to the target. */
  #pivoting = false;
  #missedBytesSinceDegraded = 0;
  #unwatchLink: (() => void) | null = null;

  constructor(options: MirrorOptions) {
    super({ ...options, sync: "full", type: options.jobType ?? "mirror" });
    this.copyMode = options.copyMode;
    this.#mirrorSync = options.sync;
    this.bufSize = options.bufSize ?? MIRROR_BUF_SIZE_DEFAULT;
    this.#pivot = options.pivot;
    this.#fillDirty = options.fillDirty;
    this.dirty = new DirtyBitmap(this.source.size(), options.granularity ?? MIRROR_GRANULARITY_DEFAULT);
  }

  get degraded(): boolean {
    return this.#degraded;
  }

  get lagBytes(): number {
    return this.#lagBytes;
  }

  /** Target writes the bitmap no longer shows: copies under way and background forwards (for verify). */
  *copiesInFlight(): Iterable<{ offset: number; length: number }> {
    for (const r of this.#copies) yield { offset: r.offset, length: r.length };
    for (const r of this.#forwards) yield { offset: r.offset, length: r.length };
  }

  #updateProgress(): void {
    this.progressTotal = this.progressCurrent + this.dirty.dirtyBytes + this.#copyingBytes;
  }

  #duplicating(): boolean {
    return !this.paused && !this.#degraded && this.#fatal === null && this.copyMode === "write-blocking";
  }

  #markDirty(offset: number, length: number): void {
    this.dirty.setRange(offset, length);
    if (this.#degraded) this.#missedBytesSinceDegraded += length;
    this.#updateProgress();
    this.wake();
  }

  protected override onPause(): void {
    this.wake();
  }
  protected override onResume(): void {
    this.#retryAfterMs = 0;
    this.wake();
  }
  protected override onComplete(): void {
    this.#completeRequested = true;
    this.wake();
  }
  /** A cancel after READY that is not forced ends like QEMU's: COMPLETED, with the target in sync. */
  protected override readonly softCancelAfterReady = true;

  override blockJobInfo(): Record<string, unknown> {
    return {
      ...super.blockJobInfo(),
      "x-copy-mode": this.copyMode,
      "x-degraded": this.#degraded,
      // What the target still misses: dirty ranges and copies not yet landed.
      "x-dirty-bytes": this.dirty.dirtyBytes + this.#copyingBytes,
      "x-lag-bytes": this.#lagBytes,
      "x-lag-bytes-max": this.#lagBytesMax,
      "x-lag-fallbacks": this.#lagFallbacks,
    };
  }

  // ---- the hook --------------------------------------------------------------------------------------

  #makeHook(): WriteHook {
    return this.copyMode === "write-blocking"
      ? {
          name: `mirror:${this.id}`,
          serialise: true,
          before: (req) => this.#before(req),
          after: (req, err) => this.#after(req, err),
        }
      : {
          name: `mirror:${this.id}`,
          before: (req) => this.#beforeBackground(req),
          after: (req, err) => this.#afterBackground(req, err),
        };
  }

  /**
   * Background mode does not serialise writes, so two overlapping writes in flight together land on
   * the source in an order nobody can see (threadpool writes may even complete out of order).
   * Forwarding them in completion order could leave the target with the other one's data: such
   * writes are never forwarded, only marked, and the copy from the source settles the range.
   */
  #beforeBackground(req: TrackedRequest): void {
    if (req.kind === "flush" || !this.ready) return;
    for (const other of this.source.inFlight()) {
      if (
        other !== req &&
        (other.kind === "write" || other.kind === "zero" || other.kind === "discard") &&
        rangesOverlap(other.offset, other.length, req.offset, req.length)
      ) {
        this.#contended.add(other);
        this.#contended.add(req);
      }
    }
  }

  #before(req: TrackedRequest): void {
    if (req.kind === "flush") {
      if (this.#duplicating()) this.#pending.set(req, this.#targetOp(req, req.data));
      return;
    }
    const discard = req.kind === "discard" ? sourceDiscard(this.source) : null;
    if (discard === "unchanged") return; // the source keeps its data, so the target keeps its own
    if (!this.#duplicating() || discard === "unknown") {
      // A copy of the range waits (lockRange) until this request has ended.
      this.#markDirty(req.offset, req.length);
      return;
    }
    this.#pending.set(req, this.#targetOp(req, req.data));
  }

  #targetOp(req: TrackedRequest, data: readonly Buffer[] | null): Promise<Error | undefined> {
    return applyToTarget(this.target, req, data);
  }

  async #after(req: TrackedRequest, sourceError: Error | undefined): Promise<void> {
    const op = this.#pending.get(req);
    if (!op) return; // not duplicated: already marked dirty
    this.#pending.delete(req);
    const targetError = await op;
    if (req.kind === "flush") {
      if (targetError) this.#targetFailed(targetError);
      return;
    }
    // The target was zeroed, but the source's discard may have kept its data after all.
    const sourceKept = req.kind === "discard" && sourceDiscard(this.source) !== "zeroes";
    if (sourceError || targetError || sourceKept) {
      // One side (or both) may now differ from the other: copy again from the source.
      this.#markDirty(req.offset, req.length);
      if (targetError) this.#targetFailed(targetError);
      return;
    }
    this.progressCurrent += req.length;
    this.#updateProgress();
  }

  /** Background mode: the source write is done; forward it (bounded) or remember it. */
  #afterBackground(req: TrackedRequest, sourceError: Error | undefined): Promise<void> | void {
    if (this.#pivoting) {
      // The target is the served disk now: this write must reach it before the guest is answered.
      return this.#targetOp(req, req.data).then((err) => {
        if (err) throw err;
      });
    }
    if (req.kind === "flush") {
      if (this.ready && !this.#degraded && !this.paused) void this.target.flush().catch(() => undefined);
      return;
    }
    // The source's discard is done: what it left decides (target-op.ts).
    const discard = req.kind === "discard" && !sourceError ? sourceDiscard(this.source) : null;
    if (discard === "unchanged") return;
    const canForward =
      discard !== "unknown" &&
      !sourceError &&
      !this.#contended.has(req) &&
      this.ready &&
      !this.#degraded &&
      !this.paused &&
      this.#fatal === null &&
      this.#lagBytes + req.length <= this.bufSize &&
      !overlapsAny(this.#copies, req.offset, req.length) &&
      !overlapsAny(this.#forwards, req.offset, req.length);
    if (!canForward) {
      if (this.ready && !this.#degraded) this.#lagFallbacks++;
      this.#markDirty(req.offset, req.length);
      return;
    }
    // The guest's buffers are reused once it is answered: forward a copy.
    const data = req.kind === "write" ? [Buffer.concat(req.data as Buffer[])] : null;
    const length = req.length;
    this.#lagBytes += length;
    this.#lagBytesMax = Math.max(this.#lagBytesMax, this.#lagBytes);
    const range: Range = {
      offset: req.offset,
      length,
      done: this.#targetOp(req, data).then((err) => {
        this.#forwards.delete(range);
        this.#lagBytes -= length;
        if (err) {
          this.#markDirty(req.offset, length);
          this.#targetFailed(err);
        } else {
          this.progressCurrent += length;
          this.#updateProgress();
        }
      }),
    };
    this.#forwards.add(range);
  }

  #targetFailed(err: Error): void {
    if (isTargetOutage(this.target, err)) {
      this.#enterDegraded(err);
      return;
    }
    const action = this.reportIoError("write", this.onTargetError, err);
    if (action === "report") this.#fatal = err;
    else if (action === "ignore") this.#retryAfterMs = Date.now() + MIRROR_RETRY_MS;
    this.wake();
  }

  #enterDegraded(err: Error): void {
    if (this.#degraded) return;
    this.#degraded = true;
    this.#resyncing = false;
    this.#missedBytesSinceDegraded = 0;
    this.log.warn({ err: err.message }, "mirror target unreachable: recording what it misses");
    this.events.emit("BLOCK_JOB_DEGRADED", { type: this.type, device: this.id, reason: err.message });
    this.wake();
  }

  // ---- the body --------------------------------------------------------------------------------------

  protected async run(): Promise<void> {
    await this.#initialBitmap();
    const detach = this.source.addWriteHook(this.#makeHook());
    const link = this.target.driver.link;
    this.#unwatchLink = link ? link.watch(() => this.wake()) : null;
    try {
      await this.#loop();
    } finally {
      detach();
      this.#unwatchLink?.();
      // Requests that started before the detach still duplicate; wait for them and for copies.
      await Promise.all([...this.#pending.values()]);
      await Promise.all([...this.#copies, ...this.#forwards].map((r) => r.done));
    }
  }

  async #initialBitmap(): Promise<void> {
    if (this.#fillDirty) await this.#fillDirty(this.dirty);
    else if (this.#mirrorSync === "full") this.dirty.setAll();
    else if (this.#mirrorSync === "top") {
      await forEachTopRange(this.source, this.target, (offset, length) =>
        this.dirty.setRange(offset, length),
      );
    }
    this.#updateProgress();
  }

  async #loop(): Promise<void> {
    for (;;) {
      if (this.#fatal) throw this.#fatal;
      if (this.cancelled) {
        if (this.softCancelled) await this.#finishInSync();
        return;
      }
      if (this.paused) {
        await this.waitForKick();
        continue;
      }
      if (this.#degraded) {
        const link = this.target.driver.link;
        if (link && !link.connected) {
          await this.waitForKick();
          continue;
        }
        // Back (or a local target: try again): resync what was missed.
        this.#degraded = false;
        this.#resyncing = true;
        this.log.info({ missedBytes: this.#missedBytesSinceDegraded }, "mirror target reachable: resyncing");
      }
      if (this.dirty.count > 0 && Date.now() >= this.#retryAfterMs) {
        const room = this.#copyingBytes === 0 || this.#copyingBytes + this.#copyBytesMax() <= this.bufSize;
        if (room && this.#startCopy()) continue;
      }
      if (this.dirty.count === 0 && this.#copies.size === 0) {
        if (this.#resyncing) {
          this.#resyncing = false;
          this.events.emit("BLOCK_JOB_RESYNCED", {
            type: this.type,
            device: this.id,
            "missed-bytes": this.#missedBytesSinceDegraded,
          });
        }
        if (!this.ready) this.becomeReady();
        if (this.#completeRequested) {
          if (await this.#pivotNow()) return;
          continue;
        }
      }
      await this.waitForKick(this.dirty.count > 0 ? Math.max(this.#retryAfterMs - Date.now(), 1) : undefined);
    }
  }

  /** One copy's size: 1 MiB, or less when buf-size is smaller (at least one granule). */
  #copyBytesMax(): number {
    return Math.max(Math.min(MIRROR_COPY_BYTES_MAX, this.bufSize), this.dirty.granularity);
  }

  /** Picks the next dirty run, clears it, and copies it in the background. False if nothing to pick. */
  #startCopy(): boolean {
    let first = this.dirty.nextSet(this.#cursor);
    if (first < 0) first = this.dirty.nextSet(0);
    if (first < 0) return false;
    const clustersMax = Math.max(1, Math.floor(this.#copyBytesMax() / this.dirty.granularity));
    let end = first + 1;
    while (end - first < clustersMax && end < this.dirty.clusterCount && this.dirty.get(end)) end++;
    this.#cursor = end;
    const offset = first * this.dirty.granularity;
    const length = Math.min(end * this.dirty.granularity, this.dirty.sizeBytes) - offset;
    this.dirty.clearRange(offset, length);
    this.#copyingBytes += length;
    const range: Range = {
      offset,
      length,
      done: this.#copy(offset, length).finally(() => {
        this.#copies.delete(range);
        this.#copyingBytes -= length;
        this.#updateProgress();
        this.wake();
      }),
    };
    this.#copies.add(range);
    return true;
  }

  /** Copies one range under a source range lock; on failure the range is dirty again. */
  async #copy(offset: number, length: number, locked = false): Promise<boolean> {
    if (!(await this.rate.take(length))) {
      this.dirty.setRange(offset, length);
      return false;
    }
    const unlock = locked ? null : await this.source.lockRange(offset, length);
    let pooled: Buffer | null = null;
    try {
      // Background forwards to the range must land before the copy does.
      for (const f of [...this.#forwards]) {
        if (rangesOverlap(f.offset, f.length, offset, length)) await f.done;
      }
      let zero = false;
      try {
        const [first] = await this.source.blockStatus(offset, length);
        zero = first.zero && first.offset <= offset && first.offset + first.length >= offset + length;
      } catch {
        zero = false;
      }
      let buf: Buffer | null = null;
      if (!zero) {
        if (length <= this.#copyBytesMax()) {
          pooled = this.#copyBuffers.pop() ?? Buffer.allocUnsafeSlow(this.#copyBytesMax());
          buf = pooled.subarray(0, length);
        } else {
          buf = Buffer.allocUnsafe(length);
        }
        try {
          await this.source.read(offset, buf);
        } catch (err) {
          this.dirty.setRange(offset, length);
          const e = toBlockError(err);
          const action = this.reportIoError("read", this.onSourceError, e);
          if (action === "report") this.#fatal = e;
          else this.#retryAfterMs = Date.now() + MIRROR_RETRY_MS;
          return false;
        }
      }
      try {
        if (buf) await this.target.write(offset, [buf]);
        else await this.target.writeZeroes(offset, length, { mayTrim: true });
      } catch (err) {
        this.#markDirty(offset, length);
        this.#targetFailed(toBlockError(err));
        return false;
      }
      this.progressCurrent += length;
      return true;
    } finally {
      unlock?.();
      if (pooled) this.#copyBuffers.push(pooled);
    }
  }

  /**
   * Copy buffers are recycled: a fresh 1 MiB buffer per copy made the daemon's RSS grow past 200 MiB
   * during a 1 GiB bulk copy (the GC frees external memory late). At most buf-size is in use at once.
   */
  readonly #copyBuffers: Buffer[] = [];

  /**
   * Holds every write, copies what is still dirty, flushes the target, then (complete) pivots.
   * Returns false if the target failed meanwhile (the job goes on and tries again).
   */
  async #pivotNow(): Promise<boolean> {
    const unlock = await this.source.lockRange(0, this.source.size());
    try {
      if (!(await this.#copyRemaining())) return false;
      await this.target.flush();
      this.#pivoting = true;
      await this.#pivot?.();
    } catch (err) {
      this.#pivoting = false;
      this.#targetFailed(toBlockError(err));
      return false;
    } finally {
      unlock();
    }
    // Writes that queued on the source behind the lock still pass our hook, which sends them to the
    // target; new ones go to the target directly.
    for (const req of [...this.source.inFlight()]) {
      if (req.kind !== "read" && req.kind !== "block-status" && req.kind !== "cache") await req.whenEnded();
    }
    return true;
  }

  /** Cancel after READY: the target ends as a consistent copy of the source. */
  async #finishInSync(): Promise<void> {
    // Copies first: one still waiting for its range lock would queue behind the whole-disk lock
    // while #copyRemaining waits for it.
    await Promise.all([...this.#copies].map((r) => r.done));
    const unlock = await this.source.lockRange(0, this.source.size());
    try {
      if (!(await this.#copyRemaining())) {
        throw new BlockError("EIO", `target still misses ${this.dirty.dirtyBytes} bytes after cancel`);
      }
    } finally {
      unlock();
    }
  }

  /** With all writes held: copies every dirty range, trying each once. */
  async #copyRemaining(): Promise<boolean> {
    await Promise.all([...this.#copies, ...this.#forwards].map((r) => r.done));
    while (this.dirty.count > 0) {
      if (this.#degraded || this.#fatal) return false;
      const first = this.dirty.nextSet(0);
      const [offset, length] = this.dirty.rangeOf(first);
      this.dirty.clearRange(offset, length);
      if (!(await this.#copy(offset, length, true))) return false;
    }
    this.#updateProgress();
    return true;
  }
}

function overlapsAny(ranges: ReadonlySet<Range>, offset: number, length: number): boolean {
  for (const r of ranges) if (rangesOverlap(r.offset, r.length, offset, length)) return true;
  return false;
}
