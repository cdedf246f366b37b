/**
 * The io_uring engine: one ring per process (the addon's, native/drivetap_native.c), no SQPOLL thread.
 * Operations queue entries during an event-loop turn and one io_uring_enter at setImmediate submits
 * them all, so every write a turn produces, to a source and to its jobs' targets, leaves in one
 * syscall. Completions come back on the event loop (the ring's eventfd, polled by libuv) and are reaped
 * in batches; completions of a submit that finished inline are reaped straight after it.
 *
 * Lifetimes: an operation holds its buffers (the Op object references them) until its completion has
 * been reaped, resubmitting the rest of a short read or write; a descriptor is closed only after every
 * operation on it has completed (FdLifetime); close() drains the ring before it is torn down.
 *
 * Failures: a submit the kernel refuses (or a test's fault hook) takes its entries back; transient
 * ones (EAGAIN, EBUSY, EINTR) are retried on a later turn, the rest, and operations retried more than
 * URING_RETRIES_MAX times, fall back to the threadpool. A completion's -errno fails the request.
 */
import { BlockError, systemErrorText } from "../../../core/errors.js";
import { assert } from "../../../core/assert.js";
import { remainingIov } from "../fs-async.js";
import { EAGAIN, EBUSY, EINTR, native, type UringHandle } from "../native.js";
import {
  ioError,
  nativeFallocate,
  readZeroFilled,
  type FallocMode,
  type FileIo,
  type IoEngine,
} from "./engine.js";
import { FdLifetime } from "./fd-lifetime.js";
import { fdatasyncFull, readFullAsync, writevFullAsync } from "./threads.js";

/** Submission queue entries; the completion queue has twice as many (the kernel's default). */
export const URING_ENTRIES = 256;
/** Operations that wait in JS for a ring slot; past it, an operation runs on the threadpool instead. */
export const URING_BACKLOG_MAX = 4096;
/** How often one operation is resubmitted after EAGAIN/EINTR (or a write that wrote nothing) before it falls back. */
export const URING_RETRIES_MAX = 8;
/** Tags are positive int32s (the completion array is an Int32Array); they wrap here. */
const TAG_MAX = 0x7fffffff;

type OpKind = "read" | "writev" | "fsync" | "fallocate";

interface Op {
  readonly kind: OpKind;
  readonly file: FdLifetime;
  /** read: the destination; writev: the data. Referenced until the op settles (buffer lifetime). */
  readonly into?: Buffer;
  readonly data?: readonly Buffer[];
  readonly position: number;
  /** read/writev: bytes wanted; fallocate: the range's length. */
  readonly total: number;
  readonly mode?: FallocMode;
  done: number;
  retries: number;
  tag: number;
  readonly resolve: (n: number) => void;
  readonly reject: (err: BlockError) => void;
}

/** A test hook: returns an errno to make this submit fail as the kernel would, or 0. */
export type SubmitFaultHook = () => number;
/** A test hook: returns an errno to fail this completion with, or 0. */
export type CompletionFaultHook = (kind: OpKind) => number;

export interface IoUringStats {
  /** io_uring_enter calls that submitted something, and the entries they submitted. */
  readonly enters: number;
  readonly sqes: number;
  /** Operations (or their remainders) that ran on the threadpool instead. */
  readonly fallbacks: number;
  /** Resubmissions: short reads and writes, EAGAIN, EINTR. */
  readonly resubmits: number;
  readonly inflight: number;
}

const WHAT: Readonly<Record<OpKind, string>> = {
  read: "read",
  writev: "write",
  fsync: "fdatasync",
  fallocate: "fallocate",
};

export class IoUringEngine implements IoEngine {
  readonly name = "io_uring";
  readonly #ring: UringHandle;
  readonly #completions: Int32Array;
  readonly #ops = new Map<number, Op>();
  #nextTag = 1;
  /** Queued in the ring since the last submit, in queue order. */
  #queued: Op[] = [];
  /** Waiting for a ring slot (bounded by URING_BACKLOG_MAX). */
  readonly #backlog: Op[] = [];
  #submitScheduled = false;
  #closing: Promise<void> | undefined;
  #drained: (() => void) | undefined;
  /** The last counters, once the ring is torn down. */
  #torndown: IoUringStats | undefined;
  #fallbacks = 0;
  #resubmits = 0;
  submitFault: SubmitFaultHook | undefined;
  completionFault: CompletionFaultHook | undefined;
  readonly #flushBound = (): void => this.#flush();

  private constructor(ring: UringHandle, completions: Int32Array) {
    this.#ring = ring;
    this.#completions = completions;
  }

