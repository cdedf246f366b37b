/**
 * BlockNode semantics, against small in-test drivers whose calls the test can see and hold: bounds,
 * hooks, serialisation, drain, emulation of write-zeroes and FUA, stats; and the ordering property
 * the stream job relies on.
 */
import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { BlockError, type BlockErrorCode } from "../../src/core/errors.js";
import { KiB, MiB } from "../../src/core/units.js";
import type {
  BlockDriver,
  DriverCapabilities,
  Extent,
  WriteFlags,
  ZeroFlags,
} from "../../src/block/driver.js";
import { BlockNode, ZERO_EMULATION_BYTES } from "../../src/io/block-node.js";
import type { TrackedRequest, WriteHook } from "../../src/io/tracked-request.js";

const SIZE = 64 * KiB;
const T = { timeout: 10_000 };

function deferred(): { promise: Promise<void>; resolve: () => void } {
  let resolve!: () => void;
  const promise = new Promise<void>((r) => (resolve = r));
  return { promise, resolve };
}

function filled(length: number, byte: number): Buffer {
  return Buffer.alloc(length, byte);
}

type CallKind = "pread" | "pwrite" | "pwriteZeroes" | "pdiscard" | "flush" | "blockStatus" | "close";

interface Call {
  readonly kind: CallKind;
  readonly offset: number;
  readonly length: number;
  readonly data?: Buffer;
  readonly flags?: ZeroFlags;
  done: boolean;
}

const NATIVE: DriverCapabilities = {
  zeroes: "native",
  fua: "native",
  discard: true,
  discardZeroes: true,
  blockStatus: false,
};

/**
 * A RAM driver that logs every call when it is entered, can hold any call on a promise the test
 * controls (`hold`), and can fail calls (`fail`).
 */
class TestDriver implements BlockDriver {
  readonly driverName = "test";
  readonly capabilities: DriverCapabilities;
  readonly mem: Buffer;
  readonly calls: Call[] = [];
  hold: ((call: Call) => Promise<void> | undefined) | null = null;
  fail: ((call: Call) => unknown) | null = null;
  #waiters: Array<{ pred: (c: Call) => boolean; resolve: (c: Call) => void }> = [];

  constructor(size: number, capabilities: DriverCapabilities = NATIVE) {
    this.mem = Buffer.alloc(size);
    this.capabilities = capabilities;
  }

  /** Resolves once a call matching pred has been entered (at once if one already was). */
  whenCalled(pred: (c: Call) => boolean): Promise<Call> {
    const found = this.calls.find(pred);
    if (found) return Promise.resolve(found);
    return new Promise((resolve) => this.#waiters.push({ pred, resolve }));
  }

  kinds(): string[] {
    return this.calls.map((c) => `${c.kind}@${c.offset}+${c.length}`);
  }

  async #enter(call: Call): Promise<void> {
    this.calls.push(call);
    this.#waiters = this.#waiters.filter((w) => (w.pred(call) ? (w.resolve(call), false) : true));
    const held = this.hold?.(call);
    if (held) await held;
    const err = this.fail?.(call);
    if (err) throw err;
  }

  size(): number {
    return this.mem.length;
  }
  async pread(offset: number, into: Buffer): Promise<void> {
    const call: Call = { kind: "pread", offset, length: into.length, done: false };
    await this.#enter(call);
    this.mem.copy(into, 0, offset, offset + into.length);
    call.done = true;
  }
  async pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    const buf = Buffer.concat(data);
    const call: Call = { kind: "pwrite", offset, length: buf.length, data: buf, flags, done: false };
    await this.#enter(call);
    buf.copy(this.mem, offset);
    call.done = true;
  }
  async pwriteZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    assert.equal(this.capabilities.zeroes, "native", "pwriteZeroes called on an emulate-zeroes driver");
    const call: Call = { kind: "pwriteZeroes", offset, length, flags, done: false };
    await this.#enter(call);
    this.mem.fill(0, offset, offset + length);
    call.done = true;
  }
  async pdiscard(offset: number, length: number): Promise<void> {
    const call: Call = { kind: "pdiscard", offset, length, done: false };
    await this.#enter(call);
    this.mem.fill(0, offset, offset + length);
    call.done = true;
  }
  async flush(): Promise<void> {
    const call: Call = { kind: "flush", offset: 0, length: 0, done: false };
    await this.#enter(call);
    call.done = true;
  }
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    const call: Call = { kind: "blockStatus", offset, length, done: false };
    await this.#enter(call);
    call.done = true;
    return [{ offset, length, hole: false, zero: false }];
  }
  async close(): Promise<void> {
    const call: Call = { kind: "close", offset: 0, length: 0, done: false };
    await this.#enter(call);
    call.done = true;
  }
}

