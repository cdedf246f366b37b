/**
 * The qcow2 driver (in a BlockNode, over a file child) against a byte-array model: random batches of
 * concurrent writes, write-zeroes, discards and flushes. Mutations within a batch never overlap (their
 * order would be undefined) but they do share clusters and L2 tables, so allocation, copy-on-write
 * and the per-cluster locks are exercised. Tiny L2 caches force evictions and write-backs; 512-byte
 * clusters make the refcount table grow. After the batches the disk is compared with the model,
 * closed, reopened and compared again, checked by `qemu-img check` and compared by `qemu-img compare`
 * with a raw file holding the model. A second property adds a backing image.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import fc from "fast-check";
import type { BlockDriver } from "../../src/block/driver.js";
import { FileDriver } from "../../src/block/drivers/file.js";
import {
  engineForMode,
  IO_ENGINE_NAMES,
  processIoEngine,
  type IoEngine,
} from "../../src/block/drivers/io-engine/index.js";
import { MemoryDriver } from "../../src/block/drivers/memory.js";
import { createQcow2 } from "../../src/block/drivers/qcow2/create.js";
import { Qcow2Driver } from "../../src/block/drivers/qcow2/qcow2.js";
import { KiB, MiB } from "../../src/core/units.js";
import { BlockNode } from "../../src/io/block-node.js";
import { seededBytes } from "../helpers/jobs.js";
import { run, tempDir } from "../helpers/run.js";

const DISK_BYTES = 4 * MiB;
const NUM_RUNS = 20;
/** A run that takes longer than this has hung (a lock cycle): fast-check reports it and shrinks. */
const RUN_TIMEOUT_MS = 20_000;

type Op =
  | { kind: "write"; offset: number; length: number; seed: number }
  | { kind: "zero"; offset: number; length: number; mayTrim: boolean }
  | { kind: "discard"; offset: number; length: number }
  | { kind: "flush" };

/** Offsets near cluster boundaries are the interesting ones: bias towards them. */
const offsetArb = fc.oneof(
  fc.integer({ min: 0, max: DISK_BYTES - 1 }),
  fc.integer({ min: 0, max: DISK_BYTES / 512 - 1 }).map((s) => s * 512),
  fc.integer({ min: 0, max: DISK_BYTES / (64 * KiB) - 1 }).map((c) => c * 64 * KiB),
);
const lengthArb = fc.oneof(fc.integer({ min: 1, max: 4 * KiB }), fc.integer({ min: 1, max: 300 * KiB }));

const opArb: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 6,
    arbitrary: fc.record({
      kind: fc.constant("write" as const),
      offset: offsetArb,
      length: lengthArb,
      seed: fc.integer(),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({
      kind: fc.constant("zero" as const),
      offset: offsetArb,
      length: lengthArb,
      mayTrim: fc.boolean(),
    }),
  },
  {
    weight: 2,
    arbitrary: fc.record({ kind: fc.constant("discard" as const), offset: offsetArb, length: lengthArb }),
  },
  { weight: 1, arbitrary: fc.constant({ kind: "flush" as const }) },
);

function clip(op: Op): Op {
  if (op.kind === "flush") return op;
  return { ...op, length: Math.min(op.length, DISK_BYTES - op.offset) };
}

/** Drops the ops of a batch that overlap an earlier one of the same batch. */
function nonOverlapping(batch: Op[]): Op[] {
  const taken: Array<[number, number]> = [];
  const out: Op[] = [];
  for (const op of batch.map(clip)) {
    if (op.kind !== "flush") {
      if (taken.some(([a, b]) => op.offset < b && a < op.offset + op.length)) continue;
      taken.push([op.offset, op.offset + op.length]);
    }
    out.push(op);
  }
  return out;
}

