/**
 * Stream ordering, deterministically: overlapping writes must land on the target in the order they
 * land on the source. The target here holds every write until the test releases it, and releases the
 * newest first; if a second overlapping write could reach the target while the first is still held,
 * the target would end up with the older data. (The interop tests see this only by chance.)
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import type { WriteFlags } from "../../src/block/driver.js";
import { MemoryDriver } from "../../src/block/drivers/memory.js";
import { FilterDriver } from "../../src/block/filters/filter.js";
import { EventBus } from "../../src/core/events.js";
import { silentLogger } from "../../src/core/log.js";
import { BlockNode } from "../../src/io/block-node.js";
import { StreamJob } from "../../src/jobs/stream.js";

const KiB = 1024;
const DISK = 1024 * KiB;

/** Holds each write until release(); tells when one arrives. */
class HeldWrites extends FilterDriver {
  readonly held: Array<() => void> = [];
  #arrived: (() => void) | null = null;

  override async pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    await new Promise<void>((resolve) => {
      this.held.push(resolve);
      this.#arrived?.();
    });
    return super.pwrite(offset, data, flags);
  }

  /** Resolves once at least one write is held. */
  arrival(): Promise<void> {
    if (this.held.length > 0) return Promise.resolve();
    return new Promise((resolve) => (this.#arrived = resolve));
  }

  releaseNewest(): void {
    this.held.pop()?.();
  }
}

const settle = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

test("stream: overlapping writes reach the target in source order even when the target reorders", async () => {
  const source = new BlockNode("src", new MemoryDriver(DISK));
  const gate = new HeldWrites("held", new MemoryDriver(DISK));
  const target = new BlockNode("tgt", gate);
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

  // Three overlapping writes, issued back to back; each covers a different span of [0, 192K).
  const writes = [
    source.write(0, [Buffer.alloc(128 * KiB, 0xaa)]),
    source.write(64 * KiB, [Buffer.alloc(128 * KiB, 0xbb)]),
    source.write(32 * KiB, [Buffer.alloc(64 * KiB, 0xcc)]),
  ];
  let finished = false;
  const all = Promise.all(writes).then(() => (finished = true));
  let maxHeld = 0;
  while (!finished) {
    await Promise.race([gate.arrival(), all]);
    if (finished) break;
    await settle(); // let any other write that may proceed reach the target too
    maxHeld = Math.max(maxHeld, gate.held.length);
    gate.releaseNewest();
  }
  await all;
  assert.equal(maxHeld, 1, "an overlapping write never reaches the target while an earlier one is held");

  job.cancel();
  const cancelled = job.concluded;
  // The cancel flushes the target; nothing is held now, so it completes.
  await cancelled;
  const a = Buffer.alloc(192 * KiB);
  const b = Buffer.alloc(192 * KiB);
  await source.read(0, a);
  await target.read(0, b);
  assert.ok(a.equals(b), "target == source");
  assert.equal(a[40 * KiB], 0xcc, "the last write won on the source");
  assert.equal(job.progressCurrent, 320 * KiB, "progress counts the bytes duplicated");
});

test("stream: writes that do not overlap reach the target in parallel", async () => {
  const source = new BlockNode("src", new MemoryDriver(DISK));
  const gate = new HeldWrites("held", new MemoryDriver(DISK));
  const target = new BlockNode("tgt", gate);
  const job = new StreamJob({
    id: "p",
    type: "backup",
    source,
    target,
    sync: "stream",
    events: new EventBus(),
    log: silentLogger,
  });
  job.start();
  const writes = [0, 1, 2, 3].map((i) => source.write(i * 64 * KiB, [Buffer.alloc(64 * KiB, 0x10 + i)]));
  await gate.arrival();
  await settle();
  assert.equal(gate.held.length, 4, "all four duplicates are in flight at once");
  while (gate.held.length > 0) gate.releaseNewest();
  await Promise.all(writes);
  job.cancel();
  await job.concluded;
  const b = Buffer.alloc(64 * KiB);
  for (let i = 0; i < 4; i++) {
    await target.read(i * 64 * KiB, b);
    assert.ok(b.equals(Buffer.alloc(64 * KiB, 0x10 + i)));
  }
});
