/**
 * verifyNodes on in-process nodes, deterministically: extents precise to 4 KiB and merged across
 * chunks, pending ranges split from mismatches, repair; and the two live races, stopped half-way with a
 * target that holds writes: a guest write whose copy to the target is still in flight is not a
 * mismatch, and a repair never overwrites a newer guest write on the target.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { MemoryDriver } from "../../src/block/drivers/memory.js";
import { EventBus } from "../../src/core/events.js";
import { silentLogger } from "../../src/core/log.js";
import { BlockNode } from "../../src/io/block-node.js";
import { DirtyBitmap } from "../../src/io/dirty-bitmap.js";
import { StreamJob } from "../../src/jobs/stream.js";
import { isVerifiableJob, verifyNodes } from "../../src/jobs/verify.js";
import { GatedWrites } from "../helpers/gated-writes.js";
import { seededBytes } from "../helpers/jobs.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const DISK = 4 * MiB;
const T = { timeout: 30_000 };

async function settle(): Promise<void> {
  for (let i = 0; i < 5; i++) await new Promise((resolve) => setImmediate(resolve));
}

/** A source and a gated target holding the same random data. */
async function pair(): Promise<{ source: BlockNode; target: BlockNode; gate: GatedWrites }> {
  const content = seededBytes(7, DISK);
  const source = new BlockNode("src", new MemoryDriver(DISK));
  const gate = new GatedWrites(DISK);
  const target = new BlockNode("tgt", gate);
  await source.write(0, [content]);
  await gate.memory.pwrite(0, [content]);
  return { source, target, gate };
}

/** Flips one byte of the target behind the node's back. */
async function corrupt(gate: GatedWrites, offset: number, length = 1): Promise<void> {
  const b = Buffer.alloc(length);
  await gate.memory.pread(offset, b);
  for (let i = 0; i < length; i++) b[i] ^= 0xff;
  await gate.memory.pwrite(offset, [b]);
}

function streamJob(source: BlockNode, target: BlockNode): StreamJob {
  const job = new StreamJob({
    id: "s",
    type: "backup",
    source,
    target,
    sync: "stream",
    events: new EventBus(),
    log: silentLogger,
  });
  job.start();
  return job;
}

test("equal nodes: nothing reported, nothing re-checked", T, async () => {
  const { source, target } = await pair();
  const r = await verifyNodes(source, target);
  assert.equal(r.checkedBytes, DISK);
  assert.deepEqual(r.mismatches, []);
  assert.equal(r.rechecked, 0);
});

test("extents are precise to 4 KiB, merge across chunks, and repair makes the nodes equal", T, async () => {
  const { source, target, gate } = await pair();
  await corrupt(gate, 5000); // in [4K, 8K)
  await corrupt(gate, 1 * MiB - 1, 2); // the last byte of chunk 0 and the first of chunk 1
  await corrupt(gate, 3 * MiB + 64 * KiB, 12 * KiB); // three whole sub-chunks
  const expected = [
    { offset: 4 * KiB, length: 4 * KiB },
    { offset: 1 * MiB - 4 * KiB, length: 8 * KiB },
    { offset: 3 * MiB + 64 * KiB, length: 12 * KiB },
  ];
  const r = await verifyNodes(source, target);
  assert.deepEqual(r.mismatches, expected);
  assert.equal(r.mismatchBytes, 24 * KiB);
  assert.equal(r.rechecked, 3, "chunks 0, 1 and 3 differed");
  // A sub-range: only what lies inside it, clipped to it.
  const part = await verifyNodes(source, target, { offset: 1 * MiB - 100, length: 2 * MiB + 68 * KiB });
  assert.deepEqual(part.mismatches, [
    { offset: 1 * MiB - 100, length: 4 * KiB + 100 },
    { offset: 3 * MiB + 64 * KiB, length: 4 * KiB - 100 },
  ]);

  const fixed = await verifyNodes(source, target, { repair: true, granularityBytes: 64 * KiB });
  assert.deepEqual(
    fixed.mismatches,
    expected.map((e) => ({ ...e, repaired: true })),
  );
  assert.equal(fixed.repairedBytes, 24 * KiB);
  const again = await verifyNodes(source, target);
  assert.deepEqual(again.mismatches, []);
  assert.equal(again.rechecked, 0);
});

test(
  "with a job's dirty bitmap, differences it covers are pending, not mismatches, and not repaired",
  T,
  async () => {
    const { source, target, gate } = await pair();
    const dirty = new DirtyBitmap(DISK, 64 * KiB);
    dirty.setRange(128 * KiB, 64 * KiB);
    await corrupt(gate, 120 * KiB, 16 * KiB); // 8 KiB before the dirty cluster, 8 KiB inside it
    const r = await verifyNodes(source, target, { pending: dirty, repair: true });
    assert.deepEqual(r.mismatches, [{ offset: 120 * KiB, length: 8 * KiB, repaired: true }]);
    assert.deepEqual(r.pending, [{ offset: 128 * KiB, length: 8 * KiB }]);
    assert.equal(r.repairedBytes, 8 * KiB);
    const left = await verifyNodes(source, target);
    assert.deepEqual(
      left.mismatches,
      [{ offset: 128 * KiB, length: 8 * KiB }],
      "pending was left to the job",
    );
    assert.ok(isVerifiableJob({ source, target, dirty }));
    assert.ok(!isVerifiableJob({ source, target }));
  },
);

