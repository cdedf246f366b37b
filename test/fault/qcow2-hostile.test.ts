/**
 * Hostile qcow2 images. Named corruptions and unsupported features are refused with a message that
 * says what; random mutations of a valid image's header, L1 table, refcount table, refcount block and
 * L2 table never crash (only BlockErrors), never hang (each case has a deadline) and never make the
 * driver read or allocate more than the format's bounds allow. A served hostile image fails the
 * requests that touch the damage and the daemon keeps serving the rest.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { deflateRawSync } from "node:zlib";
import fc from "fast-check";
import type { BlockDriver } from "../../src/block/driver.js";
import { MemoryDriver } from "../../src/block/drivers/memory.js";
import { FilterDriver } from "../../src/block/filters/filter.js";
import { QCOW2_L1_BYTES_MAX } from "../../src/block/drivers/qcow2/format.js";
import { Qcow2Driver } from "../../src/block/drivers/qcow2/qcow2.js";
import { BlockError } from "../../src/core/errors.js";
import { KiB, MiB } from "../../src/core/units.js";
import { CLI, startDaemon, stopAfter } from "../helpers/daemon.js";
import { qemuImgCreate } from "../helpers/qcow2.js";
import { run, runOk, tempDir } from "../helpers/run.js";

const CASE_DEADLINE_MS = 10_000;
const FUZZ_RUNS = 400;
/** Host bytes a hostile image may make the driver touch beyond the file's end (its own allocations). */
const GROWTH_BYTES_MAX = 64 * MiB;

/** A child that records the largest read and refuses writes far past the image's end. */
class Watched extends FilterDriver {
  largestRead = 0;
  readonly #limit: number;
  constructor(next: BlockDriver) {
    super("watched", next);
    this.#limit = next.size() + GROWTH_BYTES_MAX;
  }
  override pread(offset: number, into: Buffer): Promise<void> {
    this.largestRead = Math.max(this.largestRead, into.length);
    return super.pread(offset, into);
  }
  override pwrite(offset: number, data: readonly Buffer[], flags: object): Promise<void> {
    const bytes = data.reduce((n, b) => n + b.length, 0);
    assert.ok(offset + bytes <= this.#limit, `write at ${offset}+${bytes} is far past the image's end`);
    return super.pwrite(offset, data, flags);
  }
}

async function memoryChild(image: Buffer): Promise<Watched> {
  const m = new MemoryDriver(image.length);
  await m.pwrite(0, [image]);
  return new Watched(m);
}

/** How many images `exercise` got past the open (so the fuzzer is known to reach the tables). */
let opened = 0;

/** Opens and uses the image; resolves with the error messages seen (BlockErrors only). */
async function exercise(image: Buffer): Promise<string[]> {
  const child = await memoryChild(image);
  const seen: string[] = [];
  const attempt = async (what: () => Promise<unknown>): Promise<void> => {
    try {
      await what();
    } catch (err) {
      if (!(err instanceof BlockError)) throw err;
      seen.push(err.message);
    }
  };
  let driver: Qcow2Driver | null = null;
  await attempt(async () => (driver = await Qcow2Driver.open(child, { backing: null })));
  if (driver === null) return seen;
  opened++;
  const d: Qcow2Driver = driver;
  const size = d.size();
  const at = (f: number): number => Math.min(Math.floor(size * f), Math.max(0, size - 64 * KiB));
  const span = Math.min(size, 64 * KiB);
  if (span > 0) {
    for (const f of [0, 0.25, 0.5, 0.99]) await attempt(() => d.pread(at(f), Buffer.alloc(span)));
    await attempt(() => d.blockStatus(0, Math.min(size, 16 * MiB)));
    await attempt(() => d.pwrite(0, [Buffer.alloc(Math.min(span, 512), 0x59)], {}));
    await attempt(() => d.pwrite(at(0.1), [Buffer.alloc(span, 0x5a)], {}));
    await attempt(() => d.pwrite(at(0.5) + 100, [Buffer.alloc(Math.min(span, 1000), 0x5b)], {}));
    await attempt(() => d.pwriteZeroes(at(0.3), span, { mayTrim: true }));
    await attempt(() => d.pdiscard(at(0.6), span));
    await attempt(() => d.flush());
  }
  await attempt(() => d.close());
  assert.ok(child.largestRead <= QCOW2_L1_BYTES_MAX, `a read of ${child.largestRead} bytes`);
  return seen;
}

function withDeadline<T>(p: Promise<T>, what: string): Promise<T> {
  let timer: NodeJS.Timeout;
  const deadline = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`${what}: no answer within ${CASE_DEADLINE_MS} ms (a hang)`)),
      CASE_DEADLINE_MS,
    );
  });
  return Promise.race([p, deadline]).finally(() => clearTimeout(timer));
}

