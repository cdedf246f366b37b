/**
 * Block jobs: QEMU's job model. Statuses, the allowed transitions and the verbs each status accepts
 * are tables (QEMU's job.c has the same ones); every transition emits JOB_STATUS_CHANGE.
 *
 * Life of a job: created -> running -> (ready <-> standby for jobs that converge) -> waiting ->
 * pending -> concluded -> null (BLOCK_JOB_PENDING only when auto-finalize is false). Pause moves running -> paused and ready -> standby. A cancel or an
 * error goes through aborting to concluded. Completion events (BLOCK_JOB_COMPLETED or
 * BLOCK_JOB_CANCELLED) are emitted at finalize, before concluded, as QEMU does.
 *
 * A subclass implements run() (its body: background work or waiting for cancel) and may override
 * onPause/onResume/onFinalize. Work loops call pausePoint(), which waits while the job is paused and
 * tells whether the job is being cancelled.
 */
import { BlockError } from "../core/errors.js";
import type { EventSink } from "../core/events.js";
import type { Logger } from "../core/log.js";
import { TokenBucket } from "../core/rate-limit.js";

export type JobStatus =
  | "undefined"
  | "created"
  | "running"
  | "paused"
  | "ready"
  | "standby"
  | "waiting"
  | "pending"
  | "aborting"
  | "concluded"
  | "null";

export type JobVerb = "cancel" | "pause" | "resume" | "set-speed" | "complete" | "finalize" | "dismiss";

export type ErrorAction = "report" | "ignore" | "stop" | "enospc";
export type IoStatus = "ok" | "failed" | "nospace";

/** TRANSITIONS[from] = the statuses a job may move to. */
export const TRANSITIONS: Readonly<Record<JobStatus, readonly JobStatus[]>> = {
  undefined: ["created"],
  created: ["running", "aborting", "null"],
  running: ["paused", "ready", "waiting", "aborting"],
  paused: ["running"],
  ready: ["standby", "waiting", "aborting"],
  standby: ["ready"],
  waiting: ["pending", "aborting"],
  pending: ["aborting", "concluded"],
  aborting: ["aborting", "concluded"],
  concluded: ["null"],
  null: [],
};

/** VERBS[verb] = the statuses in which a job accepts it. */
export const VERBS: Readonly<Record<JobVerb, readonly JobStatus[]>> = {
  cancel: ["created", "running", "paused", "ready", "standby", "waiting", "pending"],
  pause: ["created", "running", "paused", "ready", "standby"],
  resume: ["created", "running", "paused", "ready", "standby"],
  "set-speed": ["created", "running", "paused", "ready", "standby"],
  complete: ["ready"],
  finalize: ["pending"],
  dismiss: ["concluded"],
};

/** A verb refused in the job's current status. The QMP layer turns it into GenericError. */
export class JobVerbError extends Error {}

/** Error events per job per second; the rest are counted and logged, not emitted. */
export const ERROR_EVENTS_PER_SECOND_MAX = 5;

export interface JobOptions {
  readonly id: string;
  readonly type: string;
  readonly speed?: number;
  readonly autoFinalize?: boolean;
  readonly autoDismiss?: boolean;
  /**
   * A block job (backup, mirror, ...; the default) also emits QEMU's BLOCK_JOB_* events and is listed
   * by query-block-jobs. Other jobs (blockdev-create) only emit JOB_STATUS_CHANGE, as in QEMU.
   */
  readonly blockJob?: boolean;
  readonly events: EventSink;
  readonly log: Logger;
  /** Called once the job has reached null (dismissed): the registry forgets it. */
  readonly onGone?: (job: Job) => void;
}

