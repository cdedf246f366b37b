/**
 * Every driver, wrapped in a BlockNode, against a plain byte-array model under random batches of
 * concurrent operations. Within one batch the mutated ranges never overlap (concurrent overlapping
 * writes have no defined order); reads and block status in a batch see ranges no mutation of that
 * batch touches, so they are checked against the model as it was before the batch.
 */
import { test, describe, after } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import fc from "fast-check";
import { BlockError } from "../../src/core/errors.js";
import { rangesOverlap } from "../../src/core/ranges.js";
import { KiB, MiB } from "../../src/core/units.js";
import type { BlockDriver } from "../../src/block/driver.js";
import { MemoryDriver } from "../../src/block/drivers/memory.js";
import { FileDriver } from "../../src/block/drivers/file.js";
import { engineForMode, IO_ENGINE_NAMES } from "../../src/block/drivers/io-engine/index.js";
import { NullDriver } from "../../src/block/drivers/null.js";
import { ThrottleDriver } from "../../src/block/filters/throttle.js";
import { ThrottleGroup } from "../../src/block/filters/throttle-group.js";
import { applyLimits, NO_LIMITS } from "../../src/core/throttle.js";
import { BlockNode } from "../../src/io/block-node.js";

const SIZE = 1 * MiB;
const NUM_RUNS = 60;

const tmp = fs.mkdtempSync(path.join(os.tmpdir(), "drivetap-drivers-"));
after(() => fs.rmSync(tmp, { recursive: true, force: true }));

let fileCounter = 0;
function freshImage(): string {
  const p = path.join(tmp, `disk-${fileCounter++}.img`);
  fs.writeFileSync(p, "");
  fs.truncateSync(p, SIZE);
  return p;
}

/** Deterministic bytes from a seed (xorshift32), so fast-check does not have to generate big arrays. */
function bytes(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  let x = seed | 0 || 0x9e3779b9;
  for (let i = 0; i < length; i++) {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    b[i] = x & 0xff;
  }
  return b;
}

// ---- the model ----------------------------------------------------------------------------------------

class Model {
  readonly data = new Uint8Array(SIZE);
  /** 1 where a discard left the content undefined (the driver may keep or drop the data). */
  readonly unknown = new Uint8Array(SIZE);

  write(offset: number, data: Buffer): void {
    this.data.set(data, offset);
    this.unknown.fill(0, offset, offset + data.length);
  }
  zero(offset: number, length: number): void {
    this.data.fill(0, offset, offset + length);
    this.unknown.fill(0, offset, offset + length);
  }
  discard(offset: number, length: number, readsZero: boolean): void {
    if (readsZero) this.zero(offset, length);
    else this.unknown.fill(1, offset, offset + length);
  }
  snapshot(): Model {
    const m = new Model();
    m.data.set(this.data);
    m.unknown.set(this.unknown);
    return m;
  }
  /** Asserts `got` (read at offset) matches wherever the model knows the content. */
  check(offset: number, got: Buffer, what: string): void {
    for (let i = 0; i < got.length; i++) {
      const pos = offset + i;
      if (this.unknown[pos]) continue;
      if (got[i] !== this.data[pos]) {
        assert.fail(`${what}: byte at ${pos} is ${got[i]}, model has ${this.data[pos]}`);
      }
    }
  }
  mayBeNonZero(offset: number, length: number): number {
    for (let pos = offset; pos < offset + length; pos++)
      if (this.data[pos] !== 0 && !this.unknown[pos]) return pos;
    return -1;
  }
}

// ---- operations -----------------------------------------------------------------------------------------

type Op =
  | { kind: "write"; offset: number; length: number; seed: number; cuts: number[]; fua: boolean }
  | { kind: "zero"; offset: number; length: number; mayTrim: boolean; fastZero: boolean; fua: boolean }
  | { kind: "discard"; offset: number; length: number }
  | { kind: "flush" }
  | { kind: "read"; offset: number; length: number }
  | { kind: "status"; offset: number; length: number };

