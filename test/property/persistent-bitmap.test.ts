/**
 * Named and persistent dirty bitmaps against a model, through the real request path (BlockNode with a
 * memory driver). The central property is write-ahead: whenever the driver receives a write, zero or
 * discard, the sidecar file on disk already has that request's clusters set. Also: after every
 * acknowledged request the file holds a superset of the in-memory bitmap, after a flush exactly it;
 * torn pages load as all-dirty; concurrent first touches share one fdatasync; DirtyBitmap's merge
 * and extents agree with a model.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import fc from "fast-check";
import type { WriteFlags, ZeroFlags } from "../../src/block/driver.js";
import { MemoryDriver } from "../../src/block/drivers/memory.js";
import { FilterDriver } from "../../src/block/filters/filter.js";
import { MiB } from "../../src/core/units.js";
import {
  BitmapFile,
  decodeBitmapFile,
  PAGE_BITS_BYTES,
  PAGE_BYTES,
  PAGES_OFFSET,
} from "../../src/io/bitmap-file.js";
import { BlockNode } from "../../src/io/block-node.js";
import { DirtyBitmap } from "../../src/io/dirty-bitmap.js";
import { NamedBitmap, NodeBitmaps } from "../../src/io/named-bitmaps.js";

const DISK = 64 * MiB;

/** A pass-through driver that checks, at each mutating call, that the sidecar already marks the range. */
class WriteAheadChecker extends FilterDriver {
  file = "";
  checks = 0;
  readonly violations: string[] = [];

  #check(kind: string, offset: number, length: number): void {
    const { bits } = decodeBitmapFile(readFileSync(this.file));
    this.checks++;
    if (!bits.allSet(offset, length))
      this.violations.push(`${kind} ${offset}+${length} reached the driver unmarked`);
  }
  override pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    let length = 0;
    for (const b of data) length += b.length;
    this.#check("write", offset, length);
    return super.pwrite(offset, data, flags);
  }
  override pwriteZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    this.#check("zero", offset, length);
    return super.pwriteZeroes(offset, length, flags);
  }
  override pdiscard(offset: number, length: number): Promise<void> {
    this.#check("discard", offset, length);
    return super.pdiscard(offset, length);
  }
}

interface Setup {
  dir: string;
  node: BlockNode;
  nb: NodeBitmaps;
  bm: NamedBitmap;
  file: BitmapFile;
  checker: WriteAheadChecker;
}

function setup(granularity: number): Setup {
  const dir = mkdtempSync(join(tmpdir(), "drivetap-bitmap-prop-"));
  const image = join(dir, "disk.img");
  writeFileSync(image, "");
  const checker = new WriteAheadChecker("checker", new MemoryDriver(DISK));
  const node = new BlockNode("n", checker);
  const bits = new DirtyBitmap(DISK, granularity);
  const file = BitmapFile.create(image, { name: "b", granularity, sizeBytes: DISK, recording: true }, bits);
  checker.file = file.path;
  const nb = new NodeBitmaps(node, image);
  const bm = new NamedBitmap("b", bits, file, true);
  nb.add(bm);
  return { dir, node, nb, bm, file, checker };
}

type Op =
  | { kind: "write" | "zero" | "discard"; offset: number; length: number }
  | { kind: "clear" }
  | { kind: "flush-check" };

const ioOp = fc.record({
  kind: fc.constantFrom("write" as const, "zero" as const, "discard" as const),
  // Clustered around a few hot spots so requests overlap and pages repeat.
  offset: fc.oneof(
    fc.integer({ min: 0, max: DISK - 1 }),
    fc.integer({ min: 0, max: 8 * 65536 }),
    fc.integer({ min: DISK - 8 * 65536, max: DISK - 1 }),
  ),
  length: fc.integer({ min: 1, max: 300_000 }),
});

const op: fc.Arbitrary<Op> = fc.oneof(
  { weight: 12, arbitrary: ioOp },
  { weight: 1, arbitrary: fc.constant({ kind: "clear" as const }) },
  { weight: 1, arbitrary: fc.constant({ kind: "flush-check" as const }) },
);

function modelSet(model: Set<number>, bits: DirtyBitmap, offset: number, length: number): void {
  const [first, end] = bits.clustersOf(offset, length);
  for (let c = first; c < end; c++) model.add(c);
}

function bitsOf(b: DirtyBitmap): number[] {
  const out: number[] = [];
  for (let c = b.nextSet(0); c >= 0; c = b.nextSet(c + 1)) out.push(c);
  return out;
}

test("persistent bitmap: write-ahead through the request path; file ⊇ memory after each group, == after flush", async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.constantFrom(512, 4096, 65536),
      fc.array(fc.array(op, { minLength: 1, maxLength: 12 }), { minLength: 1, maxLength: 12 }),
      async (granularity, groups) => {
        const s = setup(granularity);
        const model = new Set<number>();
        let requests = 0;
        try {
          for (const group of groups) {
            // A group's requests run concurrently; clear and flush-check act between groups.
            const io: Array<Promise<void>> = [];
            for (const o of group) {
              if (o.kind === "clear" || o.kind === "flush-check") continue;
              const length = Math.min(o.length, DISK - o.offset);
              requests++;
              modelSet(model, s.bm.bits, o.offset, length);
              if (o.kind === "write") io.push(s.node.write(o.offset, [Buffer.alloc(length, 0x5a)]));
              else if (o.kind === "zero") io.push(s.node.writeZeroes(o.offset, length));
              else io.push(s.node.discard(o.offset, length));
            }
            await Promise.all(io);
            assert.deepEqual(s.checker.violations, []);
            assert.deepEqual(
              bitsOf(s.bm.bits),
              [...model].sort((a, b) => a - b),
              "memory == model",
            );
            const onDisk = decodeBitmapFile(readFileSync(s.file.path)).bits;
            for (const c of model) assert.ok(onDisk.get(c), `cluster ${c} acknowledged but not in the file`);
            if (group.some((o) => o.kind === "flush-check")) {
              await s.file.flush();
              const flushed = decodeBitmapFile(readFileSync(s.file.path));
              assert.deepEqual(flushed.badPages, []);
              assert.deepEqual(bitsOf(flushed.bits), bitsOf(s.bm.bits), "after flush: file == memory");
            }
            if (group.some((o) => o.kind === "clear")) {
              s.bm.bits.clearAll();
              model.clear();
              void s.bm.changed(0, s.bm.bits.clusterCount);
            }
          }
          // Groups may hold only clears and flush checks; when there was I/O, the checker saw it.
          if (requests > 0) assert.ok(s.checker.checks > 0, "the driver saw requests");
        } finally {
          await s.nb.close();
          rmSync(s.dir, { recursive: true, force: true });
        }
      },
    ),
    { numRuns: 40 },
  );
});