function rejectsWith(p: Promise<unknown>, code: BlockErrorCode): Promise<void> {
  return assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof BlockError, `not a BlockError: ${err}`);
    assert.equal(err.code, code);
    return true;
  });
}

describe("bounds and state", () => {
  test("reads, writes, zeroes, discards and block status past the end", async () => {
    const driver = new TestDriver(SIZE);
    const node = new BlockNode("n", driver);
    await rejectsWith(node.read(SIZE - 1, Buffer.alloc(2)), "EINVAL");
    await rejectsWith(node.read(SIZE, Buffer.alloc(1)), "EINVAL");
    await rejectsWith(node.cache(SIZE - 1, 2), "EINVAL");
    await rejectsWith(node.write(SIZE - 1, [Buffer.alloc(1), Buffer.alloc(1)]), "ENOSPC");
    await rejectsWith(node.write(SIZE + 4096, [Buffer.alloc(1)]), "ENOSPC");
    await rejectsWith(node.writeZeroes(SIZE - 512, 513), "ENOSPC");
    await rejectsWith(node.discard(SIZE - 512, 513), "EINVAL");
    await rejectsWith(node.blockStatus(SIZE, 1), "EINVAL");
    await rejectsWith(node.blockStatus(0, 0), "EINVAL");
    for (const offset of [-1, 0.5, NaN, Infinity, 2 ** 53]) {
      await rejectsWith(node.read(offset, Buffer.alloc(1)), "EINVAL");
      await rejectsWith(node.writeZeroes(0, offset), "EINVAL");
      await rejectsWith(node.discard(offset, 1), "EINVAL");
    }
    assert.deepEqual(driver.calls, [], "the driver never sees a rejected request");
    assert.equal(node.inFlightCount, 0);

    // The last byte is fine, and block status is clamped to the disk.
    await node.write(SIZE - 1, [Buffer.from([7])]);
    const last = Buffer.alloc(1);
    await node.read(SIZE - 1, last);
    assert.equal(last[0], 7);
    assert.deepEqual(await node.blockStatus(SIZE - 100, 1000), [
      { offset: SIZE - 100, length: 100, hole: false, zero: false },
    ]);
    assert.deepEqual(driver.calls.at(-1), {
      kind: "blockStatus",
      offset: SIZE - 100,
      length: 100,
      done: true,
    });
  });

  test("a read-only node refuses changes with EPERM and still reads", async () => {
    const driver = new TestDriver(SIZE);
    driver.mem.fill(9, 0, 10);
    const node = new BlockNode("ro", driver, { readOnly: true });
    assert.equal(node.readOnly, true);
    await rejectsWith(node.write(0, [Buffer.alloc(1)]), "EPERM");
    await rejectsWith(node.writeZeroes(0, 1), "EPERM");
    await rejectsWith(node.discard(0, 1), "EPERM");
    assert.deepEqual(driver.calls, []);
    const into = Buffer.alloc(10);
    await node.read(0, into);
    assert.deepEqual(into, filled(10, 9));
    await node.cache(0, 10);
  });

  test("after close every verb fails with ESHUTDOWN, and close closes the driver once", async () => {
    const driver = new TestDriver(SIZE);
    const node = new BlockNode("n", driver);
    await node.close();
    await node.close();
    assert.deepEqual(driver.kinds(), ["close@0+0"]);
    await rejectsWith(node.read(0, Buffer.alloc(1)), "ESHUTDOWN");
    await rejectsWith(node.write(0, [Buffer.alloc(1)]), "ESHUTDOWN");
    await rejectsWith(node.writeZeroes(0, 1), "ESHUTDOWN");
    await rejectsWith(node.discard(0, 1), "ESHUTDOWN");
    await rejectsWith(node.flush(), "ESHUTDOWN");
    await rejectsWith(node.blockStatus(0, 1), "ESHUTDOWN");
    await rejectsWith(node.cache(0, 1), "ESHUTDOWN");
    assert.deepEqual(driver.kinds(), ["close@0+0"]);
  });
});

