/**
 * The discardZeroes capability, exactly where it is claimed, and what a stream job records in a
 * journal for a guest discard: a discard entry only when the source reads zeros after it (replay
 * zeroes discard entries), nothing when the source keeps its data, and the source's data when nobody
 * knows what its discard did. Replaying the journal onto the starting disk must give the final disk.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import type { BlockDriver, DriverCapabilities } from "../../src/block/driver.js";
import { FileDriver } from "../../src/block/drivers/file.js";
import { JournalDriver, scanJournalFile } from "../../src/block/drivers/journal.js";
import { MemoryDriver } from "../../src/block/drivers/memory.js";
import { NullDriver } from "../../src/block/drivers/null.js";
import { FilterDriver } from "../../src/block/filters/filter.js";
import { EventBus } from "../../src/core/events.js";
import { silentLogger } from "../../src/core/log.js";
import { BlockNode } from "../../src/io/block-node.js";
import { StreamJob } from "../../src/jobs/stream.js";

const KiB = 1024;
const DISK = 1024 * KiB;

function tempDir(t: { after: (fn: () => void) => void }): string {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "drivetap-discard-zeroes-"));
  t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test("memory: a discard of part of a chunk reads zeros, and the driver says so", async () => {
  const node = new BlockNode("m", new MemoryDriver(DISK));
  assert.equal(node.driver.capabilities.discardZeroes, true);
  await node.write(0, [Buffer.alloc(128 * KiB, 0x11)]);
  await node.discard(1000, 70 * KiB); // partial chunk, then across the chunk boundary
  const b = Buffer.alloc(128 * KiB);
  await node.read(0, b);
  assert.ok(b.subarray(1000, 1000 + 70 * KiB).every((x) => x === 0));
  assert.equal(b[999], 0x11);
  assert.equal(b[1000 + 70 * KiB], 0x11);
});

test("null reads zeros whatever happened; the file driver promises zeros while it can punch holes", async (t) => {
  assert.equal(new NullDriver(DISK).capabilities.discardZeroes, true);
  const image = path.join(tempDir(t), "f.img");
  fs.writeFileSync(image, Buffer.alloc(DISK, 0x22));
  const file = FileDriver.open(image);
  t.after(() => file.close());
  assert.equal(file.capabilities.discardZeroes, FileDriver.nativeAvailable);
  const node = new BlockNode("f", file);
  await node.discard(4 * KiB, 64 * KiB);
  const b = Buffer.alloc(64 * KiB);
  await node.read(4 * KiB, b);
  // tmpfs and ext4 punch holes; if this filesystem cannot, the driver must have stopped promising.
  if (file.capabilities.discardZeroes)
    assert.ok(
      b.every((x) => x === 0),
      "a punched hole reads zeros",
    );
  else
    assert.ok(
      b.every((x) => x === 0x22),
      "no hole: the data stays",
    );
});

class DiscardKind extends FilterDriver {
  readonly #kind: "keeps" | "none";
  constructor(next: BlockDriver, kind: "keeps" | "none") {
    super(`discard-${kind}`, next);
    this.#kind = kind;
  }
  override get capabilities(): DriverCapabilities {
    return { ...this.next.capabilities, discard: this.#kind === "keeps", discardZeroes: false };
  }
  override pdiscard(): Promise<void> {
    return Promise.resolve();
  }
}

for (const kind of ["zeroes", "keeps", "none"] as const) {
  test(`stream to a journal, source discard ${kind}: what is recorded replays to the source`, async (t) => {
    const dir = tempDir(t);
    const mem = new MemoryDriver(DISK);
    const source = new BlockNode("src", kind === "zeroes" ? mem : new DiscardKind(mem, kind));
    const start = Buffer.alloc(DISK, 0x33);
    await source.write(0, [start]);
    const journalPath = path.join(dir, "j.journal");
    const target = new BlockNode("j", JournalDriver.open(journalPath, { size: DISK }));
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
    await source.write(64 * KiB, [Buffer.alloc(64 * KiB, 0x44)]);
    await source.discard(96 * KiB, 128 * KiB);
    job.cancel();
    await job.concluded;
    assert.equal(job.error, undefined);
    await target.driver.close();

    const kinds: string[] = [];
    const replayed = Buffer.from(start);
    scanJournalFile(journalPath, (e) => {
      kinds.push(e.kind);
      if (e.kind === "write") e.payload.copy(replayed, e.offset);
      else if (e.kind === "zero" || e.kind === "discard") replayed.fill(0, e.offset, e.offset + e.length);
    });
    const expected = { zeroes: "discard", keeps: "write", none: undefined }[kind];
    assert.equal(kinds.filter((k) => k !== "flush")[1], expected, `recorded: ${kinds.join(",")}`);
    const now = Buffer.alloc(DISK);
    await source.read(0, now);
    assert.ok(replayed.equals(now), "replaying the journal onto the starting disk gives the source");
  });
}
