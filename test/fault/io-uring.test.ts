/**
 * The io_uring engine (block/drivers/io-engine/io-uring.ts) on its own and in the daemon: it must set
 * up on this kernel (a refusal fails, never skips), keep more operations than the ring holds in its
 * bounded backlog and send the excess to the threadpool, continue short reads, close a descriptor only
 * after its operations complete, and survive injected submission and completion failures with every
 * acknowledged write on disk. In the daemon, a stream job's target write joins the source write's
 * submission, and so do a journal target's append batch and a write-blocking mirror's target write
 * (the ring's counters, x-query-io-engine, say so).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import { join } from "node:path";
import { BlockError } from "../../src/core/errors.js";
import { FileDriver } from "../../src/block/drivers/file.js";
import { ioUringAvailable, ioUringEngine } from "../../src/block/drivers/io-engine/index.js";
import {
  URING_BACKLOG_MAX,
  URING_ENTRIES,
  type IoUringEngine,
} from "../../src/block/drivers/io-engine/io-uring.js";
import { startDaemon, stopAfter } from "../helpers/daemon.js";
import {
  assertExit,
  connectQmp,
  eventAfter,
  jobEvent,
  KiB,
  MiB,
  prng,
  qemuIo,
  seededBytes,
  testSeed,
} from "../helpers/jobs.js";
import { tempDir } from "../helpers/run.js";

const EIO = 5;
const EINTR = 4;
const EAGAIN = 11;
const ENOMEM = 12;
const EBUSY = 16;

function ring(): IoUringEngine {
  assert.ok(ioUringAvailable(), "io_uring sets up on this kernel (the engine would fall back silently)");
  return ioUringEngine();
}

function image(dir: string, name: string, bytes: number): string {
  const p = join(dir, name);
  fs.writeFileSync(p, "");
  fs.truncateSync(p, bytes);
  return p;
}

test("io_uring: more writes than the ring holds wait in the backlog, the excess past its bound runs on the threadpool, and all land", async (t) => {
  const engine = ring();
  const dir = tempDir(t, "drivetap-uring-");
  const count = 2 * URING_ENTRIES + URING_BACKLOG_MAX + 500;
  const path = image(dir, "many.img", count * 512);
  const driver = FileDriver.open(path, { engine });
  const before = engine.stats;
  try {
    await Promise.all(
      Array.from({ length: count }, (_, i) => driver.pwrite(i * 512, [Buffer.alloc(512, i & 0xff)])),
    );
  } finally {
    await driver.close();
  }
  const after = engine.stats;
  assert.ok(after.fallbacks - before.fallbacks > 0, "past the backlog bound, writes went to the threadpool");
  assert.ok(after.enters - before.enters >= 2, "the backlog was submitted as completions freed slots");
  assert.equal(after.inflight, 0);
  const got = fs.readFileSync(path);
  for (let i = 0; i < count; i++) {
    if (got[i * 512] !== (i & 0xff) || got[i * 512 + 511] !== (i & 0xff))
      assert.fail(`write ${i} is missing`);
  }
});

test("io_uring: a read past the end of the file stops there and the driver zero-fills the rest", async (t) => {
  const engine = ring();
  const dir = tempDir(t, "drivetap-uring-");
  const path = join(dir, "short.img");
  fs.writeFileSync(path, Buffer.alloc(10_000, 0x7a));
  const driver = FileDriver.open(path, { engine });
  try {
    const io = engine.open(fs.openSync(path, "r"));
    const into = Buffer.alloc(16 * KiB, 0xee);
    assert.equal(await io.read(into, 0), 10_000, "the read ends at the file's end");
    assert.equal(await io.read(Buffer.alloc(4096), 20_000), 0, "nothing past the end");
    await io.close();
    // The driver answers a read past the file's length with zeros (its advertised size is longer
    // only after a resize, here by truncating behind its back).
    const b = Buffer.alloc(16 * KiB, 0xee);
    await driver.pread(0, b);
    assert.ok(b.subarray(0, 10_000).every((x) => x === 0x7a));
    assert.ok(b.subarray(10_000).every((x) => x === 0));
  } finally {
    await driver.close();
  }
});

test("io_uring: close() waits for the operations in flight before it closes the descriptor", async (t) => {
  const engine = ring();
  const dir = tempDir(t, "drivetap-uring-");
  const path = image(dir, "close.img", MiB);
  const fd = fs.openSync(path, "r+");
  const io = engine.open(fd);
  const writes = Array.from({ length: 64 }, (_, i) =>
    io.writev([Buffer.alloc(4 * KiB, i + 1)], i * 4 * KiB, 4 * KiB),
  );
  const flushed = io.fdatasync();
  // Nothing has been submitted yet (that happens at setImmediate): close now. A descriptor closed
  // under them would fail the writes with EBADF (or, reused, send their data elsewhere).
  await io.close();
  const results = await Promise.allSettled([...writes, flushed]);
  assert.deepEqual(
    results.filter((r) => r.status === "rejected"),
    [],
    "every operation completed on the open descriptor",
  );
  assert.throws(() => fs.fstatSync(fd), /EBADF/, "the descriptor is closed");
  const got = fs.readFileSync(path);
  for (let i = 0; i < 64; i++) assert.equal(got[i * 4 * KiB], i + 1, `write ${i}`);
});

test("io_uring fault injection: random submit and completion failures fail requests with EIO or fall back; no acknowledged write is lost", async (t) => {
  const engine = ring();
  const seed = testSeed(t);
  const rnd = prng(seed);
  const dir = tempDir(t, "drivetap-uring-faults-");
  const SIZE = 4 * MiB;
  const path = image(dir, "faults.img", SIZE);
  const model = Buffer.alloc(SIZE);
  const known = new Uint8Array(SIZE / 512).fill(1);
  const driver = FileDriver.open(path, { engine });
  const submitErrnos = [EIO, EAGAIN, EBUSY, EINTR, ENOMEM];
  const before = engine.stats;
  let failed = 0;
  let acked = 0;
  engine.submitFault = () => (rnd() < 0.3 ? submitErrnos[Math.floor(rnd() * submitErrnos.length)]! : 0);
  engine.completionFault = () => (rnd() < 0.05 ? EIO : 0);
  try {
    for (let batch = 0; batch < 40; batch++) {
      // Non-overlapping 512-byte-aligned writes in a batch: their order on disk does not matter.
      const taken = new Set<number>();
      const reqs: { offset: number; data: Buffer }[] = [];
      for (let i = 0; i < 48; i++) {
        const sectors = 1 + Math.floor(rnd() * 64);
        const first = Math.floor(rnd() * (SIZE / 512 - sectors));
        let free = true;
        for (let s = first; s < first + sectors; s++) if (taken.has(s)) free = false;
        if (!free) continue;
        for (let s = first; s < first + sectors; s++) taken.add(s);
        reqs.push({ offset: first * 512, data: seededBytes(seed + batch * 100 + i, sectors * 512) });
      }
      const results = await Promise.allSettled(reqs.map((r) => driver.pwrite(r.offset, [r.data])));
      results.forEach((res, i) => {
        const r = reqs[i]!;
        const sectors = r.data.length / 512;
        if (res.status === "fulfilled") {
          acked++;
          r.data.copy(model, r.offset);
          for (let s = 0; s < sectors; s++) known[r.offset / 512 + s] = 1;
        } else {
          failed++;
          assert.ok(res.reason instanceof BlockError, `seed ${seed}: ${res.reason}`);
          assert.equal(res.reason.code, "EIO", `seed ${seed}: a failure is EIO`);
          // A failed write may or may not have reached the disk.
          for (let s = 0; s < sectors; s++) known[r.offset / 512 + s] = 0;
        }
      });
      await driver.flush().catch((err: unknown) => {
        assert.ok(err instanceof BlockError && err.code === "EIO", `seed ${seed}: flush failed with ${err}`);
      });
    }
  } finally {
    engine.submitFault = undefined;
    engine.completionFault = undefined;
    await driver.close();
  }
  const after = engine.stats;
  assert.ok(
    acked > 0 && failed > 0,
    `seed ${seed}: both outcomes happened (${acked} acked, ${failed} failed)`,
  );
  assert.ok(after.fallbacks > before.fallbacks, `seed ${seed}: refused submits fell back to the threadpool`);
  assert.ok(after.resubmits > before.resubmits, `seed ${seed}: transient refusals were resubmitted`);
  const got = fs.readFileSync(path);
  for (let s = 0; s < known.length; s++) {
    if (!known[s]) continue;
    if (!got.subarray(s * 512, (s + 1) * 512).equals(model.subarray(s * 512, (s + 1) * 512)))
      assert.fail(`seed ${seed}: acknowledged sector ${s} does not read back`);
  }
});

interface EngineInfo {
  engine: string;
  "io-uring"?: { submits: number; sqes: number; "in-flight": number; fallbacks: number };
}

test("io_uring in the daemon: a stream job's target write joins the source write's submission", async (t) => {
  const dir = tempDir(t, "drivetap-uring-stream-");
  const source = image(dir, "disk.img", 16 * MiB);
  const target = image(dir, "target.img", 16 * MiB);
  const qmpPath = join(dir, "qmp.sock");
  const daemon = await startDaemon({ image: source, args: ["--qmp", qmpPath, "--io-engine", "io_uring"] });
  stopAfter(t, daemon);
  const qmp = await connectQmp(t, qmpPath);
  const info = async (): Promise<NonNullable<EngineInfo["io-uring"]>> => {
    const r = (await qmp.execute("x-query-io-engine")) as EngineInfo;
    assert.equal(r.engine, "io_uring");
    assert.ok(r["io-uring"], "the ring is set up");
    return r["io-uring"];
  };
  // qemu-io sends one write at a time, so a submit carries what one request makes.
  const writes = (pattern: number): string[] =>
    Array.from({ length: 64 }, (_, i) => `write -P ${pattern} ${i * 64 * KiB} 4k`);
  const ratio = (a: { submits: number; sqes: number }, b: { submits: number; sqes: number }): number =>
    (b.sqes - a.sqes) / (b.submits - a.submits);

  const s0 = await info();
  assertExit("qemu-io", await qemuIo(daemon.uri, writes(0x11)));
  const s1 = await info();
  const alone = ratio(s0, s1);
  assert.ok(alone < 1.3, `without a job, about one entry per submit (${alone.toFixed(2)})`);

  await qmp.execute("blockdev-add", {
    driver: "raw",
    "node-name": "t",
    file: { driver: "file", filename: target },
  });
  const nodes = (await qmp.execute("query-named-block-nodes")) as {
    "node-name": string;
    "x-io-engine"?: string;
  }[];
  assert.ok(
    nodes.some((n) => n["x-io-engine"] === "io_uring"),
    "the target's file node shows its engine",
  );
  await qmp.execute("blockdev-backup", { "job-id": "s", device: "disk0", target: "t", sync: "stream" });
  const s2 = await info();
  assertExit("qemu-io", await qemuIo(daemon.uri, writes(0x22)));
  const s3 = await info();
  const joined = ratio(s2, s3);
  assert.ok(
    joined >= 1.8,
    `source and target write leave in one submit (${joined.toFixed(2)} entries per submit)`,
  );
  assert.equal(s3.fallbacks, 0, "nothing fell back to the threadpool");
  const mark = qmp.events.length;
  await qmp.execute("block-job-cancel", { device: "s" });
  await eventAfter(qmp, mark, jobEvent("s", "BLOCK_JOB_CANCELLED"));
  const got = fs.readFileSync(target);
  for (let i = 0; i < 64; i++) assert.equal(got[i * 64 * KiB], 0x22, `target write ${i}`);

  // A journal target's append batch joins the same submission too.
  const journal = join(dir, "j.journal");
  await qmp.execute("blockdev-add", { driver: "journal", "node-name": "j", filename: journal });
  await qmp.execute("blockdev-backup", { "job-id": "sj", device: "disk0", target: "j", sync: "stream" });
  const s4 = await info();
  assertExit("qemu-io", await qemuIo(daemon.uri, writes(0x33)));
  const s5 = await info();
  const appended = ratio(s4, s5);
  assert.ok(appended >= 1.8, `source write and journal append leave in one submit (${appended.toFixed(2)})`);
  assert.ok(fs.statSync(journal).size >= 64 * 4 * KiB, "the journal holds the writes");
  const mark2 = qmp.events.length;
  await qmp.execute("block-job-cancel", { device: "sj" });
  await eventAfter(qmp, mark2, jobEvent("sj", "BLOCK_JOB_CANCELLED"));

  // A write-blocking mirror to a file node, once READY: its target write joins as well.
  const mirrorTarget = image(dir, "mirror.img", 16 * MiB);
  await qmp.execute("blockdev-add", {
    driver: "raw",
    "node-name": "m",
    file: { driver: "file", filename: mirrorTarget },
  });
  const mark3 = qmp.events.length;
  await qmp.execute("blockdev-mirror", {
    "job-id": "mj",
    device: "disk0",
    target: "m",
    sync: "full",
    "copy-mode": "write-blocking",
  });
  await eventAfter(qmp, mark3, jobEvent("mj", "BLOCK_JOB_READY"), 60_000);
  const s6 = await info();
  assertExit("qemu-io", await qemuIo(daemon.uri, writes(0x44)));
  const s7 = await info();
  const mirrored = ratio(s6, s7);
  assert.ok(mirrored >= 1.8, `source and mirror target write leave in one submit (${mirrored.toFixed(2)})`);
  const m = fs.readFileSync(mirrorTarget);
  for (let i = 0; i < 64; i++) assert.equal(m[i * 64 * KiB], 0x44, `mirror target write ${i}`);
});