export abstract class Job {
  readonly id: string;
  readonly type: string;
  readonly autoFinalize: boolean;
  readonly autoDismiss: boolean;
  readonly isBlockJob: boolean;
  protected readonly log: Logger;
  protected readonly events: EventSink;
  readonly rate: TokenBucket;
  #status: JobStatus = "undefined";
  #pauseCount = 0;
  #cancelled = false;
  #force = false;
  /** A cancel that completes (a converged mirror cancelled without force): QEMU's soft cancel. */
  #softCancel = false;
  #error: string | undefined;
  ioStatus: IoStatus = "ok";
  /** Progress: bytes done and bytes in all (QEMU's offset and len). */
  progressCurrent = 0;
  progressTotal = 0;
  #busy = false;
  #resumeWaiters: Array<() => void> = [];
  #finished: Promise<void>;
  #resolveFinished!: () => void;
  readonly #onGone?: (job: Job) => void;
  #finalizing = false;
  #errorEventsWindowStart = 0;
  #errorEventsInWindow = 0;
  suppressedErrorEvents = 0;

  constructor(options: JobOptions) {
    this.id = options.id;
    this.type = options.type;
    this.autoFinalize = options.autoFinalize ?? true;
    this.autoDismiss = options.autoDismiss ?? true;
    this.isBlockJob = options.blockJob ?? true;
    this.events = options.events;
    this.log = options.log.child({ job: options.id });
    this.rate = new TokenBucket(options.speed ?? 0);
    this.#onGone = options.onGone;
    this.#finished = new Promise((resolve) => (this.#resolveFinished = resolve));
    this.#transition("created");
  }

  get status(): JobStatus {
    return this.#status;
  }
  get speed(): number {
    return this.rate.speed;
  }
  get paused(): boolean {
    return this.#pauseCount > 0;
  }
  get cancelled(): boolean {
    return this.#cancelled;
  }
  get forceCancelled(): boolean {
    return this.#force;
  }
  get error(): string | undefined {
    return this.#error;
  }
  get busy(): boolean {
    return this.#busy && !this.paused;
  }
  get ready(): boolean {
    return this.#status === "ready" || this.#status === "standby";
  }
  /** Resolves when the job has concluded (whatever the outcome). */
  get concluded(): Promise<void> {
    return this.#finished;
  }

  // ---- to implement --------------------------------------------------------------------------------

  /** The job's body. Returns when the work is done or the job was cancelled; throws on failure. */
  protected abstract run(): Promise<void>;
  /** Called at finalize with whether the job succeeded; undo or commit here. */
  protected async onFinalize(_success: boolean): Promise<void> {}
  protected onPause(): void {}
  protected onResume(): void {}
  /** block-job-complete (only in ready). */
  protected onComplete(): void {
    throw new JobVerbError(`Job '${this.id}' does not support completion`);
  }

  // ---- verbs ---------------------------------------------------------------------------------------