interface Layout {
  readonly image: Buffer;
  readonly l1Offset: number;
  readonly reftableOffset: number;
  readonly refblockOffset: number;
  readonly l2Offset: number;
}

async function validImage(dir: string, cluster: string, extra: readonly string[] = []): Promise<Layout> {
  const path = join(dir, `valid-${cluster}-${extra.join("-")}.qcow2`);
  await qemuImgCreate(path, "16M", { options: [`cluster_size=${cluster}`, ...extra] });
  await runOk("qemu-io", ["-f", "qcow2", "-c", "write -P 0x42 0 1M", "-c", "write -P 0x43 8M 64k", path]);
  const image = readFileSync(path);
  const l1Offset = Number(image.readBigUInt64BE(40));
  const reftableOffset = Number(image.readBigUInt64BE(48));
  const refblockOffset = Number(image.readBigUInt64BE(reftableOffset));
  const l2Offset = Number(image.readBigUInt64BE(l1Offset) & 0x00fffffffffffe00n);
  return { image, l1Offset, reftableOffset, refblockOffset, l2Offset };
}

function patched(image: Buffer, edit: (b: Buffer) => void): Buffer {
  const b = Buffer.from(image);
  edit(b);
  return b;
}

test("qcow2 hostile headers and unsupported features are refused by name", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-hostile-");
  const { image, l1Offset } = await validImage(dir, "64k");
  const cases: Array<[string, (b: Buffer) => void, RegExp]> = [
    ["bad magic", (b) => b.writeUInt32BE(0x12345678, 0), /not a qcow2 image/],
    ["version 4", (b) => b.writeUInt32BE(4, 4), /version 4 is not supported/],
    ["cluster_bits 8", (b) => b.writeUInt32BE(8, 20), /cluster size 2\^8/],
    ["cluster_bits 22", (b) => b.writeUInt32BE(22, 20), /cluster size 2\^22/],
    ["encryption", (b) => b.writeUInt32BE(1, 32), /encrypted images are not supported/],
    ["external data file", (b) => (b[79] |= 4), /external data file is not supported/],
    ["extended L2", (b) => (b[79] |= 16), /extended L2 entries are not supported/],
    ["unknown incompatible bit", (b) => (b[78] |= 2), /unsupported incompatible feature\(s\): bit 9/],
    ["unknown high incompatible bit", (b) => (b[72] |= 0x80), /bit 63/],
    ["zstd compression", (b) => ((b[79] |= 8), (b[104] = 1)), /compression zstd is not supported/],
    [
      "refcount_order 3",
      (b) => b.writeUInt32BE(3, 96),
      /refcount_order 3 \(8-bit refcounts\) is not supported/,
    ],
    ["refcount_order 40", (b) => b.writeUInt32BE(40, 96), /refcount_order 40/],
    ["huge L1", (b) => b.writeUInt32BE(0x10000000, 36), /L1 table of 268435456 entries is too large/],
    ["L1 too small", (b) => b.writeUInt32BE(0, 36), /too small for the disk/],
    ["L1 past the end", (b) => b.writeBigUInt64BE(BigInt(b.length), 40), /L1 table lies beyond the end/],
    ["L1 unaligned", (b) => b.writeBigUInt64BE(BigInt(l1Offset + 8), 40), /L1 table offset .* is invalid/],
    ["no refcount table", (b) => b.writeUInt32BE(0, 56), /refcount table of 0 clusters/],
    ["huge refcount table", (b) => b.writeUInt32BE(0xffffff, 56), /refcount table of 16777215 clusters/],
    ["huge virtual size", (b) => b.writeBigUInt64BE(1n << 60n, 24), /virtual size .* is too large/],
    [
      "header_length past the cluster",
      (b) => b.writeUInt32BE(1 << 20, 100),
      /header_length 1048576 is invalid/,
    ],
    [
      "backing name past the cluster",
      (b) => (b.writeBigUInt64BE(65000n, 8), b.writeUInt32BE(1000, 16)),
      /backing file name too long/,
    ],
    ["too many snapshots", (b) => b.writeUInt32BE(1 << 20, 60), /snapshots is too many/],
  ];
  for (const [what, edit, expected] of cases) {
    const seen = await withDeadline(exercise(patched(image, edit)), what);
    assert.equal(seen.length, 1, `${what}: refused at open, once: ${seen.join(" | ")}`);
    assert.match(seen[0], expected, what);
  }
  // The real thing where qemu-img can make it.
  const real = await validImage(dir, "64k", ["extended_l2=on"]).catch(() => null);
  if (real === null) assert.fail("qemu-img could not create an extended_l2 image");
  const extl2 = await exercise(real.image);
  assert.match(extl2[0], /extended L2 entries are not supported/);
  const r8 = join(dir, "r8.qcow2");
  await qemuImgCreate(r8, "1M", { options: ["refcount_bits=8"] });
  assert.match((await exercise(readFileSync(r8)))[0], /refcount_order 3/);
});