describe("write hooks", () => {
  interface Seen {
    phase: "before" | "after";
    kind: string;
    offset: number;
    length: number;
    flags: ZeroFlags;
    data: Buffer[] | null;
    /** Driver calls completed when the hook ran. */
    driverDone: number;
    error?: Error;
  }
  function recorder(log: Seen[], driver: TestDriver): WriteHook {
    const see = (phase: Seen["phase"], r: TrackedRequest, error?: Error): void => {
      log.push({
        phase,
        kind: r.kind,
        offset: r.offset,
        length: r.length,
        flags: { ...r.flags },
        data: r.data ? [...r.data] : null,
        driverDone: driver.calls.filter((c) => c.done).length,
        ...(phase === "after" ? { error } : {}),
      });
    };
    return { name: "rec", before: (r) => see("before", r), after: (r, e) => see("after", r, e) };
  }

  test("hooks see the writer's own buffers and kind, offset, length, flags for every hooked kind", async () => {
    const driver = new TestDriver(SIZE);
    const node = new BlockNode("n", driver);
    const log: Seen[] = [];
    node.addWriteHook(recorder(log, driver));
    const a = filled(3, 1);
    const b = filled(5, 2);
    await node.write(100, [a, b], { fua: true });
    await node.writeZeroes(200, 300, { mayTrim: true, fastZero: true });
    await node.discard(1000, 512);
    await node.flush();
    const reads = Buffer.alloc(8);
    await node.read(100, reads);
    await node.blockStatus(0, 10);
    await node.cache(0, 10);

    assert.equal(log.length, 8, "read, block status and cache are not hooked");
    assert.equal(log[0].data![0], a, "the hook sees the writer's buffer itself, not a copy");
    assert.equal(log[0].data![1], b);
    // Each hooked request calls the driver once, between its before() and after().
    assert.deepEqual(
      log.map((l) => l.driverDone),
      [0, 1, 1, 2, 2, 3, 3, 4],
    );
    assert.deepEqual(
      log.map(({ phase, kind, offset, length, flags, data, error }) => ({
        phase,
        kind,
        offset,
        length,
        flags,
        data: data && Buffer.concat(data).toString("hex"),
        error,
      })),
      [
        {
          phase: "before",
          kind: "write",
          offset: 100,
          length: 8,
          flags: { fua: true },
          data: "0101010202020202",
          error: undefined,
        },
        {
          phase: "after",
          kind: "write",
          offset: 100,
          length: 8,
          flags: { fua: true },
          data: "0101010202020202",
          error: undefined,
        },
        {
          phase: "before",
          kind: "zero",
          offset: 200,
          length: 300,
          flags: { mayTrim: true, fastZero: true },
          data: null,
          error: undefined,
        },
        {
          phase: "after",
          kind: "zero",
          offset: 200,
          length: 300,
          flags: { mayTrim: true, fastZero: true },
          data: null,
          error: undefined,
        },
        {
          phase: "before",
          kind: "discard",
          offset: 1000,
          length: 512,
          flags: {},
          data: null,
          error: undefined,
        },
        {
          phase: "after",
          kind: "discard",
          offset: 1000,
          length: 512,
          flags: {},
          data: null,
          error: undefined,
        },
        { phase: "before", kind: "flush", offset: 0, length: 0, flags: {}, data: null, error: undefined },
        { phase: "after", kind: "flush", offset: 0, length: 0, flags: {}, data: null, error: undefined },
      ],
    );
    assert.deepEqual(reads, Buffer.concat([a, b]));
  });

  test("a hook's before() that throws fails the request; the driver and every after() are skipped", async () => {
    const driver = new TestDriver(SIZE);
    const node = new BlockNode("n", driver);
    const calls: string[] = [];
    node.addWriteHook({
      name: "first",
      before: () => void calls.push("first.before"),
      after: () => void calls.push("first.after"),
    });
    const detach = node.addWriteHook({
      name: "refuser",
      before: (r) => {
        calls.push("refuser.before");
        if (r.offset === 0) throw new BlockError("ENOSPC", "target full");
        if (r.offset === 1) throw new Error("plain failure");
      },
      after: () => void calls.push("refuser.after"),
    });
    assert.equal(node.hookCount, 2);
    await rejectsWith(node.write(0, [filled(4, 1)]), "ENOSPC");
    await rejectsWith(node.writeZeroes(1, 4), "EIO");
    assert.deepEqual(driver.calls, []);
    assert.deepEqual(driver.mem.subarray(0, 8), filled(8, 0));
    assert.deepEqual(calls, ["first.before", "refuser.before", "first.before", "refuser.before"]);
    assert.equal(node.stats.failedOps, 2);
    assert.equal(node.stats.writeOps, 0);
    assert.equal(node.stats.zeroOps, 0);
    assert.equal(node.inFlightCount, 0);

    detach();
    assert.equal(node.hookCount, 1);
    await node.write(0, [filled(4, 1)]);
    assert.deepEqual(driver.mem.subarray(0, 4), filled(4, 1));
  });

  test("after() receives the driver's error as a BlockError, and the request fails with it", async () => {
    const driver = new TestDriver(SIZE);
    driver.fail = (c) =>
      c.offset === 512 ? Object.assign(new Error("no space left"), { code: "ENOSPC" }) : undefined;
    const node = new BlockNode("n", driver);
    const errors: Array<Error | undefined> = [];
    node.addWriteHook({ name: "a", after: (_r, e) => void errors.push(e) });
    node.addWriteHook({ name: "b", after: (_r, e) => void errors.push(e) });
    await rejectsWith(node.write(512, [filled(8, 1)]), "ENOSPC");
    await node.write(0, [filled(8, 1)]);
    assert.equal(errors.length, 4);
    assert.ok(errors[0] instanceof BlockError && errors[0].code === "ENOSPC", String(errors[0]));
    assert.equal(errors[1], errors[0], "every hook gets the same error");
    assert.deepEqual(errors.slice(2), [undefined, undefined]);
    assert.equal(node.stats.failedOps, 1);
    assert.equal(node.stats.writeOps, 1);
  });

  test("an after() that throws fails a request the driver completed, and later hooks still run", async () => {
    const driver = new TestDriver(SIZE);
    const node = new BlockNode("n", driver);
    const ran: string[] = [];
    node.addWriteHook({
      name: "bad",
      after: () => {
        ran.push("bad");
        throw new Error("target unreachable");
      },
    });
    node.addWriteHook({ name: "good", after: () => void ran.push("good") });
    await rejectsWith(node.write(0, [filled(4, 3)]), "EIO");
    assert.deepEqual(ran, ["bad", "good"]);
    assert.deepEqual(driver.mem.subarray(0, 4), filled(4, 3), "the driver did write");
  });
});

