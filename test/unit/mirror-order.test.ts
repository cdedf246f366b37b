/**
 * Mirror ordering, deterministically. In write-blocking mode the hook serialises overlapping writes.
 * In background mode after READY, writes are forwarded when they complete, and two overlapping writes
 * in flight together may complete in the other order than they were applied to the source (threadpool
 * writes do). The source here applies each write at once but holds its completion until the test
 * releases it, newest first: forwarding in completion order would leave the target with the older
 * data. The job must notice the overlap, not forward, and copy the range from the source instead.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import type { WriteFlags } from "../../src/block/driver.js";
import { MemoryDriver } from "../../src/block/drivers/memory.js";
import { FilterDriver } from "../../src/block/filters/filter.js";
import { EventBus } from "../../src/core/events.js";
import { silentLogger } from "../../src/core/log.js";
import { BlockNode } from "../../src/io/block-node.js";
import { MirrorJob, type CopyMode } from "../../src/jobs/mirror.js";

const KiB = 1024;
const DISK = 1024 * KiB;

/** Applies each write at once, then holds its completion until released. */
class HeldCompletions extends FilterDriver {
  readonly held: Array<() => void> = [];

  override async pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    await super.pwrite(offset, data, flags);
    await new Promise<void>((resolve) => this.held.push(resolve));
  }
}

const settle = (): Promise<void> => new Promise((resolve) => setImmediate(resolve));

async function until(what: string, probe: () => boolean): Promise<void> {
  for (let i = 0; i < 10_000; i++) {
    if (probe()) return;
    await settle();
  }
  assert.fail(`never: ${what}`);
}

for (const copyMode of ["background", "write-blocking"] as CopyMode[]) {
  test(`mirror ${copyMode}: overlapping writes that complete out of order leave target == source`, async () => {
    const gate = new HeldCompletions("held", new MemoryDriver(DISK));
    const source = new BlockNode("src", gate);
    const target = new BlockNode("tgt", new MemoryDriver(DISK));
    const job = new MirrorJob({
      id: "m",
      source,
      target,
      sync: "none",
      copyMode,
      events: new EventBus(),
      log: silentLogger,
    });
    job.start();
    await until("READY", () => job.ready);

    const first = source.write(0, [Buffer.alloc(128 * KiB, 0xaa)]);
    await until("the first write is applied", () => gate.held.length === 1);
    const second = source.write(64 * KiB, [Buffer.alloc(128 * KiB, 0xbb)]);
    if (copyMode === "background") {
      await until("the second write is applied", () => gate.held.length === 2);
      gate.held.pop()!(); // the newer write completes first
      await second;
      gate.held.pop()!();
      await first;
    } else {
      // Serialised: the second waits for the first to end, so only one is ever held.
      await settle();
      assert.equal(gate.held.length, 1);
      gate.held.pop()!();
      await first;
      await until("the second write is applied", () => gate.held.length === 1);
      gate.held.pop()!();
      await second;
    }
    // Let forwards and copies finish, then end the job in sync.
    await until("nothing left to copy", () => job.dirty.count === 0 && job.lagBytes === 0);
    const release = setInterval(() => gate.held.splice(0).forEach((r) => r()), 1);
    job.cancel();
    await job.concluded;
    clearInterval(release);

    const a = Buffer.alloc(192 * KiB);
    const b = Buffer.alloc(192 * KiB);
    await source.read(0, a);
    await target.read(0, b);
    assert.equal(a[100 * KiB], 0xbb, "the second write is the source's last");
    assert.ok(a.equals(b), "target == source");
  });
}
