/**
 * BlockNode.lockRange: it waits for overlapping writes already in flight (through their after() hooks),
 * holds overlapping writes that begin later before their hooks run, lets everything else through, and
 * never deadlocks with writes or other locks. Deterministic cases, then a fast-check property over
 * random ranges and release orders.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { BlockError } from "../../src/core/errors.js";
import { rangesOverlap } from "../../src/core/ranges.js";
import { BlockNode } from "../../src/io/block-node.js";
import { GatedWrites } from "../helpers/gated-writes.js";

const KiB = 1024;
const DISK = 256 * KiB;
const T = { timeout: 30_000 };

/** Lets every pending promise callback and I/O callback run: enough for an unblocked request to finish. */
async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** A promise's state without waiting for it. */
function track<T>(p: Promise<T>): { readonly done: boolean; readonly promise: Promise<T> } {
  const s = { done: false, promise: p };
  p.then(
    () => (s.done = true),
    () => (s.done = true),
  );
  return s;
}

function fresh(): { node: BlockNode; driver: GatedWrites } {
  const driver = new GatedWrites(DISK);
  return { node: new BlockNode("n", driver), driver };
}

const data = (length: number, byte = 0xab): Buffer[] => [Buffer.alloc(length, byte)];

test("lockRange waits for an overlapping write in flight, not for a disjoint one", T, async () => {
  const { node, driver } = fresh();
  driver.gate = () => true;
  const overlapping = track(node.write(8 * KiB, data(8 * KiB)));
  const disjoint = track(node.write(64 * KiB, data(4 * KiB)));
  await settle();
  assert.equal(driver.held.length, 2);
  const lock = track(node.lockRange(0, 12 * KiB));
  await settle();
  assert.equal(lock.done, false, "the lock waits for the overlapping write");
  driver.held[0].release();
  await overlapping.promise;
  const unlock = await lock.promise;
  assert.equal(disjoint.done, false, "the disjoint write is still held: the lock did not wait for it");
  unlock();
  driver.held[1].release();
  await disjoint.promise;
  assert.equal(node.rangeLockCount, 0);
});

test("lockRange waits for an overlapping write's after() hook (where a job's copy finishes)", T, async () => {
  const { node } = fresh();
  let finishCopy!: () => void;
  const copyDone = new Promise<void>((resolve) => (finishCopy = resolve));
  let afterEntered = false;
  node.addWriteHook({
    name: "slow-copy",
    after: async () => {
      afterEntered = true;
      await copyDone;
    },
  });
  const write = track(node.write(0, data(4 * KiB)));
  await settle();
  assert.ok(afterEntered, "the write reached its after() hook");
  const lock = track(node.lockRange(2 * KiB, 4 * KiB));
  await settle();
  assert.equal(lock.done, false, "the lock waits while after() runs");
  finishCopy();
  await write.promise;
  (await lock.promise)();
});

test("overlapping writes that begin under the lock wait before their hooks; others do not", T, async () => {
  const { node, driver } = fresh();
  const before: number[] = [];
  node.addWriteHook({
    name: "probe",
    before: (req) => void (req.kind !== "flush" && before.push(req.offset)),
  });
  const unlock = await node.lockRange(16 * KiB, 16 * KiB);
  const kinds = [
    track(node.write(12 * KiB, data(8 * KiB))), // overlaps the start
    track(node.writeZeroes(28 * KiB, 8 * KiB)), // overlaps the end
    track(node.discard(20 * KiB, 4 * KiB)), // inside
  ];
  const disjoint = track(node.write(32 * KiB, data(4 * KiB))); // starts where the lock ends
  const read = track(node.read(16 * KiB, Buffer.alloc(16 * KiB)));
  const flush = track(node.flush());
  await Promise.all([disjoint.promise, read.promise, flush.promise]);
  await settle();
  assert.deepEqual(before, [32 * KiB], "only the disjoint write's hook ran");
  assert.ok(
    kinds.every((k) => !k.done),
    "write, write-zeroes and discard into the range wait",
  );
  assert.deepEqual(driver.entered, [{ offset: 32 * KiB, length: 4 * KiB }]);
  unlock();
  await Promise.all(kinds.map((k) => k.promise));
  assert.deepEqual(before.slice(1).sort(), [12 * KiB, 20 * KiB, 28 * KiB].sort());
});

