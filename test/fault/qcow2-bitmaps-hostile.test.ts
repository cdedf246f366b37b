/**
 * Hostile bitmap metadata in qcow2 images: named corruptions of the bitmaps extension, the bitmap
 * directory and the bitmap tables are refused at open with a reason; random mutations of them never
 * crash (only BlockErrors), never hang (a deadline per case), and an image that opens survives a
 * writable session whose stored bitmaps open again. The served daemon refuses such an image cleanly.
 * And the store's write order: a power cut at any of its writes leaves no corruption, only the old
 * bitmaps (in use) or exactly the new ones.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { WriteFlags } from "../../src/block/driver.js";
import { MemoryDriver } from "../../src/block/drivers/memory.js";
import { FilterDriver } from "../../src/block/filters/filter.js";
import { Qcow2Driver } from "../../src/block/drivers/qcow2/qcow2.js";
import { QCOW2_EXT_BITMAPS } from "../../src/block/drivers/qcow2/format.js";
import { BlockError } from "../../src/core/errors.js";
import { startDaemon } from "../helpers/daemon.js";
import { prng, testSeed } from "../helpers/jobs.js";
import { assertChecks, qemuImgCreate, qemuIo } from "../helpers/qcow2.js";
import { run, runOk, tempDir } from "../helpers/run.js";

const CASE_DEADLINE_MS = 10_000;
const FUZZ_RUNS = 300;

interface Layout {
  readonly image: Buffer;
  /** Offset of the bitmaps extension's 24 data bytes in cluster 0. */
  readonly ext: number;
  readonly dirOffset: number;
  readonly dirBytes: number;
  /** Each directory entry's offset in the file, and its table's offset and bytes. */
  readonly entries: ReadonlyArray<{ at: number; table: number; tableBytes: number }>;
}

function layoutOf(image: Buffer): Layout {
  let at = image.readUInt32BE(100);
  let ext = -1;
  while (at + 8 <= 512) {
    const type = image.readUInt32BE(at);
    const len = image.readUInt32BE(at + 4);
    if (type === 0) break;
    if (type === QCOW2_EXT_BITMAPS) ext = at + 8;
    at += 8 + Math.ceil(len / 8) * 8;
  }
  assert.ok(ext > 0, "the valid image has a bitmaps extension");
  const count = image.readUInt32BE(ext);
  const dirBytes = Number(image.readBigUInt64BE(ext + 8));
  const dirOffset = Number(image.readBigUInt64BE(ext + 16));
  const entries = [];
  let e = dirOffset;
  for (let i = 0; i < count; i++) {
    const table = Number(image.readBigUInt64BE(e));
    const tableBytes = image.readUInt32BE(e + 8) * 8;
    entries.push({ at: e, table, tableBytes });
    e += Math.ceil((24 + image.readUInt16BE(e + 18)) / 8) * 8;
  }
  return { image, ext, dirOffset, dirBytes, entries };
}

/** 256 MiB disk, 512-byte clusters: b0 at 512-byte granularity has a two-cluster table. */
async function validImage(dir: string): Promise<Layout> {
  const path = join(dir, "valid.qcow2");
  await qemuImgCreate(path, "256M", { options: ["cluster_size=512"] });
  await runOk("qemu-img", ["bitmap", "--add", "-g", "512", path, "b0"]);
  await runOk("qemu-img", ["bitmap", "--add", path, "b1"]);
  await qemuIo(path, "qcow2", ["write -P 0x42 0 4k", "write -P 0x43 100M 64k", "write 255M 512"]);
  return layoutOf(readFileSync(path));
}

function patched(image: Buffer, edit: (b: Buffer) => void): Buffer {
  const b = Buffer.from(image);
  edit(b);
  return b;
}

/** A memory file that grows with what is written past its end, as an image file does. */
class GrowingFile extends FilterDriver {
  #end = 0;
  constructor(next: MemoryDriver) {
    super("growing", next);
  }
  override size(): number {
    return Math.max(super.size(), this.#end);
  }
  override pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    this.#end = Math.max(this.#end, offset + data.reduce((n, b) => n + b.length, 0));
    return super.pwrite(offset, data, flags);
  }
}

async function memoryChild(image: Buffer): Promise<GrowingFile> {
  const m = new MemoryDriver(image.length);
  await m.pwrite(0, [image]);
  return new GrowingFile(m);
}

async function bitsOf(d: Qcow2Driver): Promise<string[]> {
  return d.bitmaps.loaded.map(
    (l) => `${l.name}:${l.inconsistent}:${Buffer.from(l.bits ?? []).toString("base64")}`,
  );
}