test("a job's unfinished copies count as pending, seen before or after the locked re-read", T, async () => {
  const { source, target, gate } = await pair();
  const dirty = new DirtyBitmap(DISK, 64 * KiB);
  await corrupt(gate, 256 * KiB, 4 * KiB);
  await corrupt(gate, 512 * KiB, 4 * KiB);
  await corrupt(gate, 2 * MiB, 4 * KiB);
  // Like a mirror copy: its dirty bit already clear, the target write not yet done. The first copy is
  // seen only before the re-read (it "finishes" meanwhile); the second only after (it "starts").
  let calls = 0;
  const copiesInFlight = (): Array<{ offset: number; length: number }> => {
    calls++;
    return calls % 2 === 1
      ? [{ offset: 256 * KiB, length: 64 * KiB }]
      : [{ offset: 512 * KiB, length: 4 * KiB }];
  };
  const r = await verifyNodes(source, target, { pending: dirty, copiesInFlight });
  assert.deepEqual(r.pending, [
    { offset: 256 * KiB, length: 4 * KiB },
    { offset: 512 * KiB, length: 4 * KiB },
  ]);
  assert.deepEqual(r.mismatches, [{ offset: 2 * MiB, length: 4 * KiB }]);
  assert.ok(isVerifiableJob({ source, target, dirty, copiesInFlight }));
  assert.ok(!isVerifiableJob({ source, target, dirty, copiesInFlight: 1 }));
});

test("bad arguments are refused with a sentence", async () => {
  const { source, target } = await pair();
  const small = new BlockNode("small", new MemoryDriver(DISK / 2));
  await assert.rejects(verifyNodes(source, small), /has 4194304 bytes but target 'small' has 2097152/);
  await assert.rejects(verifyNodes(source, source), /same node/);
  await assert.rejects(verifyNodes(source, target, { offset: DISK + 1 }), /beyond the end/);
  await assert.rejects(verifyNodes(source, target, { offset: 1, length: DISK }), /beyond the end/);
  await assert.rejects(verifyNodes(source, target, { granularityBytes: 3 * KiB }), /power of two/);
});

test("a guest write whose copy to the target is still in flight is not a mismatch", T, async () => {
  const { source, target, gate } = await pair();
  const job = streamJob(source, target);
  assert.equal(source.hookCount, 1);
  gate.gate = () => true;
  const write = source.write(2 * MiB + 8 * KiB, [Buffer.alloc(8 * KiB, 0x5a)]);
  await gate.heldCount(1);
  gate.gate = () => false;
  // The source has the new data, the target not yet: the lock-free pass sees a difference.
  let done = false;
  const verify = verifyNodes(source, target).finally(() => (done = true));
  await settle();
  assert.equal(done, false, "the re-check waits for the write in flight");
  gate.held[0].release();
  await write;
  const r = await verify;
  assert.deepEqual(r.mismatches, [], "no false positive");
  assert.equal(r.rechecked, 1, "the difference was seen and re-checked");
  job.cancel(true);
  await job.concluded;
});

test("a repair never overwrites a newer guest write on the target", T, async () => {
  const { source, target, gate } = await pair();
  const job = streamJob(source, target);
  const at = 1 * MiB + 16 * KiB;
  await corrupt(gate, at, 4 * KiB);
  // Hold the repair's write to the target, then let a guest write the same range.
  gate.gate = () => true;
  const verify = verifyNodes(source, target, { repair: true });
  await gate.heldCount(1);
  gate.gate = () => false;
  assert.deepEqual(gate.entered.at(-1), { offset: at, length: 4 * KiB }, "the repair write is held");
  const entered = gate.entered.length;
  let written = false;
  const guest = source.write(at, [Buffer.alloc(4 * KiB, 0x77)]).then(() => (written = true));
  await settle();
  assert.equal(written, false, "the guest write waits for the lock");
  assert.equal(gate.entered.length, entered, "its copy has not reached the target");
  gate.held[0].release();
  const r = await verify;
  await guest;
  assert.deepEqual(r.mismatches, [{ offset: at, length: 4 * KiB, repaired: true }]);
  const s = Buffer.alloc(4 * KiB);
  const t = Buffer.alloc(4 * KiB);
  await source.read(at, s);
  await target.read(at, t);
  assert.ok(s.equals(Buffer.alloc(4 * KiB, 0x77)));
  assert.ok(t.equals(s), "the target has the guest's newer data");
  assert.deepEqual((await verifyNodes(source, target)).mismatches, []);
  job.cancel(true);
  await job.concluded;
});