test("a write waiting for one lock holds up a later lock it overlaps, without deadlock", T, async () => {
  const { node } = fresh();
  const unlockA = await node.lockRange(0, 4 * KiB);
  const write = track(node.write(0, data(8 * KiB, 0x11)));
  // B does not overlap A, but overlaps the write, which began before B and waits for A.
  const lockB = track(node.lockRange(4 * KiB, 4 * KiB));
  const later = track(node.write(4 * KiB, data(4 * KiB, 0x22)));
  await settle();
  assert.equal(write.done, false);
  assert.equal(lockB.done, false, "B waits for the earlier write");
  unlockA();
  await write.promise;
  const unlockB = await lockB.promise;
  assert.equal(later.done, false, "a write begun after B waits for B");
  const seen = Buffer.alloc(4 * KiB);
  await node.read(4 * KiB, seen);
  assert.ok(seen.equals(Buffer.alloc(4 * KiB, 0x11)), "under B the earlier write's data is there");
  unlockB();
  await later.promise;
});

test("overlapping locks are exclusive, in the order they were asked for", T, async () => {
  const { node } = fresh();
  const order: string[] = [];
  const unlockA = await node.lockRange(0, 8 * KiB);
  const b = node.lockRange(4 * KiB, 8 * KiB).then((u) => (order.push("b"), u));
  const c = node.lockRange(64 * KiB, 4 * KiB).then((u) => (order.push("c"), u));
  (await c)();
  await settle();
  assert.deepEqual(order, ["c"], "a disjoint lock is granted at once; an overlapping one waits");
  unlockA();
  (await b)();
  assert.deepEqual(order, ["c", "b"]);
});

test("lockRange refuses ranges outside the disk and empty ranges", async () => {
  const { node } = fresh();
  await assert.rejects(node.lockRange(DISK - KiB, 2 * KiB), (e: unknown) => e instanceof BlockError);
  await assert.rejects(node.lockRange(0, 0), (e: unknown) => e instanceof BlockError);
  assert.equal(node.rangeLockCount, 0);
});

test(
  "property: a lock is granted only after overlapping earlier writes end, holds later overlapping ones, and no other",
  T,
  async () => {
    const SECTOR = 4 * KiB;
    const SECTORS = DISK / SECTOR;
    const range = fc
      .tuple(fc.integer({ min: 0, max: SECTORS - 1 }), fc.integer({ min: 1, max: 8 }))
      .map(([s, n]) => ({ offset: s * SECTOR, length: Math.min(n, SECTORS - s) * SECTOR }));
    await fc.assert(
      fc.asyncProperty(
        range,
        fc.array(range, { maxLength: 8 }),
        fc.array(range, { maxLength: 8 }),
        fc.array(fc.nat(), { minLength: 8, maxLength: 8 }),
        async (lockRange, earlier, later, releaseOrder) => {
          const { node, driver } = fresh();
          driver.gate = () => true; // hold every write begun before the lock
          const early = earlier.map((r) => ({ ...r, p: track(node.write(r.offset, data(r.length))) }));
          await settle();
          assert.equal(driver.held.length, early.length);
          const lock = track(node.lockRange(lockRange.offset, lockRange.length));
          driver.gate = () => false;
          const late = later.map((r) => ({ ...r, p: track(node.write(r.offset, data(r.length))) }));
          await settle();
          const overlaps = (r: { offset: number; length: number }): boolean =>
            rangesOverlap(r.offset, r.length, lockRange.offset, lockRange.length);
          for (const w of late) {
            assert.equal(w.p.done, !overlaps(w), `later write ${w.offset}+${w.length}`);
          }
          // Release the held writes in a random order; the lock must come exactly after the overlapping ones.
          assert.equal(lock.done, !early.some(overlaps), "granted at once exactly when nothing overlaps");
          const pending = [...driver.held];
          let i = 0;
          while (pending.length > 0) {
            const [h] = pending.splice(releaseOrder[i++ % releaseOrder.length] % pending.length, 1);
            h.release();
            await settle();
            const overlappingLeft = early.filter((w) => overlaps(w) && !w.p.done).length;
            if (overlappingLeft > 0)
              assert.equal(lock.done, false, "granted while an overlapping write runs");
            else assert.equal(lock.done, true, "not granted although no overlapping write runs");
          }
          const unlock = await lock.promise;
          for (const w of late)
            if (overlaps(w)) assert.equal(w.p.done, false, "a later write passed the lock");
          unlock();
          await Promise.all([...early, ...late].map((w) => w.p.promise));
          assert.equal(node.rangeLockCount, 0);
          assert.equal(node.inFlightCount, 0);
        },
      ),
      { numRuns: 100 },
    );
  },
);