/**
 * Opens the image read-only, then writable with every bitmap tracked, writes, closes (storing the
 * bitmaps) and opens the result again: it must load what was stored. Returns the BlockErrors seen.
 */
async function exercise(image: Buffer): Promise<string[]> {
  const seen: string[] = [];
  const attempt = async <V>(what: () => Promise<V>): Promise<V | null> => {
    try {
      return await what();
    } catch (err) {
      if (!(err instanceof BlockError)) throw err;
      seen.push(err.message);
      return null;
    }
  };
  const ro = await attempt(async () =>
    Qcow2Driver.open(await memoryChild(image), { readOnly: true, backing: null, ownsFile: false }),
  );
  if (ro === null) return seen;
  await ro.close();
  const child = await memoryChild(image);
  const rw = await attempt(() => Qcow2Driver.open(child, { backing: null, ownsFile: false }));
  if (rw === null) return seen;
  for (const l of rw.bitmaps.loaded) {
    if (l.bits !== null)
      rw.bitmaps.track({ name: l.name, granularity: l.granularity, enabled: l.enabled, bytes: l.bits });
  }
  await attempt(() => rw.pwrite(0, [Buffer.alloc(512, 0x51)], {}));
  const before = await bitsOf(rw);
  const closed = await attempt(async () => (await rw.close(), true));
  if (closed === null) return seen;
  const again = await Qcow2Driver.open(child, { readOnly: true, backing: null, ownsFile: false });
  const consistent = before.filter((s) => s.includes(":false:"));
  assert.deepEqual(
    (await bitsOf(again)).filter((s) => s.includes(":false:")),
    consistent,
    "stored bits load again",
  );
  await again.close();
  return seen;
}

