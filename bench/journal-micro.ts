/**
 * Micro benchmark of the journal driver's per-write CPU cost, without NBD: JournalDriver.pwrite with
 * 4 KiB buffers (data: true) at a fixed concurrency into a journal in a temp directory, reported as µs
 * per write. Run with `node dist/bench/journal-micro.js [writes] [concurrency] [rounds]`. It writes
 * writes x 4 KiB (400 MB by default) to the page cache and deletes the file after each round.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { crc32cImplementation } from "../src/block/crc32c.js";
import { JournalDriver } from "../src/block/drivers/journal.js";
import { DISK_BYTES, timeConcurrentWrites } from "./micro-common.js";

const WRITES = Number(process.argv[2] ?? 100_000);
const CONCURRENCY = Number(process.argv[3] ?? 32);
const ROUNDS = Number(process.argv[4] ?? 3);

async function round(dir: string, index: number): Promise<number> {
  const path = join(dir, `j${index}`);
  const j = JournalDriver.open(path, { size: DISK_BYTES, data: true });
  const us = await timeConcurrentWrites(WRITES, CONCURRENCY, (offset, data) => j.pwrite(offset, [data], {}));
  await j.close();
  rmSync(path, { force: true });
  return us;
}

const dir = mkdtempSync(join(tmpdir(), "drivetap-journal-micro-"));
try {
  const results: number[] = [];
  for (let r = 0; r < ROUNDS; r++) results.push(await round(dir, r));
  const sorted = [...results].sort((a, b) => a - b);
  console.log(
    `journal pwrite 4 KiB, data, concurrency ${CONCURRENCY}, ${WRITES} writes, CRC-32C ${crc32cImplementation}: ` +
      `${results.map((us) => us.toFixed(2)).join(" ")} us/write (median ${sorted[Math.floor(ROUNDS / 2)].toFixed(2)})`,
  );
} finally {
  rmSync(dir, { recursive: true, force: true });
}