describe("serialisation", () => {
  test("a serialising hook makes overlapping writes reach the driver in submission order", T, async () => {
    const driver = new TestDriver(SIZE);
    const gate = deferred();
    driver.hold = (c) => (c.kind === "pwrite" && c.offset === 0 ? gate.promise : undefined);
    const node = new BlockNode("n", driver);
    const before: number[] = [];
    node.addWriteHook({ name: "ser", serialise: true, before: (r) => void before.push(r.offset) });

    const a = node.write(0, [filled(8, 1)]);
    await driver.whenCalled((c) => c.offset === 0);
    const b = node.write(4, [filled(8, 2)]); // overlaps a
    const z = node.writeZeroes(6, 1); // overlaps a and b
    const c = node.write(100, [filled(8, 3)]); // overlaps nothing
    const f = node.flush(); // flush is never serialised
    await Promise.all([c, f]);
    // c and the flush are concurrent with each other: their relative order is not defined.
    const sorted = (xs: Array<string | number>): Array<string | number> => [...xs].sort();
    assert.deepEqual(
      sorted(driver.kinds()),
      ["flush@0+0", "pwrite@0+8", "pwrite@100+8"],
      "b and z wait for a",
    );
    assert.deepEqual(sorted(before), sorted([0, 0, 100]));
    assert.equal(node.inFlightCount, 3);

    gate.resolve();
    await Promise.all([a, b, z]);
    assert.deepEqual(driver.kinds().slice(3), ["pwrite@4+8", "pwriteZeroes@6+1"]);
    assert.deepEqual(before.slice(3), [4, 6]);
    assert.deepEqual(driver.mem.subarray(0, 12), Buffer.from([1, 1, 1, 1, 2, 2, 0, 2, 2, 2, 2, 2]));
  });

  test("without a serialising hook, overlapping writes run concurrently", T, async () => {
    const driver = new TestDriver(SIZE);
    const gate = deferred();
    driver.hold = (c) => (c.offset === 0 ? gate.promise : undefined);
    const node = new BlockNode("n", driver);
    node.addWriteHook({ name: "plain", before: () => {} });
    const a = node.write(0, [filled(8, 1)]);
    await driver.whenCalled((c) => c.offset === 0);
    await node.write(4, [filled(8, 2)]);
    assert.equal(driver.calls[0].done, false, "b finished while a was still in the driver");
    gate.resolve();
    await a;
    // a landed last: its bytes win where they overlap.
    assert.deepEqual(driver.mem.subarray(0, 12), Buffer.from([1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2]));
  });

  test(
    "a write submitted after a serialising hook attaches waits for an overlapping earlier plain write",
    T,
    async () => {
      const driver = new TestDriver(SIZE);
      const gate = deferred();
      driver.hold = (c) => (c.offset === 0 ? gate.promise : undefined);
      const node = new BlockNode("n", driver);
      const a = node.write(0, [filled(8, 1)]);
      await driver.whenCalled((c) => c.offset === 0);
      node.addWriteHook({ name: "late", serialise: true });
      const b = node.discard(2, 2);
      await node.write(50, [filled(2, 5)]);
      assert.deepEqual(driver.kinds(), ["pwrite@0+8", "pwrite@50+2"]);
      gate.resolve();
      await Promise.all([a, b]);
      assert.deepEqual(driver.kinds(), ["pwrite@0+8", "pwrite@50+2", "pdiscard@2+2"]);
      assert.deepEqual(driver.mem.subarray(0, 8), Buffer.from([1, 1, 0, 0, 1, 1, 1, 1]));
    },
  );
});