/** Offsets and lengths biased towards block and chunk boundaries, where drivers split work. */
const offsetArb = fc.oneof(
  fc.nat({ max: SIZE - 1 }),
  fc.nat({ max: SIZE / (4 * KiB) - 1 }).map((n) => n * 4 * KiB),
  fc
    .nat({ max: SIZE / (64 * KiB) - 1 })
    .chain((n) => fc.integer({ min: -3, max: 3 }).map((d) => Math.max(0, n * 64 * KiB + d))),
);
const lengthArb = fc.oneof(
  { arbitrary: fc.integer({ min: 1, max: 4 * KiB }), weight: 3 },
  { arbitrary: fc.integer({ min: 1, max: 160 * KiB }), weight: 2 },
  { arbitrary: fc.constantFrom(4 * KiB, 64 * KiB, 128 * KiB), weight: 1 },
  { arbitrary: fc.constant(0), weight: 1 },
);
const rangeArb = fc.tuple(offsetArb, lengthArb).map(([offset, length]) => ({
  offset,
  length: Math.min(length, SIZE - offset),
}));

const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 4,
    arbitrary: fc
      .record({
        r: rangeArb,
        seed: fc.integer(),
        cuts: fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 4 }),
        fua: fc.boolean(),
      })
      .map(({ r, seed, cuts, fua }): Op => ({ kind: "write", ...r, seed, cuts, fua })),
  },
  {
    weight: 2,
    arbitrary: fc
      .record({ r: rangeArb, mayTrim: fc.boolean(), fastZero: fc.boolean(), fua: fc.boolean() })
      .map(({ r, ...f }): Op => ({ kind: "zero", ...r, ...f })),
  },
  { weight: 2, arbitrary: rangeArb.map((r): Op => ({ kind: "discard", ...r })) },
  { weight: 1, arbitrary: fc.constant<Op>({ kind: "flush" }) },
  { weight: 2, arbitrary: rangeArb.map((r): Op => ({ kind: "read", ...r })) },
  {
    weight: 2,
    arbitrary: fc
      .tuple(fc.nat({ max: SIZE - 1 }), fc.integer({ min: 1, max: 2 * SIZE }))
      .map(([offset, length]): Op => ({ kind: "status", offset, length })),
  },
);

function isMutation(op: Op): op is Extract<Op, { kind: "write" | "zero" | "discard" }> {
  return op.kind === "write" || op.kind === "zero" || op.kind === "discard";
}

function opRange(op: Op): { offset: number; length: number } | null {
  if (op.kind === "flush") return null;
  if (op.kind === "status") return { offset: op.offset, length: Math.min(op.length, SIZE - op.offset) };
  return op;
}

/** Drops ops whose ranges overlap a mutation kept earlier in the batch (or that a later mutation would overlap). */
function nonOverlapping(ops: Op[]): Op[] {
  const kept: Op[] = [];
  for (const op of ops) {
    const r = opRange(op);
    const clash =
      r !== null &&
      kept.some((k) => {
        const kr = opRange(k);
        if (kr === null || !(isMutation(op) || isMutation(k))) return false;
        // Zero-length ranges still count as touching the byte they sit on, to be safe.
        return rangesOverlap(kr.offset, Math.max(kr.length, 1), r.offset, Math.max(r.length, 1));
      });
    if (!clash) kept.push(op);
  }
  return kept;
}

const batchesArb = fc.array(fc.array(opArb, { minLength: 1, maxLength: 8 }).map(nonOverlapping), {
  minLength: 1,
  maxLength: 6,
});

function iovOf(data: Buffer, cuts: number[]): Buffer[] {
  const points = [...new Set(cuts.map((c) => Math.floor(c * data.length)))].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const p of points) {
    out.push(data.subarray(prev, p)); // may be empty: drivers must cope with empty iovec entries
    prev = p;
  }
  out.push(data.subarray(prev));
  return out;
}

interface Subject {
  readonly name: string;
  /** Whether a discarded range must read back as zeros. */
  readonly discardReadsZero: boolean;
  make(): BlockDriver;
}

/**
 * Generous limits, shared by every run of the throttle subject, so that most requests pass at once.
 * How far the runs together get past the buckets depends on the machine's speed, so the first run
 * starts behind 64 MiB already counted (half a second at this rate): its requests must wait in the
 * queue, which is checked below.
 */
