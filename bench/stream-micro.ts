/**
 * Micro benchmark of what a stream job adds to each write, without NBD or fio: BlockNode writes of
 * 4 KiB at a fixed concurrency to a null source, with no job, with a stream job to a null target and
 * with a stream job to a journal (data: true, in a temp directory). Reported as µs per write, which is
 * the event loop's CPU per write since nothing here waits on anything but the CPU. Run with
 * `node dist/bench/stream-micro.js [writes] [concurrency] [rounds]`.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { JournalDriver } from "../src/block/drivers/journal.js";
import { NullDriver } from "../src/block/drivers/null.js";
import type { BlockDriver } from "../src/block/driver.js";
import { EventBus } from "../src/core/events.js";
import { silentLogger } from "../src/core/log.js";
import { BlockNode } from "../src/io/block-node.js";
import { StreamJob } from "../src/jobs/stream.js";
import { DISK_BYTES, timeConcurrentWrites } from "./micro-common.js";

const WRITES = Number(process.argv[2] ?? 200_000);
const CONCURRENCY = Number(process.argv[3] ?? 32);
const ROUNDS = Number(process.argv[4] ?? 3);

type Variant = "no job" | "stream to null" | "stream to journal";

async function round(dir: string, variant: Variant, index: number): Promise<number> {
  const source = new BlockNode("src", new NullDriver(DISK_BYTES));
  const journalPath = join(dir, `j${index}`);
  let job: StreamJob | null = null;
  if (variant !== "no job") {
    const driver: BlockDriver =
      variant === "stream to null"
        ? new NullDriver(DISK_BYTES)
        : JournalDriver.open(journalPath, { size: DISK_BYTES, data: true });
    const target = new BlockNode("tgt", driver);
    job = new StreamJob({
      id: "s",
      type: "backup",
      source,
      target,
      sync: "stream",
      events: new EventBus(),
      log: silentLogger,
    });
    job.start();
    while (source.hookCount === 0) await new Promise((r) => setImmediate(r));
  }
  const us = await timeConcurrentWrites(WRITES, CONCURRENCY, (offset, data) => source.write(offset, [data]));
  if (job) {
    job.cancel(false);
    await job.concluded;
  }
  rmSync(journalPath, { force: true });
  return us;
}

const dir = mkdtempSync(join(tmpdir(), "drivetap-stream-micro-"));
try {
  const variants: Variant[] = ["no job", "stream to null", "stream to journal"];
  const results = new Map<Variant, number[]>(variants.map((v) => [v, []]));
  for (let r = 0; r < ROUNDS; r++) for (const v of variants) results.get(v)!.push(await round(dir, v, r));
  for (const v of variants) {
    const xs = results.get(v)!;
    const median = [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];
    console.log(
      `${v.padEnd(18)} ${xs.map((us) => us.toFixed(2)).join(" ")} us/write (median ${median.toFixed(2)})`,
    );
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}