describe("drain and close", () => {
  test(
    "drain() resolves at once when idle, and waits for requests in flight, including later ones",
    T,
    async () => {
      const driver = new TestDriver(SIZE);
      const gates = new Map([
        [0, deferred()],
        [1000, deferred()],
      ]);
      driver.hold = (c) => gates.get(c.offset)?.promise;
      const node = new BlockNode("n", driver);
      await node.drain();

      const a = node.write(0, [filled(8, 1)]);
      let drained = false;
      const d = node.drain().then(() => {
        drained = true;
        assert.equal(node.inFlightCount, 0);
      });
      await node.write(100, [filled(8, 1)]);
      await node.read(200, Buffer.alloc(4));
      assert.equal(drained, false, "drain resolved while a write was in the driver");
      const later = node.read(1000, Buffer.alloc(4));
      await driver.whenCalled((c) => c.offset === 1000);
      gates.get(0)!.resolve();
      await a;
      assert.equal(drained, false, "drain resolved while a request started after it was in flight");
      gates.get(1000)!.resolve();
      await later;
      await d;
      assert.equal(drained, true);
    },
  );

  test("close() waits for in-flight requests before closing the driver", T, async () => {
    const driver = new TestDriver(SIZE);
    const gate = deferred();
    driver.hold = (c) => (c.kind === "pwrite" ? gate.promise : undefined);
    const node = new BlockNode("n", driver);
    const w = node.write(0, [filled(4, 6)]);
    await driver.whenCalled((c) => c.kind === "pwrite");
    const closed = node.close();
    await rejectsWith(node.read(0, Buffer.alloc(1)), "ESHUTDOWN");
    assert.deepEqual(driver.kinds(), ["pwrite@0+4"]);
    gate.resolve();
    await Promise.all([w, closed]);
    assert.deepEqual(driver.kinds(), ["pwrite@0+4", "close@0+0"]);
    assert.deepEqual(driver.mem.subarray(0, 4), filled(4, 6));
  });
});

