/**
 * The request path. Every I/O to a served disk enters a BlockNode, which:
 *   checks bounds -> registers a TrackedRequest -> waits for overlapping serialising requests ->
 *   runs before-write hooks -> calls the driver (emulating write-zeroes and FUA where it cannot) ->
 *   runs after-write hooks -> ends the tracked request.
 * It can drain (wait for everything in flight) and counts I/O. Jobs see and duplicate writes through
 * hooks; they never patch drivers. A range lock (lockRange) holds writes to a range out, for a caller
 * that must see both a node and a hook's copy of it settled (verify). A drained section (drained,
 * QEMU's bdrv_drained_begin/end) holds every new request back until what is in flight has ended and
 * the section's work is done: resize runs in one.
 */
import { BlockError, toBlockError } from "../core/errors.js";
import { rangesOverlap } from "../core/ranges.js";
import { MiB } from "../core/units.js";
import type { BlockDriver, Extent, WriteFlags, ZeroFlags } from "../block/driver.js";
import { BlockAccounting, type AcctKind } from "./block-accounting.js";
import { TrackedRequest, type HookedKind, type RequestKind, type WriteHook } from "./tracked-request.js";

/** Emulated write-zeroes writes this much at a time from one shared, never-written zero buffer. */
export const ZERO_EMULATION_BYTES = 1 * MiB;
const ZERO_BUFFER: Buffer = Buffer.alloc(ZERO_EMULATION_BYTES);

export interface NodeStats {
  readOps: number;
  readBytes: number;
  writeOps: number;
  writeBytes: number;
  zeroOps: number;
  zeroBytes: number;
  discardOps: number;
  discardBytes: number;
  flushOps: number;
  blockStatusOps: number;
  failedOps: number;
}

export interface BlockNodeOptions {
  readonly readOnly?: boolean;
}

const NO_FLAGS: ZeroFlags = Object.freeze({});

/** The accounting class of each request kind (none for block status and cache, as in QEMU). */
const ACCT_KIND: Readonly<Record<RequestKind, AcctKind | null>> = {
  read: "read",
  write: "write",
  zero: "write",
  discard: "discard",
  flush: "flush",
  "block-status": null,
  cache: null,
};
/** A settled promise to hand back when there is nothing to wait for. */
const DONE: Promise<void> = Promise.resolve();

/** A held lockRange. Its id comes from the request counter: it orders the lock among requests. */
interface RangeLock {
  readonly id: number;
  readonly offset: number;
  readonly length: number;
  readonly released: Promise<void>;
}

export class BlockNode {
  readonly name: string;
  readonly driver: BlockDriver;
  readonly readOnly: boolean;
  readonly stats: NodeStats = {
    readOps: 0,
    readBytes: 0,
    writeOps: 0,
    writeBytes: 0,
    zeroOps: 0,
    zeroBytes: 0,
    discardOps: 0,
    discardBytes: 0,
    flushOps: 0,
    blockStatusOps: 0,
    failedOps: 0,
  };
  /** Times, failed and invalid counts for query-blockstats. */
  readonly acct = new BlockAccounting();
  readonly #inFlight = new Set<TrackedRequest>();
  /** Set while a drained section runs: new requests wait for it. */
  #drained: Promise<void> | null = null;
  #hooks: readonly WriteHook[] = [];
  #serialiseWrites = false;
  #serialisingInFlight = 0;
  #nextId = 1;
  #drainWaiters: Array<() => void> = [];
  readonly #rangeLocks = new Set<RangeLock>();
  #closed = false;

  constructor(name: string, driver: BlockDriver, options: BlockNodeOptions = {}) {
    this.name = name;
    this.driver = driver;
    this.readOnly = options.readOnly ?? false;
  }

  size(): number {
    return this.driver.size();
  }

  get inFlightCount(): number {
    return this.#inFlight.size;
  }

  /** The requests in flight now, oldest first (for jobs that must wait on a range). */
  inFlight(): IterableIterator<TrackedRequest> {
    return this.#inFlight.values();
  }

