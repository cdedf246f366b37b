/**
 * The throttle's maths and its group, without I/O: QEMU's leaky buckets against a simple model
 * (fast-check), QEMU's validation texts, and the group's queue (round-robin between members, one
 * timer, the queue bound, abort at close) on a fake clock. A throttle node over a memory driver
 * shows flush and block status passing while writes wait, and close failing what still waits.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { BlockError } from "../../src/core/errors.js";
import {
  applyLimits,
  bucketSize,
  configToLimits,
  NO_LIMITS,
  ThrottleConfigError,
  ThrottleState,
  type ThrottleConfig,
} from "../../src/core/throttle.js";
import { MemoryDriver } from "../../src/block/drivers/memory.js";
import { ThrottleDriver } from "../../src/block/filters/throttle.js";
import {
  THROTTLE_QUEUED_MAX,
  ThrottleGroup,
  type ThrottleClock,
} from "../../src/block/filters/throttle-group.js";
import { BlockNode } from "../../src/io/block-node.js";

const NS = 1e9;
const MiB = 1024 * 1024;

/** A clock whose time moves only when told; counts the timers armed at once. */
class FakeClock implements ThrottleClock {
  now = 0;
  #timers = new Map<number, { at: number; fn: () => void }>();
  #next = 1;
  maxArmed = 0;
  nowNs(): number {
    return this.now;
  }
  setTimer(fn: () => void, delayMs: number): unknown {
    const id = this.#next++;
    this.#timers.set(id, { at: this.now + delayMs * 1e6, fn });
    this.maxArmed = Math.max(this.maxArmed, this.#timers.size);
    return id;
  }
  clearTimer(handle: unknown): void {
    this.#timers.delete(handle as number);
  }
  get armed(): number {
    return this.#timers.size;
  }
  /** Moves to the earliest timer and runs it; false if none is armed. */
  fireNext(): boolean {
    const first = [...this.#timers.entries()].sort((a, b) => a[1].at - b[1].at)[0];
    if (!first) return false;
    this.#timers.delete(first[0]);
    this.now = Math.max(this.now, first[1].at);
    first[1].fn();
    return true;
  }
}

const flush = (): Promise<void> => new Promise((r) => setImmediate(r));

describe("leaky buckets (util/throttle.c semantics) against a model", () => {
  interface Admitted {
    readonly atNs: number;
    readonly bytes: number;
  }

  /**
   * Offers requests at the given gaps; each starts as soon as the state allows (time jumps to the
   * wait it reports), as a queue in front of it would. Returns when each one started.
   */
  function admitAll(
    config: ThrottleConfig,
    requests: ReadonlyArray<{ gapNs: number; bytes: number }>,
  ): Admitted[] {
    const state = new ThrottleState(config, 0);
    let now = 0;
    const out: Admitted[] = [];
    for (const r of requests) {
      now += r.gapNs;
      // At least 1 ns a step: a wait far below the clock's magnitude would not move it.
      for (let wait = state.waitNs(true, now); wait > 0; wait = state.waitNs(true, now))
        now += Math.max(wait, 1);
      state.account(true, r.bytes);
      out.push({ atNs: now, bytes: r.bytes });
    }
    return out;
  }

  const rateArb = fc.integer({ min: 1 * MiB, max: 200 * MiB });
  const configArb = fc
    .record({
      avg: rateArb,
      burst: fc.option(
        fc.record({
          factor: fc.double({ min: 1, max: 4, noNaN: true }),
          length: fc.integer({ min: 1, max: 5 }),
        }),
      ),
    })
    .map(({ avg, burst }) =>
      applyLimits(NO_LIMITS, {
        "bps-total": avg,
        ...(burst
          ? { "bps-total-max": Math.ceil(avg * burst.factor), "bps-total-max-length": burst.length }
          : {}),
      }),
    );
  const requestsArb = fc.array(
    fc.record({
      gapNs: fc.oneof(
        fc.constant(0),
        fc.integer({ min: 0, max: 0.05 * NS }),
        fc.integer({ min: 0, max: 2 * NS }),
      ),
      bytes: fc.integer({ min: 1, max: 4 * MiB }),
    }),
    { minLength: 1, maxLength: 200 },
  );

  test("in any window, admitted bytes <= avg * T + bucket + one request (and <= max * T + max/10 + one while bursting)", () => {
    fc.assert(
      fc.property(configArb, requestsArb, (config, requests) => {
        const b = config.buckets["bps-total"];
        const admitted = admitAll(config, requests);
        const largest = Math.max(...requests.map((r) => r.bytes));
        for (let i = 0; i < admitted.length; i++) {
          let sum = 0;
          for (let j = i; j < admitted.length; j++) {
            sum += admitted[j].bytes;
            const T = (admitted[j].atNs - admitted[i].atNs) / NS;
            const bound = b.avg * T + bucketSize(b) + largest;
            assert.ok(sum <= bound + 1, `window ${i}..${j}: ${sum} bytes in ${T}s, bound ${bound}`);
            if (b.burstLength > 1) {
              const burstBound = b.max * T + b.max / 10 + largest;
              assert.ok(
                sum <= burstBound + 1,
                `window ${i}..${j}: ${sum} bytes in ${T}s over the burst rate`,
              );
            }
          }
        }
      }),
      { numRuns: 200 },
    );
  });

  test("a saturated queue is not held below the rate: admitted >= avg * T (the bound can fail both ways)", () => {
    fc.assert(
      fc.property(
        configArb,
        fc.array(fc.integer({ min: 1, max: 4 * MiB }), { minLength: 20, maxLength: 200 }),
        (config, sizes) => {
          const avg = config.buckets["bps-total"].avg;
          const admitted = admitAll(
            config,
            sizes.map((bytes) => ({ gapNs: 0, bytes })),
          );
          const last = admitted[admitted.length - 1];
          const before = admitted.slice(0, -1).reduce((s, a) => s + a.bytes, 0);
          // Each request that waited started the moment the level drained to the bucket size.
          assert.ok(
            before >= (avg * last.atNs) / NS - 1,
            `${before} bytes before ${last.atNs / NS}s at ${avg}/s`,
          );
        },
      ),
      { numRuns: 200 },
    );
  });

  test("iops-size counts a large request as several operations; reads and writes use their own buckets", () => {
    const config = applyLimits(NO_LIMITS, { "iops-total": 10, "iops-size": 4096 });
    const s = new ThrottleState(config, 0);
    assert.equal(s.waitNs(false, 0), 0);
    s.account(false, 40960); // 10 operations
    assert.equal(s.level("iops-total"), 10);
    // The bucket holds a tenth of a second (1 operation): 9 must leak at 10/s first.
    assert.equal(Math.round(s.waitNs(false, 0) / 1e6), 900);
    s.account(true, 100); // smaller than iops-size: one operation
    assert.equal(s.level("iops-total"), 11);

    const rw = new ThrottleState(applyLimits(NO_LIMITS, { "bps-read": 1000, "bps-write": 1000 }), 0);
    rw.account(true, 5000);
    assert.ok(rw.waitNs(true, 0) > 0, "writes wait");
    assert.equal(rw.waitNs(false, 0), 0, "reads do not");
  });
});

describe("ThrottleLimits validation (QEMU's texts)", () => {
  const refused: Array<[Record<string, number>, string]> = [
    [
      { "bps-total": 1000, "bps-read": 10 },
      "bps/iops/max total values and read/write values cannot be used at the same time",
    ],
    [
      { "iops-total": 1000, "iops-write": 10 },
      "bps/iops/max total values and read/write values cannot be used at the same time",
    ],
    [{ "bps-total": 1000, "bps-total-max": 10 }, "bps_max/iops_max cannot be lower than bps/iops"],
    [{ "bps-total-max": 10 }, "bps_max/iops_max require corresponding bps/iops values"],
    [{ "bps-total": -1 }, "bps/iops/max values must be within [0, 1000000000000000]"],
    [{ "bps-total": 1e15 + 1 }, "bps/iops/max values must be within [0, 1000000000000000]"],
    [{ "bps-total": 100, "bps-total-max": 200, "bps-total-max-length": 0 }, "the burst length cannot be 0"],
    [{ "bps-total": 100, "bps-total-max-length": 5 }, "burst length set without burst rate"],
    [
      { "bps-total": 1e15, "bps-total-max": 1e15, "bps-total-max-length": 2 },
      "burst length too high for this burst rate",
    ],
    [
      { "bps-total": 1000, "bps-total-max": 2000, "bps-total-max-length": 1e12 },
      "bps-total-max-length value must be in the range [0, 4294967295]",
    ],
    [{ "iops-size": 4096 }, "iops size requires an iops value to be set"],
  ];
  for (const [limits, message] of refused) {
    test(`refused: ${JSON.stringify(limits)}`, () => {
      assert.throws(
        () => applyLimits(NO_LIMITS, limits),
        (err: unknown) => {
          assert.ok(err instanceof ThrottleConfigError);
          assert.equal(err.message, message);
          return true;
        },
      );
    });
  }

  test("members not given keep their value; every member is reported", () => {
    const a = applyLimits(NO_LIMITS, { "bps-total": 1000 });
    const b = applyLimits(a, { "iops-total": 77 });
    const l = configToLimits(b);
    assert.equal(l["bps-total"], 1000);
    assert.equal(l["iops-total"], 77);
    assert.equal(l["bps-total-max-length"], 1);
    assert.equal(Object.keys(l).length, 19);
  });
});

describe("throttle groups", () => {
  test("queued requests are released round-robin between members, by one timer", async () => {
    const clock = new FakeClock();
    const group = new ThrottleGroup("g", applyLimits(NO_LIMITS, { "iops-total": 10 }), clock);
    const a = group.join("a");
    const b = group.join("b");
    const order: string[] = [];
    // Fill the bucket (a tenth of a second: 1 operation; a request may start while the level is
    // not above it, so two do), then queue 5 from a before 5 from b.
    assert.equal(a.admit(true, 512), null);
    assert.equal(b.admit(true, 512), null);
    const waits: Promise<void>[] = [];
    for (const [m, name] of [
      [a, "a"],
      [a, "a"],
      [a, "a"],
      [a, "a"],
      [a, "a"],
      [b, "b"],
      [b, "b"],
      [b, "b"],
      [b, "b"],
      [b, "b"],
    ] as const) {
      const p = m.admit(true, 512);
      assert.ok(p, "a request behind a full bucket waits");
      waits.push(p.then(() => void order.push(name)));
    }
    assert.equal(group.queued, 10);
    while (clock.fireNext()) await flush();
    await Promise.all(waits);
    assert.equal(order.join(""), "ababababab");
    assert.equal(clock.maxArmed, 1, "one timer per group");
    assert.equal(group.delayed, 10);
    // 1 op per 0.1 s after the first: the tenth started at ~1 s.
    assert.ok(clock.now >= 0.9 * NS && clock.now <= 1.1 * NS, `took ${clock.now / NS}s`);
  });

  test("a new request does not overtake queued ones; new limits release them", async () => {
    const clock = new FakeClock();
    const group = new ThrottleGroup("g", applyLimits(NO_LIMITS, { "bps-total": 1000 }), clock);
    const m = group.join("m");
    assert.equal(m.admit(false, 5000), null);
    const first = m.admit(false, 10);
    assert.ok(first);
    clock.now += 10 * NS; // the bucket has drained, but the timer has not fired yet
    assert.ok(m.admit(false, 10), "queued behind the earlier request");
    group.setConfig(NO_LIMITS);
    await first;
    assert.equal(group.queued, 0);
    assert.equal(clock.armed, 0);
  });

  test("the queue is bounded; abort fails what waits with ESHUTDOWN", async () => {
    const clock = new FakeClock();
    const group = new ThrottleGroup("g", applyLimits(NO_LIMITS, { "iops-total": 1 }), clock);
    const m = group.join("m");
    assert.equal(m.admit(true, 1), null);
    const waiting: Promise<void>[] = [];
    for (let i = 0; i < THROTTLE_QUEUED_MAX; i++) waiting.push(m.admit(true, 1)!);
    await assert.rejects(
      m.admit(true, 1)!,
      (err: unknown) => err instanceof BlockError && err.code === "ENOMEM",
    );
    const settled = Promise.allSettled(waiting);
    group.leave(m);
    const results = await settled;
    assert.ok(results.every((r) => r.status === "rejected" && (r.reason as BlockError).code === "ESHUTDOWN"));
    assert.equal(group.queued, 0);
    assert.equal(clock.armed, 0, "no timer left behind");
  });

  test("a throttle node: flush and block status pass while writes wait; close fails the waiting writes", async () => {
    const group = new ThrottleGroup("g", applyLimits(NO_LIMITS, { "bps-total": 1024 }));
    const node = new BlockNode("t", new ThrottleDriver(new MemoryDriver(MiB), group, "t"));
    await node.write(0, [Buffer.alloc(64 * 1024, 1)], {}); // far past the bucket: the next waits ~60 s
    const stuck = node.write(0, [Buffer.alloc(512, 2)], {});
    const stuckResult = stuck.then(
      () => "written",
      (err: unknown) => (err instanceof BlockError ? err.code : String(err)),
    );
    await node.flush();
    assert.equal((await node.blockStatus(0, MiB)).length > 0, true);
    assert.equal(group.queued, 1);
    await node.close();
    assert.equal(await stuckResult, "ESHUTDOWN");
    assert.equal(group.memberCount, 0);
  });
});