describe("emulation", () => {
  const EMULATE: DriverCapabilities = {
    zeroes: "emulate",
    fua: "emulate",
    discard: false,
    discardZeroes: false,
    blockStatus: false,
  };

  test("emulated write-zeroes writes zeros in bounded pieces and never calls pwriteZeroes", async () => {
    const size = 4 * MiB;
    const driver = new TestDriver(size, EMULATE);
    driver.mem.fill(0xff);
    const node = new BlockNode("n", driver);
    const length = 2 * ZERO_EMULATION_BYTES + 12345;
    await node.writeZeroes(1, length, { mayTrim: true });
    assert.deepEqual(
      driver.calls.map((c) => [c.kind, c.offset, c.length]),
      [
        ["pwrite", 1, ZERO_EMULATION_BYTES],
        ["pwrite", 1 + ZERO_EMULATION_BYTES, ZERO_EMULATION_BYTES],
        ["pwrite", 1 + 2 * ZERO_EMULATION_BYTES, 12345],
      ],
    );
    assert.equal(driver.mem[0], 0xff);
    assert.ok(driver.mem.subarray(1, 1 + length).every((b) => b === 0));
    assert.equal(driver.mem[1 + length], 0xff);
  });

  test("fast zero on an emulating driver fails ENOTSUP without touching the disk", async () => {
    const driver = new TestDriver(SIZE, EMULATE);
    driver.mem.fill(0xff);
    const node = new BlockNode("n", driver);
    await rejectsWith(node.writeZeroes(0, 4096, { fastZero: true }), "ENOTSUP");
    assert.deepEqual(driver.calls, []);
    assert.ok(driver.mem.every((b) => b === 0xff));
  });

  test("a native driver's ENOTSUP falls back to emulation, or fails a fast zero; other errors propagate", async () => {
    const driver = new TestDriver(SIZE);
    driver.mem.fill(0xff);
    driver.fail = (c) =>
      c.kind === "pwriteZeroes"
        ? c.offset === 0
          ? new BlockError("ENOTSUP", "cannot")
          : Object.assign(new Error("io"), { code: "EIO" })
        : undefined;
    const node = new BlockNode("n", driver);
    await node.writeZeroes(0, 100);
    assert.deepEqual(driver.kinds(), ["pwriteZeroes@0+100", "pwrite@0+100"]);
    assert.ok(driver.mem.subarray(0, 100).every((b) => b === 0));
    await rejectsWith(node.writeZeroes(0, 200, { fastZero: true }), "ENOTSUP");
    assert.ok(driver.mem.subarray(100, 200).every((b) => b === 0xff));
    await rejectsWith(node.writeZeroes(300, 10), "EIO");
    assert.deepEqual(driver.kinds(), [
      "pwriteZeroes@0+100",
      "pwrite@0+100",
      "pwriteZeroes@0+200",
      "pwriteZeroes@300+10",
    ]);
  });

  test("emulated FUA flushes after the write; native FUA passes the flag down", async () => {
    const emu = new TestDriver(SIZE, EMULATE);
    const en = new BlockNode("e", emu);
    await en.write(0, [filled(4, 1)], { fua: true });
    await en.write(8, [filled(4, 1)]);
    await en.writeZeroes(16, 4, { fua: true });
    await en.discard(24, 4, { fua: true });
    assert.deepEqual(emu.kinds(), [
      "pwrite@0+4",
      "flush@0+0",
      "pwrite@8+4",
      "pwrite@16+4",
      "flush@0+0",
      "flush@0+0",
    ]);

    const nat = new TestDriver(SIZE);
    const nn = new BlockNode("n", nat);
    await nn.write(0, [filled(4, 1)], { fua: true });
    await nn.writeZeroes(16, 4, { fua: true });
    assert.deepEqual(nat.kinds(), ["pwrite@0+4", "pwriteZeroes@16+4"]);
    assert.equal(nat.calls[0].flags?.fua, true);
    assert.equal(nat.calls[1].flags?.fua, true);
  });

  test("a failed emulated-FUA flush fails the write", async () => {
    const driver = new TestDriver(SIZE, EMULATE);
    driver.fail = (c) => (c.kind === "flush" ? Object.assign(new Error("EIO"), { code: "EIO" }) : undefined);
    const node = new BlockNode("n", driver);
    await rejectsWith(node.write(0, [filled(4, 1)], { fua: true }), "EIO");
    await node.write(0, [filled(4, 1)]);
  });

  test("discard is skipped on a driver without discard", async () => {
    const driver = new TestDriver(SIZE, EMULATE);
    driver.mem.fill(5);
    const node = new BlockNode("n", driver);
    await node.discard(0, 100);
    assert.deepEqual(driver.calls, []);
    assert.equal(node.stats.discardOps, 1);
  });
});