test("qcow2 corrupt tables: entries past the end, unaligned or into metadata fail the request that meets them, with a reason", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-hostile-");
  const { image, l1Offset, reftableOffset, l2Offset } = await validImage(dir, "64k");
  const l1PastEnd = await exercise(
    patched(image, (b) => b.writeBigUInt64BE((1n << 63n) | BigInt(b.length + 65536), l1Offset)),
  );
  assert.ok(
    l1PastEnd.some((m) => /L2 table offset .* \(L1 entry 0\) is invalid/.test(m)),
    l1PastEnd.join(" | "),
  );
  const l2ToReftable = await exercise(
    patched(image, (b) => b.writeBigUInt64BE((1n << 63n) | BigInt(reftableOffset), l2Offset)),
  );
  assert.ok(
    l2ToReftable.some((m) => /overlaps the image's metadata/.test(m)),
    l2ToReftable.join(" | "),
  );
  const l2Unaligned = await exercise(
    patched(image, (b) => b.writeBigUInt64BE((1n << 63n) | BigInt(l2Offset + 512), l2Offset)),
  );
  assert.ok(
    l2Unaligned.some((m) => /data cluster offset .* is invalid/.test(m)),
    l2Unaligned.join(" | "),
  );
  const refPastEnd = await exercise(
    patched(image, (b) => b.writeBigUInt64BE(BigInt(b.length * 4), reftableOffset)),
  );
  assert.match(refPastEnd[0], /refcount block offset .* is invalid/);
});

test("qcow2 compressed cluster holding garbage: the read fails with EIO, a deflate bomb is cut at a cluster", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-hostile-");
  const raw = join(dir, "src.raw");
  const path = join(dir, "c.qcow2");
  writeFileSync(raw, Buffer.alloc(MiB, 0x77));
  await runOk("qemu-img", ["convert", "-c", "-O", "qcow2", raw, path]);
  const image = readFileSync(path);
  const l1Offset = Number(image.readBigUInt64BE(40));
  const l2Offset = Number(image.readBigUInt64BE(l1Offset) & 0x00fffffffffffe00n);
  const entry = image.readBigUInt64BE(l2Offset);
  assert.ok(entry & (1n << 62n), "cluster 0 is compressed");
  const coffset = Number(entry & ((1n << 54n) - 1n));
  const child = await memoryChild(patched(image, (b) => b.fill(0xff, coffset, coffset + 64)));
  const d = await Qcow2Driver.open(child, { backing: null, readOnly: true });
  await assert.rejects(
    d.pread(0, Buffer.alloc(4096)),
    (e: BlockError) => e.code === "EIO" && /does not decompress/.test(e.message),
  );
  // A deflate bomb: 2 MiB of zeros compressed into a 64 KiB cluster's entry is cut at the cluster.
  const bomb = deflateRawSync(Buffer.alloc(2 * MiB));
  const sectors = Math.ceil(((coffset % 512) + bomb.length) / 512) - 1;
  const bombed = patched(image, (b) => {
    bomb.copy(b, coffset);
    b.writeBigUInt64BE((1n << 62n) | (BigInt(sectors) << 54n) | BigInt(coffset), l2Offset);
  });
  const d2 = await Qcow2Driver.open(await memoryChild(bombed), { backing: null, readOnly: true });
  await assert.rejects(
    d2.pread(0, Buffer.alloc(4096)),
    (e: BlockError) => e.code === "EIO" && /does not decompress/.test(e.message),
  );
  await d2.close();
  // The other clusters still read.
  const ok = Buffer.alloc(4096);
  await d.pread(128 * KiB, ok);
  assert.ok(ok.every((b) => b === 0x77));
  await d.close();
});