  #check(verb: JobVerb): void {
    // While finalize runs (flush, release) the status is still pending/aborting, but the outcome is
    // decided: a second finalize or a cancel must not start it again.
    if (
      !VERBS[verb].includes(this.#status) ||
      (this.#finalizing && (verb === "finalize" || verb === "cancel"))
    ) {
      throw new JobVerbError(
        `Job '${this.id}' in state '${this.#status}' cannot accept command verb '${verb}'`,
      );
    }
  }

  start(): void {
    this.#transition("running");
    this.#busy = true;
    void this.#main();
  }

  cancel(force = false): void {
    this.#check("cancel");
    if (this.#status === "pending") {
      // Cancelling a pending job aborts it at finalize.
      this.#cancelled = true;
      this.#force = true;
      this.#finalizeLogged();
      return;
    }
    this.#cancelled = true;
    this.#force ||= force;
    this.#softCancel = !this.#force && (this.#softCancel || (this.ready && this.softCancelAfterReady));
    // A paused job is resumed so it can notice the cancel.
    if (this.#pauseCount > 0) {
      this.#pauseCount = 0;
      this.#wakeResumed();
    }
    this.rate.wake();
    this.onCancel();
  }

  /** Jobs that converge (mirror) end a non-forced cancel after READY as a completion. */
  protected readonly softCancelAfterReady: boolean = false;

  /** True when the current cancel is a soft one: the job should finish in sync, then complete. */
  protected get softCancelled(): boolean {
    return this.#softCancel;
  }

  /** Hook for subclasses to interrupt their waits when cancelled. */
  protected onCancel(): void {}

  pause(): void {
    this.#check("pause");
    this.#pauseCount++;
    if (this.#pauseCount === 1) {
      if (this.#status === "running") this.#transition("paused");
      else if (this.#status === "ready") this.#transition("standby");
      this.rate.wake();
      this.onPause();
    }
  }

  resume(): void {
    this.#check("resume");
    if (this.#pauseCount === 0) return;
    this.#pauseCount--;
    if (this.#pauseCount === 0) {
      this.ioStatus = "ok";
      if (this.#status === "paused") this.#transition("running");
      else if (this.#status === "standby") this.#transition("ready");
      this.#wakeResumed();
      this.onResume();
    }
  }

  setSpeed(bytesPerSecond: number): void {
    this.#check("set-speed");
    if (!Number.isSafeInteger(bytesPerSecond) || bytesPerSecond < 0) {
      throw new BlockError("EINVAL", "Parameter 'speed' expects a non negative value");
    }
    this.rate.setSpeed(bytesPerSecond);
  }

  complete(): void {
    this.#check("complete");
    this.onComplete();
  }

  finalize(): void {
    this.#check("finalize");
    this.#finalizeLogged();
  }

  #finalizeLogged(): void {
    this.#finalize().catch((err) => this.log.error({ err: String(err) }, "finalize failed"));
  }

  dismiss(): void {
    this.#check("dismiss");
    this.#transition("null");
    this.#onGone?.(this);
  }

  // ---- for subclasses --------------------------------------------------------------------------------

  /** Waits while paused. Returns true when the job should stop (cancelled). */
  protected async pausePoint(): Promise<boolean> {
    while (this.#pauseCount > 0 && !this.#cancelled) {
      this.#busy = false;
      await new Promise<void>((resolve) => this.#resumeWaiters.push(resolve));
      this.#busy = true;
    }
    return this.#cancelled;
  }

  #wakeResumed(): void {
    const w = this.#resumeWaiters;
    this.#resumeWaiters = [];
    for (const f of w) f();
  }

  /** Moves to ready (jobs that converge, e.g. mirror) and emits BLOCK_JOB_READY. */
  protected becomeReady(): void {
    if (this.#status === "running") {
      this.#transition("ready");
      this.events.emit("BLOCK_JOB_READY", {
        type: this.type,
        device: this.id,
        len: this.progressTotal,
        offset: this.progressCurrent,
        speed: this.speed,
      });
    } else if (this.#status === "paused") {
      // Reached ready while paused: come back as standby.
      this.#status = "ready";
      this.#transition("standby");
    }
  }

  /**
   * Reports an I/O error under an on-*-error policy: emits BLOCK_JOB_ERROR (rate-limited) and, for
   * "stop", pauses the job with io-status failed. Returns the action taken.
   */
  protected reportIoError(operation: "read" | "write", policy: ErrorAction, err: Error): ErrorAction {
    const action = policy === "enospc" ? ((err as BlockError).code === "ENOSPC" ? "stop" : "report") : policy;
    const now = Date.now();
    if (now - this.#errorEventsWindowStart >= 1000) {
      if (this.suppressedErrorEvents > 0) {
        this.log.warn({ suppressed: this.suppressedErrorEvents }, "BLOCK_JOB_ERROR events suppressed");
      }
      this.#errorEventsWindowStart = now;
      this.#errorEventsInWindow = 0;
    }
    if (this.#errorEventsInWindow < ERROR_EVENTS_PER_SECOND_MAX) {
      this.#errorEventsInWindow++;
      this.events.emit("BLOCK_JOB_ERROR", { device: this.id, operation, action });
    } else {
      this.suppressedErrorEvents++;
    }
    this.log.warn({ operation, action, err: err.message }, "I/O error in job");
    if (action === "stop") {
      this.ioStatus = (err as BlockError).code === "ENOSPC" ? "nospace" : "failed";
      if (this.#pauseCount === 0 && (this.#status === "running" || this.#status === "ready")) {
        this.#pauseCount = 1;
        this.#transition(this.#status === "running" ? "paused" : "standby");
        this.rate.wake();
        this.onPause();
      }
    }
    return action;
  }

  // ---- the life cycle --------------------------------------------------------------------------------

  #transition(to: JobStatus): void {
    const from = this.#status;
    if (!TRANSITIONS[from].includes(to))
      throw new Error(`job ${this.id}: illegal transition ${from} -> ${to}`);
    this.#status = to;
    this.events.emit("JOB_STATUS_CHANGE", { id: this.id, status: to });
  }

  async #main(): Promise<void> {
    try {
      await this.run();
    } catch (err) {
      this.#error = err instanceof Error ? err.message : String(err);
      this.log.warn({ err: this.#error }, "job failed");
    }
    this.#busy = false;
    if (this.#status === "paused" || this.#status === "standby") {
      // Ended while paused (e.g. cancelled): leave the pause state first.
      this.#pauseCount = 0;
      this.#transition(this.#status === "paused" ? "running" : "ready");
    }
    if ((this.#cancelled && !this.#softCancel) || this.#error !== undefined) {
      this.#transition("aborting");
      await this.#finalize();
      return;
    }
    this.#transition("waiting");
    this.#transition("pending");
    // QEMU announces PENDING only to a client that must answer it (auto-finalize=false): with
    // auto-finalize the job finalizes at once, and a job-finalize sent in reply would find no job.
    if (this.autoFinalize) await this.#finalize();
    else if (this.isBlockJob) this.events.emit("BLOCK_JOB_PENDING", { type: this.type, id: this.id });
  }

  async #finalize(): Promise<void> {
    if (this.#finalizing) return;
    this.#finalizing = true;
    const success = (!this.#cancelled || this.#softCancel) && this.#error === undefined;
    if (!success && this.#status !== "aborting") this.#transition("aborting");
    try {
      await this.onFinalize(success);
    } catch (err) {
      this.#error ??= err instanceof Error ? err.message : String(err);
    }
    const info = {
      type: this.type,
      device: this.id,
      len: this.progressTotal,
      offset: this.progressCurrent,
      speed: this.speed,
    };
    if (!this.isBlockJob) {
      // Not a block job: its outcome shows in query-jobs only.
    } else if (this.#cancelled && !this.#softCancel && this.#error === undefined)
      this.events.emit("BLOCK_JOB_CANCELLED", info);
    else
      this.events.emit(
        "BLOCK_JOB_COMPLETED",
        this.#error !== undefined ? { ...info, error: this.#error } : info,
      );
    this.#transition("concluded");
    this.#resolveFinished();
    if (this.autoDismiss) this.dismiss();
  }

  /** QEMU's query-block-jobs entry. */
  blockJobInfo(): Record<string, unknown> {
    const info: Record<string, unknown> = {
      type: this.type,
      device: this.id,
      len: this.progressTotal,
      offset: this.progressCurrent,
      busy: this.busy,
      paused: this.paused,
      speed: this.speed,
      "io-status": this.ioStatus,
      ready: this.ready,
      status: this.#status,
      "auto-finalize": this.autoFinalize,
      "auto-dismiss": this.autoDismiss,
    };
    if (this.#error !== undefined) info.error = this.#error;
    return info;
  }

  /** QEMU's query-jobs entry. */
  jobInfo(): Record<string, unknown> {
    const info: Record<string, unknown> = {
      id: this.id,
      type: this.type,
      status: this.#status,
      "current-progress": this.progressCurrent,
      "total-progress": this.progressTotal,
    };
    if (this.#error !== undefined) info.error = this.#error;
    return info;
  }
}