test("stats count ops and bytes; failures count as failed only", async () => {
  const driver = new TestDriver(SIZE);
  driver.fail = (c) => (c.offset === 4000 ? Object.assign(new Error("EIO"), { code: "EIO" }) : undefined);
  const node = new BlockNode("n", driver);
  await node.write(0, [filled(1000, 1), filled(24, 2)]);
  await node.write(2000, [filled(100, 1)]);
  await rejectsWith(node.write(4000, [filled(100, 1)]), "EIO");
  await node.writeZeroes(0, 4096);
  await node.discard(0, 512);
  await node.discard(512, 512);
  await node.discard(1024, 512);
  await node.flush();
  await node.flush();
  await node.read(0, Buffer.alloc(10));
  await node.read(0, Buffer.alloc(20));
  await rejectsWith(node.read(4000, Buffer.alloc(1)), "EIO");
  await node.blockStatus(0, 100);
  assert.deepEqual(node.stats, {
    readOps: 2,
    readBytes: 30,
    writeOps: 2,
    writeBytes: 1124,
    zeroOps: 1,
    zeroBytes: 4096,
    discardOps: 3,
    discardBytes: 1536,
    flushOps: 2,
    blockStatusOps: 1,
    failedOps: 2,
  });
});

// ---- the ordering property ---------------------------------------------------------------------------

/**
 * A RAM driver whose every operation yields to a fast-check scheduler half way through, so that
 * concurrent overlapping operations interleave (and tear) unless the node keeps them apart.
 */
class ScheduledDriver implements BlockDriver {
  readonly driverName = "scheduled";
  readonly capabilities: DriverCapabilities;
  readonly mem: Buffer;
  readonly #s: fc.Scheduler;

  constructor(size: number, s: fc.Scheduler, zeroes: "native" | "emulate") {
    this.mem = Buffer.alloc(size);
    this.#s = s;
    this.capabilities = { zeroes, fua: "native", discard: true, discardZeroes: true, blockStatus: false };
  }
  async #inTwoHalves(offset: number, src: Buffer | null, length: number, what: string): Promise<void> {
    const mid = length >> 1;
    await this.#s.schedule(Promise.resolve(), `${what} ${offset}+${length} first half`);
    if (src) src.copy(this.mem, offset, 0, mid);
    else this.mem.fill(0, offset, offset + mid);
    await this.#s.schedule(Promise.resolve(), `${what} ${offset}+${length} second half`);
    if (src) src.copy(this.mem, offset + mid, mid);
    else this.mem.fill(0, offset + mid, offset + length);
  }
  size(): number {
    return this.mem.length;
  }
  async pread(offset: number, into: Buffer): Promise<void> {
    this.mem.copy(into, 0, offset, offset + into.length);
  }
  async pwrite(offset: number, data: readonly Buffer[]): Promise<void> {
    const buf = Buffer.concat(data);
    await this.#inTwoHalves(offset, buf, buf.length, "write");
  }
  async pwriteZeroes(offset: number, length: number): Promise<void> {
    await this.#inTwoHalves(offset, null, length, "zero");
  }
  async pdiscard(offset: number, length: number): Promise<void> {
    await this.#inTwoHalves(offset, null, length, "discard");
  }
  async flush(): Promise<void> {
    await this.#s.schedule(Promise.resolve(), "flush");
  }
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, hole: false, zero: false }];
  }
  async close(): Promise<void> {}
}

const DISK = 2 * KiB;

type MOp =
  | { kind: "write"; offset: number; length: number; byte: number; pieces: number }
  | { kind: "zero" | "discard"; offset: number; length: number }
  | { kind: "flush" };

const mRange = fc
  .tuple(fc.nat({ max: DISK - 1 }), fc.integer({ min: 1, max: 700 }))
  .map(([offset, length]) => ({ offset, length: Math.min(length, DISK - offset) }));