  /** Sets up the process's ring, or says why it cannot (no addon support, the kernel refused). */
  static create(): IoUringEngine | string {
    if (!native) return "the native addon is not built";
    if (!native.uringCreate) return "the native addon was built without <linux/io_uring.h>";
    // Twice the SQ: the addon never lets queued plus in-flight entries pass the CQ's size.
    const completions = new Int32Array(2 * 2 * URING_ENTRIES);
    let onEventfd = (): void => {};
    const ring = native.uringCreate(URING_ENTRIES, completions, () => onEventfd());
    if (typeof ring === "number") return `failed to init linux io_uring ring: ${systemErrorText(-ring)}`;
    const engine = new IoUringEngine(ring, completions);
    onEventfd = () => engine.#onEventfd();
    return engine;
  }

  open(fd: number): FileIo {
    return new UringFileIo(this, new FdLifetime(fd));
  }

  get stats(): IoUringStats {
    if (this.#torndown) return this.#torndown;
    const [enters, sqes, inflight] = native!.uringStats!(this.#ring);
    return { enters, sqes, inflight, fallbacks: this.#fallbacks, resubmits: this.#resubmits };
  }

  /** Starts an operation; `file` counts it until it settles. */
  start(
    kind: OpKind,
    file: FdLifetime,
    fields: { into?: Buffer; data?: readonly Buffer[]; position: number; total: number; mode?: FallocMode },
  ): Promise<number> {
    // Nothing to read or write: the kernel's answer (0 bytes) would look like a write that stalled.
    if (fields.total === 0 && (kind === "read" || kind === "writev")) return Promise.resolve(0);
    return new Promise<number>((resolve, reject) => {
      file.begin();
      const op: Op = { kind, file, ...fields, done: 0, retries: 0, tag: 0, resolve, reject };
      if (this.#closing) this.#fallback(op);
      else this.#enqueue(op);
    });
  }

  #enqueue(op: Op): void {
    if (this.#backlog.length > 0 || !this.#queue(op)) {
      if (this.#backlog.length >= URING_BACKLOG_MAX) return this.#fallback(op);
      this.#backlog.push(op);
    }
    this.#schedule();
  }

  /** Puts the op's remainder in the ring; false when the ring has no slot now. */
  #queue(op: Op): boolean {
    const n = native!;
    const tag = this.#nextTag;
    this.#nextTag = tag >= TAG_MAX ? 1 : tag + 1;
    const fd = op.file.fd;
    let r: number;
    switch (op.kind) {
      case "read":
        r = n.uringRead!(
          this.#ring,
          fd,
          op.done ? op.into!.subarray(op.done) : op.into!,
          op.position + op.done,
          tag,
        );
        break;
      case "writev":
        r = n.uringWritev!(
          this.#ring,
          fd,
          op.done ? remainingIov(op.data!, op.done) : op.data!,
          op.position + op.done,
          tag,
        );
        break;
      case "fsync":
        r = n.uringFsync!(this.#ring, fd, true, tag);
        break;
      case "fallocate":
        r = n.uringFallocate!(this.#ring, fd, n.fallocModes![op.mode!], op.position, op.total, tag);
        break;
    }
    if (r === -EBUSY) return false;
    // The addon refused the arguments (more iovecs than it takes): the threadpool can still do it.
    if (r < 0) {
      this.#fallback(op);
      return true;
    }
    op.tag = tag;
    this.#ops.set(tag, op);
    this.#queued.push(op);
    return true;
  }

  #schedule(): void {
    if (this.#submitScheduled) return;
    this.#submitScheduled = true;
    setImmediate(this.#flushBound);
  }

  /** Submits what the turn queued, reaps what completed inline, refills from the backlog, repeats. */
  #flush(): void {
    this.#submitScheduled = false;
    // Operations a refused submit put back wait in the backlog: they go first.
    this.#refill();
    while (this.#queued.length > 0) {
      if (!this.#submit()) break;
      this.#reap();
      this.#refill();
    }
  }

  #refill(): void {
    while (this.#backlog.length > 0 && this.#queue(this.#backlog[0]!)) this.#backlog.shift();
  }

  /** One io_uring_enter; false if it failed (its entries were taken back and routed elsewhere). */
  #submit(): boolean {
    const n = native!;
    const injected = this.submitFault?.() ?? 0;
    let r: number;
    if (injected) {
      n.uringDiscardQueued!(this.#ring);
      r = -injected;
    } else r = n.uringSubmit!(this.#ring);
    const taken = Math.max(r, 0);
    const queued = this.#queued;
    if (taken === queued.length) {
      this.#queued = [];
      return true;
    }
    this.#queued = [];
    const rest = queued.slice(taken);
    const transient = r === -EAGAIN || r === -EBUSY || r === -EINTR;
    for (const op of rest) this.#ops.delete(op.tag);
    const retry: Op[] = [];
    for (const op of rest) {
      if (transient && op.retries < URING_RETRIES_MAX) {
        op.retries++;
        this.#resubmits++;
        retry.push(op);
      } else this.#fallback(op);
    }
    // Retried on a later turn, ahead of what waited already.
    if (retry.length > 0) {
      this.#backlog.unshift(...retry);
      this.#schedule();
    }
    return false;
  }

  #onEventfd(): void {
    this.#reap();
    this.#refill();
    if (this.#queued.length > 0) this.#schedule();
  }

  #reap(): void {
    const n = native!;
    const c = this.#completions;
    for (;;) {
      const count = n.uringReap!(this.#ring);
      if (count <= 0) break;
      for (let i = 0; i < count; i++) {
        const op = this.#ops.get(c[2 * i]!);
        assert(op !== undefined, "io_uring completion for an unknown tag");
        this.#ops.delete(op.tag);
        this.#complete(op, c[2 * i + 1]!);
      }
      if (count < c.length / 2) break;
    }
  }

  #complete(op: Op, res: number): void {
    const injected = this.completionFault?.(op.kind) ?? 0;
    if (injected) res = -injected;
    if (op.kind === "fallocate") return this.#settle(op, res);
    if (res === -EAGAIN || res === -EINTR || (res === 0 && op.kind === "writev")) return this.#retry(op);
    if (res < 0) return this.#settle(op, ioError(-res, WHAT[op.kind]));
    if (op.kind === "fsync") return this.#settle(op, 0);
    op.done += res;
    // A read of 0 bytes is the end of the file; the caller zero-fills past it.
    if (op.done >= op.total || (op.kind === "read" && res === 0)) return this.#settle(op, op.done);
    this.#resubmits++;
    this.#requeue(op);
  }

  #retry(op: Op): void {
    if (op.retries >= URING_RETRIES_MAX) return this.#fallback(op);
    op.retries++;
    this.#resubmits++;
    this.#requeue(op);
  }

  #requeue(op: Op): void {
    if (this.#closing) return this.#fallback(op);
    if (!this.#queue(op)) this.#backlog.unshift(op);
    this.#schedule();
  }

  /** Runs the op's remainder on the threadpool. */
  #fallback(op: Op): void {
    this.#fallbacks++;
    const fd = op.file.fd;
    let p: Promise<number>;
    switch (op.kind) {
      case "read":
        p = readFullAsync(fd, op.into!.subarray(op.done), op.position + op.done).then((k) => op.done + k);
        break;
      case "writev":
        p = writevFullAsync(
          fd,
          remainingIov(op.data!, op.done),
          op.position + op.done,
          op.total - op.done,
        ).then(() => op.total);
        break;
      case "fsync":
        p = fdatasyncFull(fd).then(() => 0);
        break;
      case "fallocate":
        p = Promise.resolve(nativeFallocate(fd, op.mode!, op.position, op.total));
        break;
    }
    p.then(
      (v) => this.#settle(op, v),
      (err: BlockError) => this.#settle(op, err),
    );
  }

  #settle(op: Op, result: number | BlockError): void {
    if (typeof result === "number") op.resolve(result);
    else op.reject(result);
    op.file.end();
    if (this.#drained && this.#idle()) this.#drained();
  }

  #idle(): boolean {
    return this.#ops.size === 0 && this.#queued.length === 0 && this.#backlog.length === 0;
  }

  /**
   * Drains the ring and tears it down. Operations started afterwards run on the threadpool (a node
   * closing late still completes); `ioUringEngine()` makes a new ring for a later open.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      if (!this.#idle()) {
        await new Promise<void>((resolve) => (this.#drained = resolve));
        this.#drained = undefined;
      }
      const last = this.stats;
      const r = native!.uringClose!(this.#ring);
      this.#torndown = last;
      assert(r === 0, `io_uring close after draining: ${r}`);
    })();
    return this.#closing;
  }
}

class UringFileIo implements FileIo {
  readonly engine = "io_uring";
  readonly #engine: IoUringEngine;
  readonly #fd: FdLifetime;

  constructor(engine: IoUringEngine, fd: FdLifetime) {
    this.#engine = engine;
    this.#fd = fd;
  }

  read(into: Buffer, position: number): Promise<number> {
    return this.#engine.start("read", this.#fd, { into, position, total: into.length });
  }

  readFull(into: Buffer, position: number): Promise<void> {
    return readZeroFilled(this, into, position);
  }

  async writev(data: readonly Buffer[], position: number, total: number): Promise<void> {
    await this.#engine.start("writev", this.#fd, { data, position, total });
  }

  async fdatasync(): Promise<void> {
    await this.#engine.start("fsync", this.#fd, { position: 0, total: 0 });
  }

  fallocate(mode: FallocMode, offset: number, length: number): Promise<number> {
    return this.#engine.start("fallocate", this.#fd, { position: offset, total: length, mode });
  }

  close(): Promise<void> {
    return this.#fd.close();
  }
}