test("persistent bitmap: a torn page loads with every bit set; other pages exact", async () => {
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.integer({ min: 0, max: DISK / 512 - 1 }), { minLength: 1, maxLength: 200 }),
      fc.nat(),
      fc.nat(),
      async (clusters, pageSeed, byteSeed) => {
        const s = setup(512);
        try {
          await Promise.all(clusters.map((c) => s.node.write(c * 512, [Buffer.alloc(512, 1)])));
          await s.file.flush();
          const raw = readFileSync(s.file.path);
          const pages = (raw.length - PAGES_OFFSET) / PAGE_BYTES;
          const torn = pageSeed % pages;
          raw[PAGES_OFFSET + torn * PAGE_BYTES + (byteSeed % PAGE_BYTES)] ^= 0x40;
          const { bits, badPages } = decodeBitmapFile(raw);
          assert.deepEqual(badPages, [torn]);
          const tornFirst = torn * PAGE_BITS_BYTES * 8;
          const tornEnd = Math.min((torn + 1) * PAGE_BITS_BYTES * 8, bits.clusterCount);
          for (let c = 0; c < bits.clusterCount; c += c % 97 === 0 ? 1 : 13) {
            const want = c >= tornFirst && c < tornEnd ? true : s.bm.bits.get(c);
            assert.equal(bits.get(c), want, `cluster ${c}`);
          }
          for (const c of clusters) assert.ok(bits.get(c));
          // Loading the file itself repairs the page on the next commit.
          writeFileSync(s.file.path, raw);
          const loaded = BitmapFile.load(s.file.path);
          assert.equal(loaded.repairedPages, 1);
          await loaded.file.close();
          assert.deepEqual(decodeBitmapFile(readFileSync(s.file.path)).badPages, []);
        } finally {
          await s.nb.close();
          rmSync(s.dir, { recursive: true, force: true });
        }
      },
    ),
    { numRuns: 25 },
  );
});

test("persistent bitmap: concurrent first touches share fdatasyncs; repeated touches cost none", async () => {
  const s = setup(65536);
  try {
    const writes = Array.from({ length: 200 }, (_, i) =>
      s.node.write(i * 65536 * 3, [Buffer.alloc(4096, 2)]),
    );
    await Promise.all(writes);
    assert.deepEqual(s.checker.violations, []);
    // The first request's commit starts at once; the other 199 wait for it and share the next.
    assert.ok(s.file.syncs <= 2, `200 first touches took ${s.file.syncs} fdatasyncs`);
    const before = s.file.syncs;
    await Promise.all(
      Array.from({ length: 50 }, (_, i) => s.node.write(i * 65536 * 3 + 512, [Buffer.alloc(512, 3)])),
    );
    assert.equal(s.file.syncs, before, "writes to durably marked clusters pay no sync");
  } finally {
    await s.nb.close();
    rmSync(s.dir, { recursive: true, force: true });
  }
});

test("DirtyBitmap: merge across granularities and extents agree with a model", () => {
  const size = 1 * MiB + 1234;
  fc.assert(
    fc.property(
      fc.constantFrom(512, 4096, 65536),
      fc.constantFrom(512, 4096, 65536),
      fc.array(fc.tuple(fc.nat(size - 1), fc.integer({ min: 1, max: 200_000 })), { maxLength: 20 }),
      fc.nat(size - 1),
      fc.integer({ min: 1, max: size }),
      (ga, gb, ranges, qOffset, qLength) => {
        const a = new DirtyBitmap(size, ga);
        const b = new DirtyBitmap(size, gb);
        for (const [o, l] of ranges) b.setRange(o, Math.min(l, size - o));
        a.merge(b);
        // Byte-level model: a byte is dirty in a iff its a-cluster overlaps a b-dirty byte.
        for (let c = 0; c < a.clusterCount; c++) {
          const [o, l] = a.rangeOf(c);
          assert.equal(a.get(c), b.anySet(o, l), `cluster ${c}`);
        }
        const ext = a.extents(qOffset, qLength);
        let pos = qOffset;
        for (const x of ext) {
          assert.ok(x.length > 0);
          for (const at of [pos, pos + x.length - 1]) {
            assert.equal(a.get(Math.floor(at / ga)), x.dirty, `extent state at ${at}`);
          }
          pos += x.length;
        }
        assert.equal(pos, Math.min(qOffset + qLength, size), "extents cover the query");
        const clone = a.clone();
        assert.equal(clone.count, a.count);
        assert.deepEqual(bitsOf(clone), bitsOf(a));
      },
    ),
    { numRuns: 300 },
  );
});
