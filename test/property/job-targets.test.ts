/**
 * Stream and mirror targets read what the source reads, after random concurrent overlapping writes,
 * write-zeroes and discards, whatever each side's discard does. A discard is advisory: the source's
 * may zero, keep the data, not exist, or stop zeroing once the driver learns it cannot (the file
 * driver on a filesystem without hole punching); the target's may be ignored (qemu-nbd without
 * --discard=unmap) and its write-zeroes may answer ENOTSUP. Mirror targets start full of other data
 * and the source has holes, so the bulk copy must zero what the source reads as zeros.
 */
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import type { BlockDriver, DriverCapabilities, ZeroFlags } from "../../src/block/driver.js";
import { MemoryDriver } from "../../src/block/drivers/memory.js";
import { FilterDriver } from "../../src/block/filters/filter.js";
import { BlockError } from "../../src/core/errors.js";
import { EventBus } from "../../src/core/events.js";
import { silentLogger } from "../../src/core/log.js";
import { BlockNode } from "../../src/io/block-node.js";
import type { Job } from "../../src/jobs/job.js";
import { MirrorJob } from "../../src/jobs/mirror.js";
import { StreamJob } from "../../src/jobs/stream.js";

const KiB = 1024;
const DISK = 512 * KiB;
const NUM_RUNS = 100;

/**
 * What a driver's discard does: "zeroes" (the memory driver), "keeps" (advertised, but the data stays:
 * qemu-nbd's default), "none" (not supported: the node never calls it), "learns" (promises zeros
 * until the first discard, which keeps the data and withdraws the promise).
 */
type DiscardKind = "zeroes" | "keeps" | "none" | "learns";

class Variant extends FilterDriver {
  readonly #discard: DiscardKind;
  readonly #zeroesNotSupported: boolean;
  #learned = false;

