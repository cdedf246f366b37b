/**
 * The job model of src/jobs/job.ts: its transition and verb tables checked against QEMU's job.c, and a
 * tiny Job subclass driven directly (no daemon, no QMP) whose events are recorded from an EventBus, so
 * every life cycle (success, manual finalize and dismiss, cancel, failure, pause, ready/standby, error
 * policies) is checked as the exact sequence of statuses and events it produces.
 */
import { describe, test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { BlockError } from "../../src/core/errors.js";
import { EventBus } from "../../src/core/events.js";
import { silentLogger } from "../../src/core/log.js";
import {
  ERROR_EVENTS_PER_SECOND_MAX,
  Job,
  JobVerbError,
  TRANSITIONS,
  VERBS,
  type ErrorAction,
  type JobOptions,
  type JobStatus,
  type JobVerb,
} from "../../src/jobs/job.js";

// ---- QEMU's tables (job.c, QEMU 7.2), transcribed column by column --------------------------------------

/** Column order of QEMU's JobSTT and JobVerbTable: U, C, R, P, Y, S, W, D, X, E, N. */
const STATUSES: readonly JobStatus[] = [
  "undefined",
  "created",
  "running",
  "paused",
  "ready",
  "standby",
  "waiting",
  "pending",
  "aborting",
  "concluded",
  "null",
];

const QEMU_STT: Readonly<Record<JobStatus, readonly number[]>> = {
  /*              U  C  R  P  Y  S  W  D  X  E  N */
  undefined: /**/ [0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
  created: /*  */ [0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1],
  running: /*  */ [0, 0, 0, 1, 1, 0, 1, 0, 1, 0, 0],
  paused: /*   */ [0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0],
  ready: /*    */ [0, 0, 0, 0, 0, 1, 1, 0, 1, 0, 0],
  standby: /*  */ [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
  waiting: /*  */ [0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0],
  pending: /*  */ [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
  aborting: /* */ [0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0],
  concluded: /**/ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1],
  null: /*     */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
};

const QEMU_VERBS: Readonly<Record<JobVerb, readonly number[]>> = {
  /*                 U  C  R  P  Y  S  W  D  X  E  N */
  cancel: /*     */ [0, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
  pause: /*      */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
  resume: /*     */ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
  "set-speed": /**/ [0, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
  complete: /*   */ [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0],
  finalize: /*   */ [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0],
  dismiss: /*    */ [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
};

function statusesIn(row: readonly number[]): JobStatus[] {
  return STATUSES.filter((_, i) => row[i] === 1);
}

describe("transition table", () => {
  test("names exactly QEMU's eleven statuses, and only them as targets", () => {
    assert.deepEqual(Object.keys(TRANSITIONS).sort(), [...STATUSES].sort());
    for (const [from, tos] of Object.entries(TRANSITIONS)) {
      for (const to of tos) assert.ok(STATUSES.includes(to), `${from} -> unknown status ${to}`);
      assert.equal(new Set(tos).size, tos.length, `${from} lists a target twice`);
    }
  });

  test("equals QEMU's JobSTT", () => {
    for (const from of STATUSES) {
      assert.deepEqual([...TRANSITIONS[from]].sort(), statusesIn(QEMU_STT[from]).sort(), `from ${from}`);
    }
  });

  test("every status but undefined is reachable from created, and every path can end in null", () => {
    const reached = new Set<JobStatus>(["created"]);
    const queue: JobStatus[] = ["created"];
    while (queue.length > 0) {
      for (const to of TRANSITIONS[queue.shift()!]) {
        if (!reached.has(to)) {
          reached.add(to);
          queue.push(to);
        }
      }
    }
    assert.deepEqual([...reached].sort(), STATUSES.filter((s) => s !== "undefined").sort());

    // Backwards from null: every status can still reach it (no dead ends besides null itself).
    const canEnd = new Set<JobStatus>(["null"]);
    for (let changed = true; changed;) {
      changed = false;
      for (const s of STATUSES) {
        if (!canEnd.has(s) && TRANSITIONS[s].some((to) => canEnd.has(to))) {
          canEnd.add(s);
          changed = true;
        }
      }
    }
    assert.deepEqual([...canEnd].sort(), [...STATUSES].sort());
  });

  test("null is terminal, concluded only goes to null, paused only back to running, standby only to ready", () => {
    assert.deepEqual(TRANSITIONS.null, []);
    assert.deepEqual(TRANSITIONS.concluded, ["null"]);
    assert.deepEqual(TRANSITIONS.paused, ["running"]);
    assert.deepEqual(TRANSITIONS.standby, ["ready"]);
    assert.deepEqual(TRANSITIONS.undefined, ["created"]);
  });
});

describe("verb table", () => {
  test("equals QEMU's JobVerbTable for every verb and status", () => {
    assert.deepEqual(Object.keys(VERBS).sort(), Object.keys(QEMU_VERBS).sort());
    for (const verb of Object.keys(QEMU_VERBS) as JobVerb[]) {
      assert.deepEqual([...VERBS[verb]].sort(), statusesIn(QEMU_VERBS[verb]).sort(), `verb ${verb}`);
    }
  });

  test("concluded accepts only dismiss; complete only in ready; finalize only in pending", () => {
    const accepted = (status: JobStatus): JobVerb[] =>
      (Object.keys(VERBS) as JobVerb[]).filter((v) => VERBS[v].includes(status));
    assert.deepEqual(accepted("concluded"), ["dismiss"]);
    assert.deepEqual(VERBS.complete, ["ready"]);
    assert.deepEqual(VERBS.finalize, ["pending"]);
    assert.deepEqual(accepted("pending").sort(), ["cancel", "finalize"]);
    for (const s of ["undefined", "aborting", "null"] as const) assert.deepEqual(accepted(s), [], s);
  });
});

// ---- a job driven by hand ----------------------------------------------------------------------------

interface Deferred<T = void> {
  readonly promise: Promise<T>;
  resolve(value: T): void;
}

function deferred<T = void>(): Deferred<T> {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

/** A job whose body is a function of the test, with the protected helpers made callable. */
class TestJob extends Job {
  body: (job: TestJob) => Promise<void> = async () => {};
  completeHook: (() => void) | null = null;
  readonly #cancelSignal = deferred();

  /** Resolves once cancel() was accepted. */
  cancelledSignal(): Promise<void> {
    return this.#cancelSignal.promise;
  }
  protected override onCancel(): void {
    this.#cancelSignal.resolve();
  }

  protected run(): Promise<void> {
    return this.body(this);
  }
  point(): Promise<boolean> {
    return this.pausePoint();
  }
  ioError(policy: ErrorAction, err: Error = new BlockError("EIO", "injected")): ErrorAction {
    return this.reportIoError("write", policy, err);
  }
  goReady(): void {
    this.becomeReady();
  }
  protected override onComplete(): void {
    if (!this.completeHook) super.onComplete();
    else this.completeHook();
  }
}

interface Recorder {
  readonly bus: EventBus;
  /** JOB_STATUS_CHANGE as the bare status, other events by name, in emission order. */
  readonly log: string[];
  /** Every event with its data. */
  readonly events: Array<{ event: string; data: Record<string, unknown> }>;
  /** Resolves on the first future event of that name. */
  next(event: string): Promise<Record<string, unknown>>;
  gone: number;
}

function record(): Recorder {
  const bus = new EventBus();
  const waiters: Array<{ event: string; resolve: (d: Record<string, unknown>) => void }> = [];
  const r: Recorder = {
    bus,
    log: [],
    events: [],
    gone: 0,
    next: (event) => new Promise((resolve) => waiters.push({ event, resolve })),
  };
  bus.on((event, data) => {
    r.events.push({ event, data });
    r.log.push(event === "JOB_STATUS_CHANGE" ? String(data.status) : event);
    for (let i = waiters.length - 1; i >= 0; i--) {
      if (waiters[i].event === event) waiters.splice(i, 1)[0].resolve(data);
    }
  });
  return r;
}

function makeJob(
  r: Recorder,
  opts: Partial<Omit<JobOptions, "events" | "log" | "type">> = {},
  body?: (job: TestJob) => Promise<void>,
): TestJob {
  const job = new TestJob({
    id: "x",
    type: "test",
    events: r.bus,
    log: silentLogger,
    onGone: () => r.gone++,
    ...opts,
  });
  if (body) job.body = body;
  return job;
}

/** Every consecutive pair of statuses the job went through is an allowed transition. */
function assertLegalPath(r: Recorder): void {
  const statuses = r.events.filter((e) => e.event === "JOB_STATUS_CHANGE").map((e) => e.data.status);
  let from: JobStatus = "undefined";
  for (const to of statuses as JobStatus[]) {
    assert.ok(TRANSITIONS[from].includes(to), `illegal ${from} -> ${to} in ${statuses.join(",")}`);
    from = to;
  }
  for (const e of r.events.filter((x) => x.event === "JOB_STATUS_CHANGE")) assert.equal(e.data.id, "x");
}

function assertRefused(job: Job, verb: JobVerb, call: () => void): void {
  assert.throws(call, (err: unknown) => {
    assert.ok(err instanceof JobVerbError, `${verb}: ${String(err)}`);
    assert.equal(err.message, `Job 'x' in state '${job.status}' cannot accept command verb '${verb}'`);
    return true;
  });
}

/** A body that waits until cancelled, parking at pause points (a stream or sync=none job). */
function untilCancelled(started?: Deferred): (job: TestJob) => Promise<void> {
  return async (job) => {
    started?.resolve();
    // pausePoint parks while paused; onCancel (through cancelledSignal) ends the wait.
    while (!(await job.point())) await job.cancelledSignal();
  };
}

describe("a job driven directly", () => {
  test("a successful run: created, running, waiting, pending, COMPLETED, concluded, null (no PENDING event with auto-finalize, as QEMU)", async () => {
    const r = record();
    const job = makeJob(r, {}, async (j) => {
      j.progressTotal = 100;
      j.progressCurrent = 100;
    });
    assert.equal(job.status, "created");
    assert.deepEqual(r.log, ["created"]);
    job.start();
    await job.concluded;
    assert.deepEqual(r.log, [
      "created",
      "running",
      "waiting",
      "pending",
      "BLOCK_JOB_COMPLETED",
      "concluded",
      "null",
    ]);
    assertLegalPath(r);
    const completed = r.events.find((e) => e.event === "BLOCK_JOB_COMPLETED")!.data;
    assert.deepEqual(completed, { type: "test", device: "x", len: 100, offset: 100, speed: 0 });
    assert.ok(!("error" in completed));
    assert.ok(
      !r.events.some((e) => e.event === "BLOCK_JOB_PENDING"),
      "QEMU sends BLOCK_JOB_PENDING only when auto-finalize is false",
    );
    assert.equal(job.status, "null");
    assert.equal(r.gone, 1, "onGone once: the registry forgets the job");
  });

  test("auto-finalize=false: stays pending, emitting nothing more, until finalize()", async () => {
    const r = record();
    const job = makeJob(r, { autoFinalize: false });
    const pending = r.next("BLOCK_JOB_PENDING");
    job.start();
    await pending;
    assert.equal(job.status, "pending");
    assert.deepEqual(r.log, ["created", "running", "waiting", "pending", "BLOCK_JOB_PENDING"]);
    // The job is parked: more turns of the event loop change nothing.
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(job.status, "pending");
    assert.equal(r.log.length, 5);
    assertRefused(job, "dismiss", () => job.dismiss());
    assertRefused(job, "pause", () => job.pause());
    assertRefused(job, "complete", () => job.complete());
    assert.equal(job.jobInfo().status, "pending");
    job.finalize();
    await job.concluded;
    assert.deepEqual(r.log.slice(5), ["BLOCK_JOB_COMPLETED", "concluded", "null"]);
    assertLegalPath(r);
  });

  test("auto-dismiss=false: stays concluded until dismiss(), which accepts nothing else", async () => {
    const r = record();
    const job = makeJob(r, { autoDismiss: false });
    job.start();
    await job.concluded;
    assert.equal(job.status, "concluded");
    assert.equal(r.log.at(-1), "concluded");
    assert.equal(r.gone, 0);
    assert.equal(job.blockJobInfo().status, "concluded");
    assertRefused(job, "cancel", () => job.cancel());
    assert.throws(() => job.cancel(), {
      message: "Job 'x' in state 'concluded' cannot accept command verb 'cancel'",
    });
    assertRefused(job, "pause", () => job.pause());
    assertRefused(job, "resume", () => job.resume());
    assertRefused(job, "set-speed", () => job.setSpeed(1));
    assertRefused(job, "complete", () => job.complete());
    assertRefused(job, "finalize", () => job.finalize());
    job.dismiss();
    assert.equal(job.status, "null");
    assert.equal(r.log.at(-1), "null");
    assert.equal(r.gone, 1);
    assertRefused(job, "dismiss", () => job.dismiss());
    assertLegalPath(r);
  });

  test("cancel: aborting, BLOCK_JOB_CANCELLED (no COMPLETED), concluded, null", async () => {
    const r = record();
    const started = deferred();
    const job = makeJob(r, {}, untilCancelled(started));
    job.start();
    await started.promise;
    assert.equal(job.status, "running");
    job.cancel();
    assert.ok(job.cancelled);
    assert.ok(!job.forceCancelled);
    await job.concluded;
    assert.deepEqual(r.log, ["created", "running", "aborting", "BLOCK_JOB_CANCELLED", "concluded", "null"]);
    assertLegalPath(r);
    assert.equal(job.error, undefined);
  });

  test("cancel(force) is remembered; cancelling a paused job resumes it to end", async () => {
    const r = record();
    const started = deferred();
    const job = makeJob(r, {}, untilCancelled(started));
    job.start();
    await started.promise;
    job.pause();
    assert.equal(job.status, "paused");
    job.cancel(true);
    assert.ok(job.forceCancelled);
    await job.concluded;
    assert.deepEqual(r.log, [
      "created",
      "running",
      "paused",
      "running",
      "aborting",
      "BLOCK_JOB_CANCELLED",
      "concluded",
      "null",
    ]);
    assertLegalPath(r);
  });

  test("cancel of a job waiting in pending (auto-finalize=false) aborts it", async () => {
    const r = record();
    const job = makeJob(r, { autoFinalize: false });
    const pending = r.next("BLOCK_JOB_PENDING");
    job.start();
    await pending;
    job.cancel();
    await job.concluded;
    assert.deepEqual(r.log.slice(4), [
      "BLOCK_JOB_PENDING",
      "aborting",
      "BLOCK_JOB_CANCELLED",
      "concluded",
      "null",
    ]);
    assertLegalPath(r);
  });

  test("a run() that throws: aborting, then BLOCK_JOB_COMPLETED carrying the error", async () => {
    const r = record();
    const job = makeJob(r, {}, async () => {
      throw new BlockError("EIO", "target went away");
    });
    job.start();
    await job.concluded;
    assert.deepEqual(r.log, ["created", "running", "aborting", "BLOCK_JOB_COMPLETED", "concluded", "null"]);
    assertLegalPath(r);
    const completed = r.events.find((e) => e.event === "BLOCK_JOB_COMPLETED")!.data;
    assert.equal(completed.error, "target went away");
    assert.equal(job.error, "target went away");
    assert.ok(!r.log.includes("BLOCK_JOB_PENDING"), "a failed job is never pending");
  });

  test("a run() that throws with auto-dismiss=false shows the error in query-jobs/query-block-jobs", async () => {
    const r = record();
    const job = makeJob(r, { autoDismiss: false }, async () => {
      throw new Error("boom");
    });
    job.start();
    await job.concluded;
    assert.equal(job.jobInfo().error, "boom");
    assert.equal(job.blockJobInfo().error, "boom");
    assert.equal(job.jobInfo().status, "concluded");
  });

  test("pause/resume emit paused/running; pauses nest; the body parks at its pause point", async () => {
    const r = record();
    const gate = deferred();
    const atPoint = deferred();
    const after = deferred<boolean>();
    const job = makeJob(r, {}, async (j) => {
      await gate.promise;
      atPoint.resolve();
      after.resolve(await j.point());
    });
    job.start();
    assert.ok(job.busy);
    job.pause();
    assert.equal(job.status, "paused");
    assert.ok(job.paused);
    assert.equal(job.blockJobInfo().paused, true);
    job.pause(); // nested
    gate.resolve();
    await atPoint.promise;
    assert.equal(job.busy, false, "parked at the pause point");
    job.resume();
    assert.equal(job.status, "paused", "one resume of two pauses keeps it paused");
    assert.deepEqual(r.log, ["created", "running", "paused"]);
    job.resume();
    assert.equal(job.status, "running");
    assert.equal(job.blockJobInfo().paused, false);
    assert.equal(await after.promise, false, "pausePoint returns false: not cancelled");
    await job.concluded;
    assert.deepEqual(r.log.slice(0, 5), ["created", "running", "paused", "running", "waiting"]);
    assertLegalPath(r);
    // resume of a job that is not paused is accepted and changes nothing (QEMU does the same).
    const r2 = record();
    const started = deferred();
    const job2 = makeJob(r2, {}, untilCancelled(started));
    job2.start();
    await started.promise;
    job2.resume();
    assert.equal(job2.status, "running");
    assert.deepEqual(r2.log, ["created", "running"]);
    job2.cancel();
    await job2.concluded;
  });

  test("ready <-> standby on pause; BLOCK_JOB_READY; complete only in ready", async () => {
    const r = record();
    const finish = deferred();
    const readyNow = deferred();
    const job = makeJob(r, {}, async (j) => {
      j.progressTotal = j.progressCurrent = 42;
      j.goReady();
      readyNow.resolve();
      await finish.promise;
    });
    job.completeHook = () => finish.resolve();
    job.start();
    await readyNow.promise;
    assert.equal(job.status, "ready");
    assert.ok(job.ready);
    assert.deepEqual(r.events.find((e) => e.event === "BLOCK_JOB_READY")!.data, {
      type: "test",
      device: "x",
      len: 42,
      offset: 42,
      speed: 0,
    });
    job.pause();
    assert.equal(job.status, "standby");
    assert.ok(job.ready, "standby still counts as ready");
    assertRefused(job, "complete", () => job.complete());
    job.resume();
    assert.equal(job.status, "ready");
    job.complete();
    await job.concluded;
    assert.deepEqual(r.log, [
      "created",
      "running",
      "ready",
      "BLOCK_JOB_READY",
      "standby",
      "ready",
      "waiting",
      "pending",
      "BLOCK_JOB_COMPLETED",
      "concluded",
      "null",
    ]);
    assertLegalPath(r);
  });

  test("verbs in the wrong state throw JobVerbError with QEMU's text", async () => {
    const r = record();
    const started = deferred();
    const job = makeJob(r, { autoDismiss: false }, untilCancelled(started));
    assertRefused(job, "complete", () => job.complete());
    assertRefused(job, "finalize", () => job.finalize());
    assertRefused(job, "dismiss", () => job.dismiss());
    job.start();
    await started.promise;
    assertRefused(job, "complete", () => job.complete());
    assertRefused(job, "finalize", () => job.finalize());
    assertRefused(job, "dismiss", () => job.dismiss());
    assert.throws(() => job.complete(), {
      message: "Job 'x' in state 'running' cannot accept command verb 'complete'",
    });
    // A job without completion support refuses complete in ready with its own message.
    const r2 = record();
    const ready = deferred();
    const job2 = makeJob(r2, {}, async (j) => {
      j.goReady();
      ready.resolve();
      await j.cancelledSignal();
    });
    job2.start();
    await ready.promise;
    assert.throws(
      () => job2.complete(),
      (e: unknown) => e instanceof JobVerbError && /does not support/.test(e.message),
    );
    job2.cancel();
    await job2.concluded;
    job.cancel();
    await job.concluded;
    assertRefused(job, "cancel", () => job.cancel());
  });

  test("set-speed changes the speed; a negative or fractional speed is EINVAL", async () => {
    const r = record();
    const started = deferred();
    const job = makeJob(r, { speed: 1000 }, untilCancelled(started));
    assert.equal(job.speed, 1000);
    job.start();
    await started.promise;
    job.setSpeed(5 * 1024 * 1024);
    assert.equal(job.speed, 5 * 1024 * 1024);
    assert.equal(job.blockJobInfo().speed, 5 * 1024 * 1024);
    for (const bad of [-1, 1.5, Number.NaN]) {
      assert.throws(
        () => job.setSpeed(bad),
        (e: unknown) => e instanceof BlockError && e.code === "EINVAL",
      );
    }
    assert.equal(job.speed, 5 * 1024 * 1024);
    job.cancel();
    await job.concluded;
  });
});

describe("error policies", () => {
  async function runningJob(r: Recorder): Promise<TestJob> {
    const started = deferred();
    const job = makeJob(r, {}, untilCancelled(started));
    job.start();
    await started.promise;
    return job;
  }

  test(`ignore: a burst of 1000 errors emits at most ${ERROR_EVENTS_PER_SECOND_MAX} BLOCK_JOB_ERROR events`, async (t: TestContext) => {
    t.mock.timers.enable({ apis: ["Date"], now: 1_000_000 });
    const r = record();
    const job = await runningJob(r);
    for (let i = 0; i < 1000; i++) assert.equal(job.ioError("ignore"), "ignore");
    const errors = r.events.filter((e) => e.event === "BLOCK_JOB_ERROR");
    assert.equal(errors.length, ERROR_EVENTS_PER_SECOND_MAX);
    assert.ok(ERROR_EVENTS_PER_SECOND_MAX <= 10, "the limit itself is small");
    for (const e of errors) assert.deepEqual(e.data, { device: "x", operation: "write", action: "ignore" });
    assert.equal(job.suppressedErrorEvents, 1000 - ERROR_EVENTS_PER_SECOND_MAX, "the rest are counted");
    assert.equal(job.status, "running", "ignore keeps the job running");
    assert.equal(job.ioStatus, "ok");

    // Within the same second nothing more; a second later a new window opens.
    t.mock.timers.tick(999);
    job.ioError("ignore");
    assert.equal(r.events.filter((e) => e.event === "BLOCK_JOB_ERROR").length, ERROR_EVENTS_PER_SECOND_MAX);
    t.mock.timers.tick(1);
    for (let i = 0; i < 1000; i++) job.ioError("ignore");
    assert.equal(
      r.events.filter((e) => e.event === "BLOCK_JOB_ERROR").length,
      2 * ERROR_EVENTS_PER_SECOND_MAX,
    );
    job.cancel();
    await job.concluded;
  });

  test("stop: pauses the job with io-status failed and BLOCK_JOB_ERROR action stop; resume clears it", async () => {
    const r = record();
    const job = await runningJob(r);
    assert.equal(job.ioError("stop"), "stop");
    assert.equal(job.status, "paused");
    assert.ok(job.paused);
    assert.equal(job.ioStatus, "failed");
    assert.equal(job.blockJobInfo()["io-status"], "failed");
    assert.deepEqual(r.log, ["created", "running", "BLOCK_JOB_ERROR", "paused"]);
    assert.deepEqual(r.events[2].data, { device: "x", operation: "write", action: "stop" });
    // A second error while stopped does not pause twice: one resume is enough.
    job.ioError("stop");
    job.resume();
    assert.equal(job.status, "running");
    assert.equal(job.ioStatus, "ok");
    job.cancel();
    await job.concluded;
    assertLegalPath(r);
  });

  test("enospc: stops with io-status nospace on ENOSPC, reports anything else", async () => {
    const r = record();
    const job = await runningJob(r);
    assert.equal(job.ioError("enospc", new BlockError("EIO", "io")), "report");
    assert.equal(job.status, "running");
    assert.equal(job.ioError("enospc", new BlockError("ENOSPC", "full")), "stop");
    assert.equal(job.status, "paused");
    assert.equal(job.ioStatus, "nospace");
    const actions = r.events.filter((e) => e.event === "BLOCK_JOB_ERROR").map((e) => e.data.action);
    assert.deepEqual(actions, ["report", "stop"]);
    job.cancel();
    await job.concluded;
  });

  test("report: the action is returned and the event emitted; the job itself decides to end", async () => {
    const r = record();
    const job = await runningJob(r);
    assert.equal(job.ioError("report"), "report");
    assert.equal(job.status, "running");
    assert.deepEqual(r.log.at(-1), "BLOCK_JOB_ERROR");
    job.cancel();
    await job.concluded;
  });
});
