/**
 * Micro benchmark of the journal driver's per-write CPU cost, without NBD: JournalDriver.pwrite with
 * 4 KiB buffers (data: true) at a fixed concurrency into a journal in a temp directory, reported as µs
 * per write. Run with `node dist/bench/journal-micro.js [writes] [concurrency] [rounds]`. It writes
 * writes x 4 KiB (400 MB by default) to the page cache and deletes the file after each round.
 */
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import { crc32cImplementation } from "../src/block/crc32c.js";
import { JournalDriver } from "../src/block/drivers/journal.js";

const WRITES = Number(process.argv[2] ?? 100_000);
const CONCURRENCY = Number(process.argv[3] ?? 32);
const ROUNDS = Number(process.argv[4] ?? 3);
const BLOCK_BYTES = 4096;
const DISK_BYTES = 1 << 30;

async function round(dir: string, index: number): Promise<number> {
  const path = join(dir, `j${index}`);
  const j = JournalDriver.open(path, { size: DISK_BYTES, data: true });
  // Distinct buffers, as NBD requests would bring; reused across writes (the journal copies nothing).
  const buffers = Array.from({ length: CONCURRENCY }, () => randomBytes(BLOCK_BYTES));
  const blocks = DISK_BYTES / BLOCK_BYTES;
  let next = 0;
  const worker = async (w: number): Promise<void> => {
    while (next < WRITES) {
      const i = next++;
      await j.pwrite(((i * 2654435761) % blocks) * BLOCK_BYTES, [buffers[w]], {});
    }
  };
  const start = process.hrtime.bigint();
  await Promise.all(Array.from({ length: CONCURRENCY }, (_, w) => worker(w)));
  const ns = Number(process.hrtime.bigint() - start);
  await j.close();
  rmSync(path, { force: true });
  return ns / 1000 / WRITES;
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