test("qcow2 random mutations of header, L1, refcount table, refcount block and L2 table: only BlockErrors, no hang, bounded reads", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-fuzz-");
  const layouts = [await validImage(dir, "64k"), await validImage(dir, "512")];
  const openedBefore = opened;
  const interesting = [
    0n,
    1n,
    0x1ffn,
    0x200n,
    0xffffffffn,
    1n << 32n,
    1n << 55n,
    (1n << 64n) - 1n,
    1n << 63n,
    1n << 62n,
  ];
  const mutation = fc.record({
    region: fc.constantFrom("header", "l1", "reftable", "refblock", "l2"),
    at: fc.nat(),
    kind: fc.constantFrom("byte", "u32", "u64", "flip"),
    value: fc.oneof(fc.constantFrom(...interesting), fc.bigUintN(64)),
  });
  await fc.assert(
    fc.asyncProperty(
      fc.constantFrom(0, 1),
      fc.array(mutation, { minLength: 1, maxLength: 6 }),
      async (which, muts) => {
        const l = layouts[which];
        const b = Buffer.from(l.image);
        for (const m of muts) {
          const base: number = {
            header: 0,
            l1: l.l1Offset,
            reftable: l.reftableOffset,
            refblock: l.refblockOffset,
            l2: l.l2Offset,
          }[m.region]!;
          const span = m.region === "header" ? 112 : 256;
          const at = Math.min(base + (m.at % span), b.length - 8);
          const v = BigInt.asUintN(64, m.value);
          if (m.kind === "byte") b[at] = Number(v & 0xffn);
          else if (m.kind === "u32") b.writeUInt32BE(Number(v & 0xffffffffn), at);
          else if (m.kind === "u64") b.writeBigUInt64BE(v, at);
          else b[at] ^= 1 << Number(v % 8n);
        }
        await withDeadline(
          exercise(b),
          JSON.stringify(muts, (_, x) => (typeof x === "bigint" ? x.toString() : x)),
        );
      },
    ),
    { numRuns: FUZZ_RUNS },
  );
  assert.ok(
    opened - openedBefore >= FUZZ_RUNS / 4,
    `only ${opened - openedBefore} of ${FUZZ_RUNS} mutated images opened`,
  );
});

test("a hostile image served by the daemon: requests that meet the damage fail, the daemon keeps serving; a refused image exits with the reason", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-served-");
  const { image, l1Offset } = await validImage(dir, "64k");
  // L1 entry 0 (the first 512 MiB) points past the end: all of this 16 MiB disk is unreadable...
  const bad = join(dir, "bad.qcow2");
  writeFileSync(
    bad,
    patched(image, (b) => b.writeBigUInt64BE((1n << 63n) | (1n << 40n), l1Offset)),
  );
  const daemon = await startDaemon({ image: bad, args: ["--read-only"] });
  stopAfter(t, daemon);
  const r = await run("qemu-io", ["-r", "-f", "raw", daemon.uri, "-c", "read 0 4k"]);
  assert.match(r.stdout + r.stderr, /read failed/);
  assert.ok(daemon.alive(), "the daemon survives");
  // ...and every request says so again, without taking the daemon down.
  const again = await run("qemu-io", ["-r", "-f", "raw", daemon.uri, "-c", "read 8M 4k"]);
  assert.match(again.stdout + again.stderr, /read failed/);
  assert.ok(daemon.alive());
  const refused = join(dir, "refused.qcow2");
  writeFileSync(
    refused,
    patched(image, (b) => b.writeUInt32BE(0x10000000, 36)),
  );
  const out = await run(process.execPath, [CLI, "serve", refused, "--socket", join(dir, "s.sock")]);
  assert.equal(out.code, 1);
  assert.match(out.stderr, /L1 table of 268435456 entries is too large/);
});