  /** Attaches a hook; returns the function that detaches it. */
  addWriteHook(hook: WriteHook): () => void {
    this.#hooks = [...this.#hooks, hook];
    this.#serialiseWrites = this.#hooks.some((h) => h.serialise);
    return () => {
      this.#hooks = this.#hooks.filter((h) => h !== hook);
      this.#serialiseWrites = this.#hooks.some((h) => h.serialise);
    };
  }

  get hookCount(): number {
    return this.#hooks.length;
  }

  // ---- the public I/O verbs ------------------------------------------------------------------------

  /** Not async, as write(): one `then` on the driver's promise instead of an async frame. */
  read(offset: number, into: Buffer): Promise<void> {
    if (this.#drained) return this.#drained.then(() => this.read(offset, into));
    try {
      this.#checkRange("read", offset, into.length);
    } catch (err) {
      return Promise.reject(err);
    }
    const req = this.#begin("read", offset, into.length, null, NO_FLAGS, false);
    const t0 = BlockAccounting.now();
    let p: Promise<void>;
    try {
      p = this.driver.pread(offset, into);
    } catch (err) {
      p = Promise.reject(err);
    }
    return p.then(
      () => {
        this.stats.readOps++;
        this.stats.readBytes += into.length;
        this.acct.done("read", t0);
        this.#end(req);
      },
      (err: unknown) => {
        this.acct.failed("read", t0);
        const failed = this.#failed(err);
        this.#end(req);
        throw failed;
      },
    );
  }

  /**
   * Not async: the write path is the hot one, and each async layer costs a promise and a microtask per
   * write (a stream job puts two nodes on the path). Errors still come back as rejections.
   */
  write(offset: number, data: readonly Buffer[], flags: WriteFlags = NO_FLAGS): Promise<void> {
    if (this.#drained) return this.#drained.then(() => this.write(offset, data, flags));
    let length = 0;
    for (const b of data) length += b.length;
    try {
      this.#checkRange("write", offset, length);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.#mutate("write", offset, length, data, flags);
  }

  writeZeroes(offset: number, length: number, flags: ZeroFlags = NO_FLAGS): Promise<void> {
    if (this.#drained) return this.#drained.then(() => this.writeZeroes(offset, length, flags));
    try {
      this.#checkRange("zero", offset, length);
    } catch (err) {
      return Promise.reject(err);
    }
    return this.#mutate("zero", offset, length, null, flags);
  }

  async discard(offset: number, length: number, flags: WriteFlags = NO_FLAGS): Promise<void> {
    while (this.#drained) await this.#drained;
    this.#checkRange("discard", offset, length);
    await this.#mutate("discard", offset, length, null, flags);
  }

  async flush(): Promise<void> {
    while (this.#drained) await this.#drained;
    try {
      this.#checkOpen();
    } catch (err) {
      this.acct.invalid("flush");
      throw err;
    }
    await this.#mutate("flush", 0, 0, null, NO_FLAGS);
  }

  /** Extents from offset, clamped to the disk's end; at least one, covering offset. */
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    while (this.#drained) await this.#drained;
    this.#checkOpen();
    const size = this.size();
    if (
      !Number.isSafeInteger(offset) ||
      !Number.isSafeInteger(length) ||
      offset < 0 ||
      length <= 0 ||
      offset >= size
    ) {
      throw new BlockError(
        "EINVAL",
        `block status out of range: offset ${offset} length ${length} size ${size}`,
      );
    }
    const clamped = Math.min(length, size - offset);
    const req = this.#begin("block-status", offset, clamped, null, NO_FLAGS, false);
    try {
      this.stats.blockStatusOps++;
      const extents = await this.driver.blockStatus(offset, clamped);
      return extents.length > 0 ? extents : [{ offset, length: clamped, hole: false, zero: false }];
    } catch (err) {
      throw this.#failed(err);
    } finally {
      this.#end(req);
    }
  }

  /** Advisory prefetch; validates the range and reads it through the driver into scratch memory. */
  async cache(offset: number, length: number): Promise<void> {
    while (this.#drained) await this.#drained;
    this.#checkRange("cache", offset, length);
    const req = this.#begin("cache", offset, length, null, NO_FLAGS, false);
    try {
      const scratch = Buffer.allocUnsafe(Math.min(length, ZERO_EMULATION_BYTES));
      for (let pos = offset; pos < offset + length; pos += scratch.length) {
        const n = Math.min(scratch.length, offset + length - pos);
        await this.driver.pread(pos, n === scratch.length ? scratch : scratch.subarray(0, n));
      }
    } catch (err) {
      throw this.#failed(err);
    } finally {
      this.#end(req);
    }
  }

  /**
   * Locks [offset, offset + length) against writes, write-zeroes and discards. Resolves once every
   * overlapping one that began earlier has ended (after its hooks' after(), so a job's copy of it has
   * landed too) and every earlier overlapping lock is released. Overlapping ones that begin later wait,
   * before their hooks run, until the returned function is called. Reads and flushes never wait.
   * Earlier/later is by request id, so a lock and a write never wait for each other.
   */
  async lockRange(offset: number, length: number): Promise<() => void> {
    while (this.#drained) await this.#drained;
    this.#checkRange("read", offset, length);
    if (length === 0) throw new BlockError("EINVAL", "cannot lock an empty range");
    let release!: () => void;
    const lock: RangeLock = {
      id: this.#nextId++,
      offset,
      length,
      released: new Promise<void>((resolve) => (release = resolve)),
    };
    const earlierLocks = [...this.#rangeLocks];
    const earlierWrites = [...this.#inFlight];
    this.#rangeLocks.add(lock);
    let held = true;
    const unlock = (): void => {
      if (!held) return;
      held = false;
      this.#rangeLocks.delete(lock);
      release();
    };
    for (const other of earlierLocks) {
      if (rangesOverlap(other.offset, other.length, offset, length)) await other.released;
    }
    for (const req of earlierWrites) {
      if (
        (req.kind === "write" || req.kind === "zero" || req.kind === "discard") &&
        rangesOverlap(req.offset, req.length, offset, length)
      )
        await req.whenEnded();
    }
    return unlock;
  }

  get rangeLockCount(): number {
    return this.#rangeLocks.size;
  }

  /** Resolves when nothing is in flight. Requests started meanwhile are waited for too. */
  drain(): Promise<void> {
    if (this.#inFlight.size === 0) return Promise.resolve();
    return new Promise((resolve) => this.#drainWaiters.push(resolve));
  }

  /**
   * Runs `work` with the node drained: requests that arrive meanwhile wait (before their bounds are
   * checked, so they see the node as `work` left it), and `work` starts once everything in flight has
   * ended. One section at a time. Nothing holding a range lock may call it (the lock's owner could
   * wait on the section while the section waits on the writes queued behind the lock).
   */
  async drained<T>(work: () => Promise<T>): Promise<T> {
    while (this.#drained) await this.#drained;
    let end!: () => void;
    this.#drained = new Promise<void>((resolve) => (end = resolve));
    try {
      await this.drain();
      return await work();
    } finally {
      this.#drained = null;
      end();
    }
  }

  /**
   * block_resize: grows or shrinks the disk in a drained section, so no request runs against the
   * old size while it changes. Dirty bitmaps and exports are the caller's (the graph's) business.
   */
  async resize(sizeBytes: number): Promise<void> {
    this.#checkOpen();
    if (this.readOnly) throw new BlockError("EPERM", "Image is read-only");
    const driver = this.driver;
    if (!driver.resize) throw new BlockError("ENOTSUP", "Image format driver does not support resize");
    await this.drained(() => driver.resize!(sizeBytes));
  }

  /**
   * Drains, then closes the driver. Later requests fail with ESHUTDOWN, and so do requests a driver
   * still holds back (a throttle's queue): at a low limit they could keep the drain waiting for long.
   */
  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    this.driver.abortQueued?.();
    await this.drain();
    await this.driver.close();
  }

  // ---- the path --------------------------------------------------------------------------------------

  #checkOpen(): void {
    if (this.#closed) throw new BlockError("ESHUTDOWN", `node ${this.name} is closed`);
  }

  #checkRange(kind: RequestKind, offset: number, length: number): void {
    try {
      this.#checkRangeOf(kind, offset, length);
    } catch (err) {
      const acct = ACCT_KIND[kind];
      if (acct) this.acct.invalid(acct);
      throw err;
    }
  }

  #checkRangeOf(kind: RequestKind, offset: number, length: number): void {
    this.#checkOpen();
    if (kind !== "read" && kind !== "cache" && this.readOnly) {
      throw new BlockError("EPERM", `node ${this.name} is read-only`);
    }
    // An offset past 2^53 (the wire carries 64 bits) is still just past the end: only the length
    // must be exact.
    if (!Number.isInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0) {
      throw new BlockError("EINVAL", `bad range: offset ${offset} length ${length}`);
    }
    const size = this.size();
    if (offset + length > size) {
      // The NBD spec's choice: ENOSPC for writes past the end, EINVAL for everything else.
      const code = kind === "write" || kind === "zero" ? "ENOSPC" : "EINVAL";
      throw new BlockError(
        code,
        `${kind} beyond end of disk: offset ${offset} length ${length} size ${size}`,
      );
    }
  }

  #begin(
    kind: RequestKind,
    offset: number,
    length: number,
    data: readonly Buffer[] | null,
    flags: ZeroFlags,
    serialising: boolean,
  ): TrackedRequest {
    const req = new TrackedRequest(this.#nextId++, kind, offset, length, data, flags, serialising);
    this.#inFlight.add(req);
    if (serialising) this.#serialisingInFlight++;
    return req;
  }

  #end(req: TrackedRequest): void {
    this.#inFlight.delete(req);
    if (req.serialising) this.#serialisingInFlight--;
    req.end();
    if (this.#inFlight.size === 0 && this.#drainWaiters.length > 0) {
      const waiters = this.#drainWaiters;
      this.#drainWaiters = [];
      for (const w of waiters) w();
    }
  }

  #failed(err: unknown): BlockError {
    this.stats.failedOps++;
    return toBlockError(err);
  }

  /**
   * The first earlier, overlapping write that must serialise with `req`, or null. Synchronous, so a
   * write that overlaps nothing (the common case) costs no promise.
   */
  #firstOverlap(req: TrackedRequest): TrackedRequest | null {
    for (const other of this.#inFlight) {
      if (other === req) return null;
      if (
        other.kind === "read" ||
        other.kind === "block-status" ||
        other.kind === "cache" ||
        other.kind === "flush"
      )
        continue;
      if (!(other.serialising || req.serialising)) continue;
      if (rangesOverlap(other.offset, other.length, req.offset, req.length)) return other;
    }
    return null;
  }

  #count(kind: HookedKind, length: number): void {
    const st = this.stats;
    switch (kind) {
      case "write":
        st.writeOps++;
        st.writeBytes += length;
        break;
      case "zero":
        st.zeroOps++;
        st.zeroBytes += length;
        break;
      case "discard":
        st.discardOps++;
        st.discardBytes += length;
        break;
      case "flush":
        st.flushOps++;
        break;
    }
  }

  /** Waits for every overlapping range lock taken before this request began. */
  async #waitForRangeLocks(req: TrackedRequest): Promise<void> {
    for (const lock of [...this.#rangeLocks]) {
      if (lock.id < req.id && rangesOverlap(lock.offset, lock.length, req.offset, req.length))
        await lock.released;
    }
  }

  /**
   * Not async: with no hook, no serialising request and no range lock (a node no job touches), a
   * request has nothing to wait for, and one `then` on the driver's promise replaces the async
   * frame, its promise and the await's microtask (measured: 2.8 KB allocated per 4 KiB NBD write
   * before, most of it async frames). Everything else takes #mutateHooked.
   */
  #mutate(
    kind: HookedKind,
    offset: number,
    length: number,
    data: readonly Buffer[] | null,
    flags: ZeroFlags,
  ): Promise<void> {
    if (
      this.#hooks.length > 0 ||
      this.#serialisingInFlight > 0 ||
      this.#rangeLocks.size > 0 ||
      (length === 0 && kind !== "flush")
    )
      return this.#mutateHooked(kind, offset, length, data, flags);
    const t0 = BlockAccounting.now();
    const req = this.#begin(kind, offset, length, data, flags, false);
    let p: Promise<void>;
    try {
      p = this.#callDriver(req);
    } catch (err) {
      p = Promise.reject(err);
    }
    return p.then(
      () => {
        this.#count(kind, length);
        this.acct.done(ACCT_KIND[kind]!, t0);
        if (kind === "write" || kind === "zero") this.acct.wrote(offset + length);
        this.#end(req);
      },
      (err: unknown) => {
        this.acct.failed(ACCT_KIND[kind]!, t0);
        const failed = this.#failed(err);
        this.#end(req);
        throw failed;
      },
    );
  }

  async #mutateHooked(
    kind: HookedKind,
    offset: number,
    length: number,
    data: readonly Buffer[] | null,
    flags: ZeroFlags,
  ): Promise<void> {
    // An empty write, zero or discard changes nothing: succeed without bothering driver or hooks.
    if (length === 0 && kind !== "flush") {
      this.#count(kind, 0);
      return;
    }
    const t0 = BlockAccounting.now();
    const acctKind = ACCT_KIND[kind]!;
    const hooks = this.#hooks;
    const req = this.#begin(kind, offset, length, data, flags, kind !== "flush" && this.#serialiseWrites);
    try {
      if (this.#serialisingInFlight > 0 && kind !== "flush") {
        // Wait for each earlier overlapping write in turn (one that ended has left #inFlight).
        for (let other = this.#firstOverlap(req); other; other = this.#firstOverlap(req))
          await other.whenEnded();
      }
      if (this.#rangeLocks.size > 0 && kind !== "flush") await this.#waitForRangeLocks(req);
      for (const hook of hooks) {
        // Await only what is a promise: a synchronous hook costs no extra microtask.
        const pending = hook.before?.(req);
        if (pending) await pending;
      }
      let driverError: Error | undefined;
      try {
        await this.#callDriver(req);
      } catch (err) {
        driverError = toBlockError(err);
      }
      let hookError: unknown;
      for (const hook of hooks) {
        if (!hook.after) continue;
        try {
          const pending = hook.after(req, driverError);
          if (pending) await pending;
        } catch (err) {
          hookError ??= err;
        }
      }
      if (driverError) throw driverError;
      if (hookError !== undefined) throw hookError;
      this.#count(kind, length);
      this.acct.done(acctKind, t0);
      if (kind === "write" || kind === "zero") this.acct.wrote(offset + length);
    } catch (err) {
      this.acct.failed(acctKind, t0);
      throw this.#failed(err);
    } finally {
      this.#end(req);
    }
  }

  /** Not async (see write()): returns the driver's own promise where it can. */
  #callDriver(req: TrackedRequest): Promise<void> {
    const driver = this.driver;
    const flags = req.flags;
    let p: Promise<void>;
    switch (req.kind) {
      case "write":
        p = driver.pwrite(req.offset, req.data!, flags);
        break;
      case "zero":
        p = this.#zero(req.offset, req.length, flags);
        break;
      case "discard":
        p = driver.capabilities.discard ? driver.pdiscard(req.offset, req.length) : DONE;
        break;
      case "flush":
        return driver.flush();
      default:
        return Promise.reject(new BlockError("EINVAL", `not a write kind: ${req.kind}`));
    }
    if (flags.fua && driver.capabilities.fua === "emulate") return p.then(() => driver.flush());
    return p;
  }

  async #zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const driver = this.driver;
    if (driver.capabilities.zeroes === "native") {
      try {
        await driver.pwriteZeroes(offset, length, flags);
        return;
      } catch (err) {
        if (!(err instanceof BlockError) || err.code !== "ENOTSUP") throw err;
      }
    }
    if (flags.fastZero) throw new BlockError("ENOTSUP", "fast zero not possible: zeroes would be written");
    for (let pos = offset; pos < offset + length; pos += ZERO_EMULATION_BYTES) {
      const n = Math.min(ZERO_EMULATION_BYTES, offset + length - pos);
      await driver.pwrite(pos, [n === ZERO_EMULATION_BYTES ? ZERO_BUFFER : ZERO_BUFFER.subarray(0, n)], {});
    }
  }
}