const mOpArb: fc.Arbitrary<MOp> = fc.oneof(
  {
    weight: 5,
    arbitrary: fc
      .tuple(mRange, fc.integer({ min: 1, max: 255 }), fc.integer({ min: 1, max: 3 }))
      .map(([r, byte, pieces]): MOp => ({ kind: "write", ...r, byte, pieces })),
  },
  { weight: 2, arbitrary: mRange.map((r): MOp => ({ kind: "zero", ...r })) },
  { weight: 2, arbitrary: mRange.map((r): MOp => ({ kind: "discard", ...r })) },
  { weight: 1, arbitrary: fc.constant<MOp>({ kind: "flush" }) },
);

/** Runs ops concurrently under a scheduler; returns what the hook recorded and what the driver holds. */
async function runRecorded(
  s: fc.Scheduler,
  ops: MOp[],
  zeroes: "native" | "emulate",
  serialise: boolean,
): Promise<{ mirror: Buffer; disk: Buffer; order: Array<{ id: number; offset: number; length: number }> }> {
  const driver = new ScheduledDriver(DISK, s, zeroes);
  const node = new BlockNode("src", driver);
  const mirror = Buffer.alloc(DISK);
  const order: Array<{ id: number; offset: number; length: number }> = [];
  node.addWriteHook({
    name: "mirror",
    serialise,
    before: async (r) => {
      await s.schedule(Promise.resolve(), `hook ${r.kind} ${r.offset}`);
      if (r.kind === "flush") return;
      order.push({ id: r.id, offset: r.offset, length: r.length });
      if (r.kind === "write") Buffer.concat(r.data!).copy(mirror, r.offset);
      else mirror.fill(0, r.offset, r.offset + r.length);
    },
  });
  const all = Promise.all(
    ops.map((op, i) => {
      switch (op.kind) {
        case "write": {
          // Each write's bytes differ from every other's so an ordering mistake shows.
          const data = Buffer.alloc(op.length, (op.byte + i) % 256 || 1);
          const step = Math.ceil(op.length / op.pieces);
          const iov: Buffer[] = [];
          for (let p = 0; p < op.length; p += step) iov.push(data.subarray(p, p + step));
          return node.write(op.offset, iov);
        }
        case "zero":
          return node.writeZeroes(op.offset, op.length, { mayTrim: i % 2 === 0 });
        case "discard":
          return node.discard(op.offset, op.length);
        case "flush":
          return node.flush();
      }
    }),
  );
  await s.waitFor(all);
  assert.equal(node.inFlightCount, 0);
  return { mirror, disk: driver.mem, order };
}

describe("ordering property (what the stream job relies on)", () => {
  test("with a serialising hook, the recorded sequence replayed in order equals the driver's content", async () => {
    await fc.assert(
      fc.asyncProperty(
        fc.scheduler(),
        fc.array(mOpArb, { minLength: 1, maxLength: 16 }),
        fc.constantFrom<"native" | "emulate">("native", "emulate"),
        async (s, ops, zeroes) => {
          const { mirror, disk, order } = await runRecorded(s, ops, zeroes, true);
          assert.equal(order.length, ops.filter((o) => o.kind !== "flush").length);
          // Overlapping changes are seen in submission order.
          for (let i = 0; i < order.length; i++) {
            for (let j = i + 1; j < order.length; j++) {
              const a = order[i];
              const b = order[j];
              if (a.offset < b.offset + b.length && b.offset < a.offset + a.length) {
                assert.ok(a.id < b.id, `request ${b.id} overtook overlapping request ${a.id}`);
              }
            }
          }
          assert.ok(disk.equals(mirror), "driver content differs from the recorded sequence");
        },
      ),
      { numRuns: 150 },
    );
  });

  test("the property can fail: without serialisation, the fixture finds a divergence", async () => {
    const result = await fc.check(
      fc.asyncProperty(fc.scheduler(), fc.array(mOpArb, { minLength: 2, maxLength: 16 }), async (s, ops) => {
        const { mirror, disk } = await runRecorded(s, ops, "native", false);
        return disk.equals(mirror);
      }),
      { numRuns: 300, seed: 1 },
    );
    assert.equal(
      result.failed,
      true,
      "unserialised overlapping writes never diverged: the fixture cannot see reordering",
    );
  });
});