function withDeadline<T>(p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${what}: no answer within ${CASE_DEADLINE_MS} ms`)),
      CASE_DEADLINE_MS,
    );
  });
  return Promise.race([p, deadline]).finally(() => clearTimeout(timer));
}

test("qcow2 bitmaps: named corruptions of the extension, directory and tables are refused at open with a reason", async (t) => {
  const dir = tempDir(t, "drivetap-qbm-hostile-");
  const L = await validImage(dir);
  const [e0, e1] = L.entries;
  assert.equal(e0.tableBytes, 128 * 8, "b0's table spans two clusters");
  assert.deepEqual(await exercise(L.image), [], "the valid image opens, stores and reopens");

  const u64 = (b: Buffer, at: number, v: bigint): void => {
    b.writeBigUInt64BE(v, at);
  };
  const cases: Array<[string, (b: Buffer) => void, RegExp]> = [
    ["zero bitmaps", (b) => b.writeUInt32BE(0, L.ext), /zero bitmaps/],
    ["65536 bitmaps", (b) => b.writeUInt32BE(65536, L.ext), /65536 bitmaps, more than the maximum 65535/],
    ["count too high", (b) => b.writeUInt32BE(3, L.ext), /fewer bitmaps in the directory/],
    ["count too low", (b) => b.writeUInt32BE(1, L.ext), /more bitmaps in the directory/],
    ["reserved", (b) => b.writeUInt32BE(1, L.ext + 4), /reserved field is not zero/],
    ["huge directory", (b) => u64(b, L.ext + 8, 1n << 40n), /directory size 1099511627776 is invalid/],
    ["directory past the end", (b) => u64(b, L.ext + 16, BigInt(b.length)), /directory offset .* is invalid/],
    ["directory unaligned", (b) => u64(b, L.ext + 16, BigInt(L.dirOffset + 8)), /directory offset/],
    [
      "table size 0",
      (b) => b.writeUInt32BE(0, e0.at + 8),
      /'b0' doesn't satisfy the constraints: table size/,
    ],
    ["huge table", (b) => b.writeUInt32BE(0x8000001, e0.at + 8), /'b0' .* table size/],
    ["table past the end", (b) => u64(b, e0.at, BigInt(b.length)), /'b0' .* table offset/],
    ["table unaligned", (b) => u64(b, e1.at, BigInt(e1.table + 8)), /'b1' .* table offset/],
    ["table too short", (b) => b.writeUInt32BE(64, e0.at + 8), /'b0' .* table of 64 entries/],
    ["unknown flag", (b) => (b[e0.at + 15] |= 4), /unknown flags 0x6/],
    ["type 2", (b) => (b[e0.at + 16] = 2), /type 2/],
    ["granularity 2^8", (b) => (b[e0.at + 17] = 8), /granularity 2\^8/],
    ["granularity 2^63", (b) => (b[e1.at + 17] = 63), /granularity 2\^63/],
    ["empty name", (b) => b.writeUInt16BE(0, e0.at + 18), /empty name/],
    ["name past the directory", (b) => b.writeUInt16BE(0xffff, e1.at + 18), /directory is broken/],
    ["extra data", (b) => b.writeUInt32BE(8, e0.at + 20), /extra data is not supported/],
    ["same name twice", (b) => b.write("b0", e1.at + 24, "latin1"), /'b0' is in the directory twice/],
    ["table entry reserved bits", (b) => (b[e0.table + 7] |= 2), /'b0': table entry 0 is invalid/],
    ["table entry past the end", (b) => u64(b, e1.table, BigInt(b.length)), /'b1': table entry 0 is invalid/],
    ["table entry unaligned", (b) => u64(b, e1.table, 512n + 16n), /'b1': table entry 0 is invalid/],
  ];
  for (const [what, edit, expected] of cases) {
    const seen = await withDeadline(exercise(patched(L.image, edit)), what);
    assert.equal(seen.length, 1, `${what}: refused at open, once: ${seen.join(" | ")}`);
    assert.match(seen[0], expected, what);
  }
  // An in-use bitmap's table is not read (its data is void), so its damage does not matter.
  const inUseDamaged = patched(L.image, (b) => ((b[e0.at + 15] |= 1), u64(b, e0.table, 1n << 62n)));
  assert.deepEqual(await exercise(inUseDamaged), []);

  // The daemon refuses such an image with the reason and exits; it does not crash.
  const hostile = join(dir, "hostile.qcow2");
  writeFileSync(
    hostile,
    patched(L.image, (b) => (b[e0.at + 17] = 40)),
  );
  const daemon = await startDaemon({ image: hostile }).then(
    (d) => d,
    (err: Error) => err,
  );
  assert.ok(daemon instanceof Error, "the daemon does not serve it");
  assert.match(daemon.message, /bitmap 'b0' doesn't satisfy the constraints: granularity 2\^40/);
  assert.doesNotMatch(daemon.message, /TypeError|RangeError|at .*\.js:\d+/);
});

test("qcow2 bitmaps fuzz: random mutations of the extension, directory and tables never crash or hang, and what opens stores and reopens", async (t) => {
  const dir = tempDir(t, "drivetap-qbm-fuzz-");
  const L = await validImage(dir);
  const seed = testSeed(t);
  const rand = prng(seed);
  const regions: Array<[number, number]> = [
    [L.ext, 24],
    [L.dirOffset, L.dirBytes],
    ...L.entries.map((e): [number, number] => [e.table, e.tableBytes]),
  ];
  let opened = 0;
  for (let run = 0; run < FUZZ_RUNS; run++) {
    const image = Buffer.from(L.image);
    const flips = 1 + Math.floor(rand() * 4);
    for (let f = 0; f < flips; f++) {
      const [start, len] = regions[Math.floor(rand() * regions.length)];
      const at = start + Math.floor(rand() * len);
      image[at] = rand() < 0.5 ? image[at] ^ (1 << Math.floor(rand() * 8)) : Math.floor(rand() * 256);
    }
    const seen = await withDeadline(exercise(image), `seed ${seed} run ${run}`).catch((err: Error) => {
      throw new Error(`seed ${seed} run ${run}: ${err.stack ?? err.message}`);
    });
    if (seen.length === 0) opened++;
  }
  // Some mutations hit bytes that do not matter (names, unused bits of data): they must still work.
  assert.ok(
    opened > 0 && opened < FUZZ_RUNS,
    `seed ${seed}: ${opened} of ${FUZZ_RUNS} mutated images opened`,
  );
});

test("qcow2 bitmaps written by drivetap's writer pass qemu-img check, with a multi-cluster table", async (t) => {
  const dir = tempDir(t, "drivetap-qbm-writer-");
  const L = await validImage(dir);
  const child = await memoryChild(L.image);
  const d = await Qcow2Driver.open(child, { backing: null, ownsFile: false });
  const b0 = d.bitmaps.loaded.find((l) => l.name === "b0")!;
  const bits = Buffer.from(b0.bits!);
  bits.fill(0xff, 1000, 5000); // spans data clusters of both table clusters' worth
  d.bitmaps.track({ name: "b0", granularity: 512, enabled: true, bytes: bits });
  await d.close();
  const out = Buffer.alloc(child.size());
  await child.pread(0, out);
  const path = join(dir, "written.qcow2");
  writeFileSync(path, out);
  await assertChecks(path);
  const again = await Qcow2Driver.open(await memoryChild(out), {
    readOnly: true,
    backing: null,
    ownsFile: false,
  });
  const loaded = again.bitmaps.loaded.find((l) => l.name === "b0")!;
  assert.ok(Buffer.from(loaded.bits!).equals(bits), "b0 reads back as written");
  assert.equal(
    again.bitmaps.loaded.find((l) => l.name === "b1")?.inconsistent,
    true,
    "b1 was not tracked: it stays in use",
  );
  await again.close();
});

/** Records every write and flush once started, so a power cut at any point can be replayed. */
class RecordingFile extends GrowingFile {
  ops: Array<{ offset: number; data: Buffer } | "flush"> | null = null;
  override pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    this.ops?.push({ offset, data: Buffer.concat(data) });
    return super.pwrite(offset, data, flags);
  }
  override flush(): Promise<void> {
    this.ops?.push("flush");
    return super.flush();
  }
}

test("qcow2 bitmaps crash points: a power cut at any write of the store leaves an image qemu-img check finds uncorrupted, whose bitmaps are the old ones in use or exactly the new ones", async (t) => {
  const dir = tempDir(t, "drivetap-qbm-cut-");
  const L = await validImage(dir);
  const m = new MemoryDriver(L.image.length);
  await m.pwrite(0, [L.image]);
  const child = new RecordingFile(m);
  const d = await Qcow2Driver.open(child, { backing: null, ownsFile: false });
  const bits = Buffer.from(d.bitmaps.loaded.find((l) => l.name === "b0")!.bits!);
  bits.fill(0xa5, 100, 700);
  bits.fill(0xff, 60000, 60100);
  d.bitmaps.track({ name: "b0", granularity: 512, enabled: true, bytes: bits });
  d.bitmaps.track({ name: "fresh", granularity: 65536, enabled: false, bytes: new Uint8Array(512).fill(1) });
  await d.pwrite(4096, [Buffer.alloc(8192, 0x61)], {});
  const start = Buffer.alloc(child.size());
  await child.pread(0, start);
  child.ops = [];
  await d.close();
  const ops = child.ops;
  assert.ok(ops.length > 10, `the store wrote something (${ops.length} operations)`);

  const image = (upTo: number, onlyFlushed: boolean): Buffer => {
    let end = upTo;
    if (onlyFlushed) while (end > 0 && ops[end - 1] !== "flush") end--;
    let out = Buffer.from(start);
    for (const op of ops.slice(0, end)) {
      if (op === "flush") continue;
      if (op.offset + op.data.length > out.length) {
        out = Buffer.concat([out, Buffer.alloc(op.offset + op.data.length - out.length)]);
      }
      op.data.copy(out, op.offset);
    }
    return out;
  };
  const path = join(dir, "cut.qcow2");
  const outcomes = new Set<string>();
  for (let k = 0; k <= ops.length; k++) {
    for (const onlyFlushed of [false, true]) {
      const cut = image(k, onlyFlushed);
      writeFileSync(path, cut);
      // qemu-img check: 0 clean, 3 leaked clusters only (the store's order allows leaks), 2 corrupt.
      const check = await run("qemu-img", ["check", path]);
      assert.ok(
        check.code === 0 || check.code === 3,
        `cut at ${k} (${onlyFlushed}): ${check.stdout}${check.stderr}`,
      );
      const again = await Qcow2Driver.open(await memoryChild(cut), {
        readOnly: true,
        backing: null,
        ownsFile: false,
      });
      const b0 = again.bitmaps.loaded.find((l) => l.name === "b0");
      assert.ok(b0, `cut at ${k}: b0 is still in the image`);
      if (!b0.inconsistent)
        assert.ok(Buffer.from(b0.bits!).equals(bits), `cut at ${k}: consistent b0 has the new bits`);
      const fresh = again.bitmaps.loaded.find((l) => l.name === "fresh");
      assert.equal(
        fresh === undefined,
        b0.inconsistent,
        `cut at ${k}: both bitmaps switch at the same write`,
      );
      outcomes.add(b0.inconsistent ? "old" : "new");
      await again.close();
    }
  }
  assert.deepEqual([...outcomes].sort(), ["new", "old"], "cuts land on both sides of the switch");
});