  constructor(next: BlockDriver, discard: DiscardKind, zeroesNotSupported = false) {
    super(`variant-${discard}`, next);
    this.#discard = discard;
    this.#zeroesNotSupported = zeroesNotSupported;
  }
  override get capabilities(): DriverCapabilities {
    const d = this.#discard;
    return {
      ...this.next.capabilities,
      discard: d !== "none",
      discardZeroes: d === "zeroes" || (d === "learns" && !this.#learned),
    };
  }
  override pwriteZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (this.#zeroesNotSupported) return Promise.reject(new BlockError("ENOTSUP", "no write-zeroes here"));
    return super.pwriteZeroes(offset, length, flags);
  }
  override pdiscard(offset: number, length: number): Promise<void> {
    if (this.#discard === "zeroes") return super.pdiscard(offset, length);
    this.#learned = true;
    return Promise.resolve();
  }
}

type Op =
  | { kind: "write"; offset: number; length: number; byte: number }
  | { kind: "zero"; offset: number; length: number; mayTrim: boolean }
  | { kind: "discard"; offset: number; length: number };

const rangeArb = fc
  .tuple(fc.nat({ max: DISK - 1 }), fc.integer({ min: 1, max: 160 * KiB }))
  .map(([offset, length]) => ({ offset, length: Math.min(length, DISK - offset) }));
const opArb: fc.Arbitrary<Op> = fc.oneof(
  fc
    .tuple(rangeArb, fc.integer({ min: 1, max: 255 }))
    .map(([r, byte]): Op => ({ kind: "write", ...r, byte })),
  fc.tuple(rangeArb, fc.boolean()).map(([r, mayTrim]): Op => ({ kind: "zero", ...r, mayTrim })),
  rangeArb.map((r): Op => ({ kind: "discard", ...r })),
);
/** Each batch runs concurrently: overlapping requests in one batch race, as a guest's would. */
const batchesArb = fc.array(fc.array(opArb, { minLength: 1, maxLength: 4 }), { minLength: 1, maxLength: 6 });

function apply(node: BlockNode, op: Op): Promise<void> {
  switch (op.kind) {
    case "write":
      return node.write(op.offset, [Buffer.alloc(op.length, op.byte)]);
    case "zero":
      return node.writeZeroes(op.offset, op.length, { mayTrim: op.mayTrim });
    case "discard":
      return node.discard(op.offset, op.length);
  }
}

async function runBatches(node: BlockNode, batches: readonly Op[][]): Promise<void> {
  for (const batch of batches) await Promise.all(batch.map((op) => apply(node, op)));
}

/** Data in every other 64 KiB chunk, holes between them (memory chunks are 64 KiB). */
async function fillWithHoles(node: BlockNode, byte: number): Promise<void> {
  for (let c = 0; c < DISK / (64 * KiB); c += 2)
    await node.write(c * 64 * KiB, [Buffer.alloc(64 * KiB, byte + c)]);
}

const settle = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

async function until(what: string, probe: () => boolean): Promise<void> {
  for (let i = 0; i < 100_000; i++) {
    if (probe()) return;
    await settle();
  }
  assert.fail(`never: ${what}`);
}

async function assertSame(source: BlockNode, target: BlockNode): Promise<void> {
  const a = Buffer.alloc(DISK);
  const b = Buffer.alloc(DISK);
  await source.read(0, a);
  await target.read(0, b);
  if (a.equals(b)) return;
  let i = 0;
  while (a[i] === b[i]) i++;
  assert.fail(`target differs from source at byte ${i}: source ${a[i]}, target ${b[i]}`);
}

async function endedCleanly(job: Job): Promise<void> {
  await job.concluded;
  assert.equal(job.error, undefined, `the job ended without error: ${job.error}`);
}

const sourceKindArb = fc.constantFrom<DiscardKind>("zeroes", "keeps", "none", "learns");
const targetArb = fc.record({
  discard: fc.constantFrom<DiscardKind>("zeroes", "keeps", "none", "learns"),
  zeroesNotSupported: fc.boolean(),
});

const common = { events: new EventBus(), log: silentLogger };

describe("job targets read what the source reads", () => {
  test("stream (backup sync=stream)", async () => {
    await fc.assert(
      fc.asyncProperty(sourceKindArb, targetArb, batchesArb, async (sk, tk, batches) => {
        const source = new BlockNode("src", new Variant(new MemoryDriver(DISK), sk));
        const target = new BlockNode(
          "tgt",
          new Variant(new MemoryDriver(DISK), tk.discard, tk.zeroesNotSupported),
        );
        // A stream target starts as a copy of the source.
        await fillWithHoles(source, 0x10);
        await fillWithHoles(target, 0x10);
        const job = new StreamJob({ id: "s", type: "backup", source, target, sync: "stream", ...common });
        job.start();
        await runBatches(source, batches);
        job.cancel();
        await endedCleanly(job);
        await assertSame(source, target);
      }),
      { numRuns: NUM_RUNS },
    );
  });

  for (const copyMode of ["write-blocking", "background"] as const) {
    test(`mirror ${copyMode}, sync=full onto a target full of other data`, async () => {
      await fc.assert(
        fc.asyncProperty(
          sourceKindArb,
          targetArb,
          batchesArb,
          batchesArb,
          async (sk, tk, during, afterReady) => {
            const source = new BlockNode("src", new Variant(new MemoryDriver(DISK), sk));
            const target = new BlockNode(
              "tgt",
              new Variant(new MemoryDriver(DISK), tk.discard, tk.zeroesNotSupported),
            );
            await fillWithHoles(source, 0x10);
            await target.write(0, [Buffer.alloc(DISK, 0xee)]);
            const job = new MirrorJob({ id: "m", source, target, sync: "full", copyMode, ...common });
            job.start();
            await runBatches(source, during); // while the bulk copy runs
            await until("READY", () => job.ready);
            await runBatches(source, afterReady); // forwarded (background: if nothing overlaps)
            job.cancel(); // after READY: ends COMPLETED with the target in sync
            await endedCleanly(job);
            await assertSame(source, target);
          },
        ),
        { numRuns: NUM_RUNS },
      );
    });
  }
});