const THROTTLE_PRIMER_BYTES = 64 * MiB;
const throttleGroup = new ThrottleGroup(
  "property",
  applyLimits(NO_LIMITS, { "bps-total": 128 * MiB, "iops-total": 20_000 }),
);
let throttlePrimed = false;

function throttledMemory(): BlockDriver {
  const driver = new ThrottleDriver(new MemoryDriver(SIZE), throttleGroup, "d");
  if (!throttlePrimed) {
    throttlePrimed = true;
    const primer = throttleGroup.join("primer");
    assert.equal(primer.admit(true, THROTTLE_PRIMER_BYTES), null, "an empty bucket admits at once");
    throttleGroup.leave(primer);
  }
  return driver;
}

const subjects: Subject[] = [
  { name: "memory", discardReadsZero: true, make: () => new MemoryDriver(SIZE) },
  {
    name: "memory under a throttle filter",
    discardReadsZero: true,
    make: throttledMemory,
  },
  // The file driver on every I/O engine; io_uring must set up here (a refusal fails the test).
  ...IO_ENGINE_NAMES.map((name) => ({
    name: `file on ${name} (native addon ${FileDriver.nativeAvailable ? "loaded" : "absent"})`,
    discardReadsZero: FileDriver.nativeAvailable,
    make: () => FileDriver.open(freshImage(), { engine: engineForMode(name) }),
  })),
];

async function runBatches(
  node: BlockNode,
  model: Model,
  batches: Op[][],
  discardReadsZero: boolean,
): Promise<void> {
  for (const batch of batches) {
    const before = model.snapshot();
    const checks: Array<() => Promise<void>> = [];
    await Promise.all(
      batch.map(async (op) => {
        switch (op.kind) {
          case "write": {
            const data = bytes(op.length, op.seed);
            await node.write(op.offset, iovOf(data, op.cuts), { fua: op.fua });
            model.write(op.offset, data);
            return;
          }
          case "zero":
            try {
              await node.writeZeroes(op.offset, op.length, {
                mayTrim: op.mayTrim,
                fastZero: op.fastZero,
                fua: op.fua,
              });
            } catch (err) {
              // Only a fast-zero request may refuse, and then nothing changed.
              assert.ok(
                op.fastZero && err instanceof BlockError && err.code === "ENOTSUP",
                `unexpected ${err}`,
              );
              return;
            }
            model.zero(op.offset, op.length);
            return;
          case "discard":
            await node.discard(op.offset, op.length);
            model.discard(op.offset, op.length, discardReadsZero);
            return;
          case "flush":
            await node.flush();
            return;
          case "read": {
            const into = Buffer.alloc(op.length, 0xee);
            await node.read(op.offset, into);
            before.check(op.offset, into, `read ${op.offset}+${op.length}`);
            return;
          }
          case "status": {
            const extents = await node.blockStatus(op.offset, op.length);
            const want = Math.min(op.length, SIZE - op.offset);
            assert.ok(extents.length >= 1, "at least one extent");
            assert.equal(extents[0].offset, op.offset, "extents start at the requested offset");
            let pos = op.offset;
            for (const e of extents) {
              assert.equal(e.offset, pos, "extents are contiguous");
              assert.ok(e.length > 0, "no empty extents");
              pos += e.length;
              if (e.zero) {
                const at = before.mayBeNonZero(e.offset, e.length);
                assert.equal(at, -1, `extent ${e.offset}+${e.length} says zero but model has data at ${at}`);
                checks.push(async () => {
                  const got = Buffer.alloc(e.length, 0xee);
                  await node.read(e.offset, got);
                  assert.ok(
                    got.every((b) => b === 0),
                    `zero extent ${e.offset}+${e.length} reads non-zero`,
                  );
                });
              }
            }
            assert.ok(pos - op.offset <= want, `extents cover ${pos - op.offset} > requested ${want}`);
            return;
          }
        }
      }),
    );
    assert.equal(node.inFlightCount, 0);
    for (const c of checks) await c();
  }
  const all = Buffer.alloc(SIZE, 0xee);
  await node.read(0, all);
  model.check(0, all, "final read");
}

