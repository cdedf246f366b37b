/**
 * A qcow2 request that fails part-way must not leave child requests running behind it. A read or
 * write walks its clusters in order and starts each cluster's child I/O as it goes; when a later
 * cluster's mapping fails (a hostile L1 entry, say), the request's error must wait for the parts
 * already started. Otherwise their failures are rejections nobody handles (Node ends the process
 * on one: a hostile image would take the daemon down) and their I/O still lands in the caller's
 * buffer after the caller was told the request is over.
 */
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import type { BlockDriver, Extent } from "../../src/block/driver.js";
import { BlockError } from "../../src/core/errors.js";
import { FileDriver } from "../../src/block/drivers/file.js";
import { createQcow2 } from "../../src/block/drivers/qcow2/create.js";
import { Qcow2Driver } from "../../src/block/drivers/qcow2/qcow2.js";
import { tempDir } from "../helpers/run.js";

const CLUSTER = 512;
/** Guest clusters one L2 table maps with 512-byte clusters (512 / 8). */
const L2_CLUSTERS = CLUSTER / 8;

/** A backing image whose reads fail on a later turn of the event loop, as a real device's do. */
class FailingLater implements BlockDriver {
  readonly driverName = "failing-later";
  readonly capabilities = {
    zeroes: "emulated",
    fua: "emulated",
    discard: false,
    blockStatus: false,
    discardZeroes: false,
  } as unknown as BlockDriver["capabilities"];
  reads = 0;
  finished = 0;
  size(): number {
    return 4 * L2_CLUSTERS * CLUSTER;
  }
  async pread(): Promise<void> {
    this.reads++;
    await new Promise((resolve) => setTimeout(resolve, 20));
    this.finished++;
    throw new BlockError("EIO", "backing device failed");
  }
  pwrite(): Promise<void> {
    return Promise.reject(new BlockError("EPERM", "read-only"));
  }
  pwriteZeroes(): Promise<void> {
    return this.pwrite();
  }
  pdiscard(): Promise<void> {
    return this.pwrite();
  }
  async flush(): Promise<void> {}
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return [{ offset, length, type: 0 }] as unknown as Extent[];
  }
  async close(): Promise<void> {}
}

async function imageWithBadSecondL1Entry(t: Parameters<typeof tempDir>[0]): Promise<string> {
  const image = join(tempDir(t, "drivetap-qcow2-errors-"), "e.qcow2");
  writeFileSync(image, "");
  const f = FileDriver.open(image);
  await createQcow2(f, 4 * L2_CLUSTERS * CLUSTER, { clusterSize: CLUSTER });
  await f.close();
  const q = await Qcow2Driver.open(FileDriver.open(image), { backing: null });
  // Guest cluster L2_CLUSTERS is the first of L1 entry 1: writing it makes that entry's L2 table.
  await q.pwrite(L2_CLUSTERS * CLUSTER, [Buffer.alloc(CLUSTER, 0x11)], {});
  await q.close();
  // Then L1 entry 1 is pointed far past the end of the file (hostile metadata).
  const fd = FileDriver.open(image);
  const header = Buffer.alloc(48);
  await fd.pread(0, header);
  const l1 = Number(header.readBigUInt64BE(40));
  const bad = Buffer.alloc(8);
  bad.writeBigUInt64BE((1n << 63n) | (1n << 40n));
  await fd.pwrite(l1 + 8, [bad]);
  await fd.close();
  return image;
}

test("qcow2: a read whose later cluster's mapping fails waits for the parts it started, and fails once", async (t) => {
  const image = await imageWithBadSecondL1Entry(t);
  const backing = new FailingLater();
  const q = await Qcow2Driver.open(FileDriver.open(image), { backing, readOnly: true });
  t.after(() => q.close());
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown): void => void unhandled.push(reason);
  process.on("unhandledRejection", onUnhandled);
  t.after(() => process.off("unhandledRejection", onUnhandled));

  // The last cluster of L1 entry 0 is unallocated (read from the backing, which fails later), the
  // next one lies behind the bad L1 entry.
  const into = Buffer.alloc(2 * CLUSTER);
  await assert.rejects(q.pread((L2_CLUSTERS - 1) * CLUSTER, into), /L2 table offset .* is invalid/);
  assert.equal(backing.reads, 1, "the backing read was started");
  assert.equal(backing.finished, 1, "and had ended before the request failed");
  // Give any stray rejection its turn to surface.
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.deepEqual(unhandled, [], "no rejection was left unhandled");
});

test("qcow2: a write whose later cluster's mapping fails waits for the copy-on-write it started, and fails once", async (t) => {
  const image = await imageWithBadSecondL1Entry(t);
  const backing = new FailingLater();
  const q = await Qcow2Driver.open(FileDriver.open(image), { backing });
  t.after(() => q.close().catch(() => undefined));
  const unhandled: unknown[] = [];
  const onUnhandled = (reason: unknown): void => void unhandled.push(reason);
  process.on("unhandledRejection", onUnhandled);
  t.after(() => process.off("unhandledRejection", onUnhandled));

  // Half of the last cluster of L1 entry 0 (its other half is copied from the failing backing),
  // then a cluster behind the bad L1 entry.
  const at = (L2_CLUSTERS - 1) * CLUSTER + CLUSTER / 2;
  await assert.rejects(q.pwrite(at, [Buffer.alloc(CLUSTER, 0x22)], {}), /L2 table offset .* is invalid/);
  assert.equal(backing.reads, 1, "the copy-on-write read was started");
  assert.equal(backing.finished, 1, "and had ended before the request failed");
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.deepEqual(unhandled, [], "no rejection was left unhandled");
});