function apply(node: BlockNode, model: Buffer, op: Op): Promise<void> {
  switch (op.kind) {
    case "write": {
      const data = seededBytes(op.seed, op.length);
      data.copy(model, op.offset);
      // Two iovecs, split unevenly, as the NBD server hands them over.
      const cut = Math.floor(op.length / 3);
      return node.write(op.offset, [data.subarray(0, cut), data.subarray(cut)]);
    }
    case "zero":
      model.fill(0, op.offset, op.offset + op.length);
      return node.writeZeroes(op.offset, op.length, { mayTrim: op.mayTrim });
    case "discard":
      model.fill(0, op.offset, op.offset + op.length);
      return node.discard(op.offset, op.length);
    case "flush":
      return node.flush();
  }
}

async function assertEqualsModel(node: BlockNode, model: Buffer, what: string): Promise<void> {
  const got = Buffer.alloc(DISK_BYTES);
  await node.read(0, got);
  if (!got.equals(model)) {
    let i = 0;
    while (got[i] === model[i]) i++;
    assert.fail(`${what}: first difference at byte ${i}: disk ${got[i]}, model ${model[i]}`);
  }
  // Block status never claims zeros where the model has data.
  for (const e of await node.blockStatus(0, DISK_BYTES)) {
    if (!e.zero) continue;
    const slice = model.subarray(e.offset, e.offset + e.length);
    assert.ok(
      slice.every((b) => b === 0),
      `${what}: extent at ${e.offset}+${e.length} reported zero`,
    );
  }
}

const scenarioArb = fc.record({
  clusterSize: fc.constantFrom(512, 4 * KiB, 64 * KiB),
  l2CacheBytes: fc.constantFrom(1, 64 * KiB),
  batches: fc.array(fc.array(opArb, { minLength: 1, maxLength: 12 }), { minLength: 1, maxLength: 8 }),
});

async function open(
  path: string,
  l2CacheBytes: number,
  backing: BlockDriver | null = null,
  engine: IoEngine = processIoEngine(),
): Promise<BlockNode> {
  const file = FileDriver.open(path, { engine });
  const driver = await Qcow2Driver.open(file, { backing, ownsBacking: false, l2CacheBytes });
  return new BlockNode("q", driver, { readOnly: false });
}

// On every I/O engine: the driver's metadata writes and flush ordering must not depend on how the
// file's I/O completes.
for (const engineName of IO_ENGINE_NAMES)
  test(`qcow2 driver on ${engineName} vs a byte-array model: random concurrent writes, zeroes, discards and flushes; reopened, qemu-img check and compare agree`, async (t) => {
    const engine = engineForMode(engineName);
    const dir = tempDir(t, "drivetap-qcow2-prop-");
    let n = 0;
    await fc.assert(
      fc.asyncProperty(scenarioArb, async ({ clusterSize, l2CacheBytes, batches }) => {
        const image = join(dir, `p${n++}.qcow2`);
        writeFileSync(image, "");
        const f = FileDriver.open(image, { engine });
        await createQcow2(f, DISK_BYTES, { clusterSize });
        await f.close();
        const model = Buffer.alloc(DISK_BYTES);
        let node = await open(image, l2CacheBytes, null, engine);
        try {
          for (const batch of batches)
            await Promise.all(nonOverlapping(batch).map((op) => apply(node, model, op)));
          await assertEqualsModel(node, model, "after the batches");
        } finally {
          await node.close();
        }
        node = await open(image, l2CacheBytes, null, engine);
        try {
          await assertEqualsModel(node, model, "after reopening");
        } finally {
          await node.close();
        }
        const check = await run("qemu-img", ["check", image]);
        assert.equal(check.code, 0, `qemu-img check: ${check.stdout}${check.stderr}`);
        const raw = join(dir, `p${n}.raw`);
        writeFileSync(raw, model);
        const cmp = await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", image, raw]);
        assert.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
      }),
      { numRuns: NUM_RUNS, timeout: RUN_TIMEOUT_MS },
    );
  });

