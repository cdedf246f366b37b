/**
 * block-stream's copy on a qcow2 chain in memory, while writes reach the top: top alone ends reading
 * what the chain showed plus the writes. The middle layer is smaller than the disk, so the part past
 * its end read zeros through the chain (not the base's data) and must still read zeros afterwards.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import type { BlockDriver } from "../../src/block/driver.js";
import { MemoryDriver } from "../../src/block/drivers/memory.js";
import { createQcow2 } from "../../src/block/drivers/qcow2/create.js";
import { Qcow2Driver } from "../../src/block/drivers/qcow2/qcow2.js";
import { EventBus } from "../../src/core/events.js";
import { silentLogger } from "../../src/core/log.js";
import { BlockNode } from "../../src/io/block-node.js";
import { BlockStreamJob } from "../../src/jobs/block-stream.js";
import { heldRuns } from "../../src/jobs/chain-copy.js";
import { prng, seededBytes, testSeed } from "../helpers/jobs.js";

const KiB = 1024;
const MiB = 1024 * KiB;
const DISK_BYTES = 3 * MiB;
const MID_BYTES = 2 * MiB + 12 * KiB;

async function qcow2(size: number, backing: BlockDriver | null): Promise<Qcow2Driver> {
  const file = new MemoryDriver(32 * MiB);
  await createQcow2(file, size, { clusterSize: 4 * KiB });
  return Qcow2Driver.open(file, { backing, ownsBacking: false });
}

/** Writes seeded data at random places of `driver`, also into `view` where it shows through. */
async function scatter(rnd: () => number, driver: BlockDriver, view: Buffer, count: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    const length = (1 + Math.floor(rnd() * 24)) * 512;
    const offset = Math.floor(rnd() * ((driver.size() - length) / 512)) * 512;
    const data = seededBytes(Math.floor(rnd() * 2 ** 31), length);
    await driver.pwrite(offset, [data], {});
    data.copy(view, offset);
  }
}

test("a stream under writes leaves top reading the chain's view plus the writes, past a short layer too", async (t) => {
  const rnd = prng(testSeed(t));
  const base = new MemoryDriver(DISK_BYTES);
  const view = Buffer.alloc(DISK_BYTES);
  await scatter(rnd, base, view, 60);
  const mid = await qcow2(MID_BYTES, base);
  view.fill(0, MID_BYTES); // the top reads zeros past mid's end, whatever the base holds there
  const midView = Buffer.alloc(MID_BYTES);
  view.copy(midView, 0, 0, MID_BYTES);
  await scatter(rnd, mid, midView, 60);
  midView.copy(view, 0);
  const top = await qcow2(DISK_BYTES, mid);
  await scatter(rnd, top, view, 20);

  // What the layers below top hold: mid's clusters, the base under mid, and all past mid's end.
  const runs = await heldRuns([mid, base], 0, DISK_BYTES);
  assert.ok(runs.some((r) => r.offset + r.length === DISK_BYTES && r.offset <= MID_BYTES));

  const node = new BlockNode("top", top);
  const job = new BlockStreamJob({
    id: "s0",
    top: node,
    topDriver: top,
    layers: [mid, base],
    // Paced (about 0.75 s), so the writes below land while it copies.
    speed: 4 * MiB,
    events: new EventBus(),
    log: silentLogger,
    relink: async () => {
      await node.drained(async () => {
        await top.changeBacking(null, { owns: false, name: null });
      });
    },
    release: () => {},
  });
  job.start();
  // Guest writes while the job runs, through the node as NBD's would (one at a time: the model's order).
  for (let i = 0; i < 200; i++) {
    const length = (1 + Math.floor(rnd() * 16)) * 512;
    const offset = Math.floor(rnd() * ((DISK_BYTES - length) / 512)) * 512;
    const data = seededBytes(Math.floor(rnd() * 2 ** 31), length);
    data.copy(view, offset);
    await node.write(offset, [data]);
  }
  assert.equal(job.status, "running", "the writes overlapped the job");
  await job.concluded;
  assert.equal(job.error, undefined);
  assert.equal(top.backing, null);
  const got = Buffer.alloc(DISK_BYTES);
  await node.read(0, got);
  assert.ok(got.equals(view), "top alone reads what the chain and the writes gave");
});