describe("drivers against a byte-array model under concurrent batches", () => {
  for (const subject of subjects) {
    test(`${subject.name}`, async () => {
      await fc.assert(
        fc.asyncProperty(batchesArb, async (batches) => {
          const node = new BlockNode("d", subject.make());
          try {
            await runBatches(node, new Model(), batches, subject.discardReadsZero);
          } finally {
            await node.close();
          }
        }),
        { numRuns: NUM_RUNS },
      );
    });
  }

  test("the throttle subject's requests did wait in the group's queue, and none is left", () => {
    assert.ok(throttleGroup.delayed > 0, "the limits were reached, so the queue was exercised");
    assert.equal(throttleGroup.queued, 0);
    assert.equal(throttleGroup.memberCount, 0, "every closed node left the group");
  });

  test("memory: discarded and zeroed whole chunks free their memory and report holes", async () => {
    const driver = new MemoryDriver(SIZE);
    const node = new BlockNode("m", driver);
    await node.write(0, [bytes(256 * KiB, 1)]);
    assert.equal(driver.allocatedBytes(), 256 * KiB);
    await node.discard(0, 128 * KiB);
    await node.writeZeroes(128 * KiB, 64 * KiB, { mayTrim: true });
    assert.equal(driver.allocatedBytes(), 64 * KiB);
    assert.deepEqual(await node.blockStatus(0, SIZE), [
      { offset: 0, length: 192 * KiB, hole: true, zero: true },
      { offset: 192 * KiB, length: 64 * KiB, hole: false, zero: false },
      { offset: 256 * KiB, length: SIZE - 256 * KiB, hole: true, zero: true },
    ]);
  });

  for (const engine of IO_ENGINE_NAMES)
    test(`file on ${engine}: a fresh truncated image reads as zeros and, with the addon, is one hole`, async () => {
      const node = new BlockNode("f", FileDriver.open(freshImage(), { engine: engineForMode(engine) }));
      try {
        const all = Buffer.alloc(SIZE, 1);
        await node.read(0, all);
        assert.ok(all.every((b) => b === 0));
        const extents = await node.blockStatus(0, SIZE);
        if (FileDriver.nativeAvailable)
          assert.deepEqual(extents, [{ offset: 0, length: SIZE, hole: true, zero: true }]);
        else assert.deepEqual(extents, [{ offset: 0, length: SIZE, hole: false, zero: false }]);
        await node.write(8 * KiB, [bytes(4 * KiB, 5)]);
        const after = await node.blockStatus(0, SIZE);
        const data = after.filter((e) => !e.zero);
        assert.ok(
          data.some((e) => e.offset <= 8 * KiB && e.offset + e.length >= 12 * KiB),
          "the written block is data",
        );
      } finally {
        await node.close();
      }
    });
});

describe("null driver", () => {
  test("reads zero, writes dropped, block status all zero", async () => {
    await fc.assert(
      fc.asyncProperty(batchesArb, async (batches) => {
        const node = new BlockNode("n", new NullDriver(SIZE));
        for (const batch of batches) {
          await Promise.all(
            batch.map(async (op) => {
              switch (op.kind) {
                case "write":
                  await node.write(op.offset, [bytes(op.length, op.seed)], { fua: op.fua });
                  return;
                case "zero":
                  await node.writeZeroes(op.offset, op.length, op);
                  return;
                case "discard":
                  await node.discard(op.offset, op.length);
                  return;
                case "flush":
                  await node.flush();
                  return;
                case "read":
                case "status":
                  return;
              }
            }),
          );
        }
        const all = Buffer.alloc(SIZE, 0xee);
        await node.read(0, all);
        assert.ok(
          all.every((b) => b === 0),
          "null driver reads zeros after writes",
        );
        const extents = await node.blockStatus(0, SIZE);
        assert.deepEqual(extents, [{ offset: 0, length: SIZE, hole: false, zero: true }]);
        await node.close();
      }),
      { numRuns: 30 },
    );
  });
});