test("qcow2 over a backing image vs a model: unwritten ranges read the backing, partial writes copy the rest, zeroes and discards hide it", async () => {
  await fc.assert(
    fc.asyncProperty(scenarioArb, fc.integer(), async ({ clusterSize, l2CacheBytes, batches }, seed) => {
      // A memory child for the image too: the driver works over any child.
      const backing = new MemoryDriver(DISK_BYTES);
      const below = seededBytes(seed, DISK_BYTES);
      await backing.pwrite(0, [below]);
      const file = new MemoryDriver(64 * MiB);
      await createQcow2(file, DISK_BYTES, { clusterSize });
      const model = Buffer.from(below);
      const driver = await Qcow2Driver.open(file, {
        backing,
        ownsBacking: false,
        ownsFile: false,
        l2CacheBytes,
      });
      const node = new BlockNode("q", driver, { readOnly: false });
      for (const batch of batches)
        await Promise.all(nonOverlapping(batch).map((op) => apply(node, model, op)));
      await assertEqualsModel(node, model, "over the backing");
      await node.close();
      const again = new BlockNode(
        "q",
        await Qcow2Driver.open(file, { backing, ownsBacking: false, l2CacheBytes }),
        {
          readOnly: true,
        },
      );
      await assertEqualsModel(again, model, "reopened over the backing");
      await again.close();
    }),
    { numRuns: NUM_RUNS, timeout: RUN_TIMEOUT_MS },
  );
});

test("qcow2 with 512-byte clusters: 20 MiB of writes grow the refcount table (new blocks, table moved, old one freed); qemu-img check is clean", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-grow-");
  const image = join(dir, "grow.qcow2");
  writeFileSync(image, "");
  const f = FileDriver.open(image);
  await createQcow2(f, 64 * MiB, { clusterSize: 512 });
  await f.close();
  const node = await open(image, 64 * KiB);
  const data = seededBytes(7, 20 * MiB);
  // Concurrent 1 MiB writes, then a discard in the middle whose clusters later writes reuse.
  await Promise.all(
    Array.from({ length: 20 }, (_, i) => node.write(i * MiB, [data.subarray(i * MiB, (i + 1) * MiB)])),
  );
  await node.discard(2 * MiB, MiB);
  await node.flush();
  data.fill(0, 2 * MiB, 3 * MiB);
  await node.write(30 * MiB, [data.subarray(0, MiB)]);
  await node.close();
  const header = Buffer.alloc(64);
  const probe = FileDriver.open(image, { readOnly: true });
  await probe.pread(0, header);
  await probe.close();
  assert.ok(header.readUInt32BE(56) > 1, `the refcount table grew to ${header.readUInt32BE(56)} clusters`);
  const check = await run("qemu-img", ["check", image]);
  assert.equal(check.code, 0, `qemu-img check: ${check.stdout}${check.stderr}`);
  const raw = join(dir, "expected.raw");
  const expected = Buffer.alloc(64 * MiB);
  data.copy(expected, 0);
  data.copy(expected, 30 * MiB, 0, MiB);
  writeFileSync(raw, expected);
  const cmp = await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", image, raw]);
  assert.equal(cmp.code, 0, `qemu-img compare: ${cmp.stdout}${cmp.stderr}`);
});

test("qcow2: 128 concurrent partial writes into one new cluster are serialised: each lands, one cluster is allocated", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-same-");
  const image = join(dir, "same.qcow2");
  writeFileSync(image, "");
  const f = FileDriver.open(image);
  await createQcow2(f, DISK_BYTES, { clusterSize: 64 * KiB });
  await f.close();
  const node = await open(image, 64 * KiB);
  const parts = Array.from({ length: 128 }, (_, i) => Buffer.alloc(512, i + 1));
  await Promise.all(parts.map((p, i) => node.write(MiB + i * 512, [p])));
  const got = Buffer.alloc(64 * KiB);
  await node.read(MiB, got);
  assert.ok(got.equals(Buffer.concat(parts)), "every 512-byte write is in the cluster");
  await node.close();
  const check = await run("qemu-img", ["check", "--output=json", image]);
  assert.equal(check.code, 0, check.stdout + check.stderr);
  const report = JSON.parse(check.stdout) as { "allocated-clusters": number; leaks?: number };
  assert.equal(report["allocated-clusters"], 1, "one data cluster, not one per racing write");
  assert.equal(report.leaks ?? 0, 0);
});
