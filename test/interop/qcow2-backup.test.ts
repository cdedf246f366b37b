/**
 * Backups and mirrors into qcow2, checked with QEMU's own tools: the push-mode incremental chain of
 * QEMU's docs/interop/bitmaps.rst (a full backup with a bitmap made in the same transaction, then
 * incrementals into overlays made by `qemu-img create -b`), sync=top of a qcow2 source with a
 * backing file, mirrors into qcow2 that pivot, and the targets an operator must not get. Every
 * image must pass `qemu-img check`, show its chain in `qemu-img info --backing-chain`, and restore
 * (`qemu-img convert -O raw`) to the source as it read when that job started. The source is only
 * written between jobs, so "as it read" is a read of the export through NBD just before the job.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, linkSync, readdirSync, readFileSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import { startDaemon, stopAfter, type RunningDaemon } from "../helpers/daemon.js";
import { assertQmpError, connectQmp, eventAfter, jobEvent } from "../helpers/jobs.js";
import { assertChecks, assertSame, qemuImgCreate, qemuIo } from "../helpers/qcow2.js";
import { pasteIntoShell, readmeSection } from "../helpers/readme.js";
import { runOk, tempDir } from "../helpers/run.js";
import type { QmpClient } from "../../src/qmp/client.js";

type BlockdevOptions = Record<string, unknown>;

const KiB = 1024;
const MiB = 1024 * KiB;
const DISK = 16 * MiB;
const CLUSTER = 64 * KiB;

/** One guest request; `qemuIoCommand` spells it for qemu-io. */
interface Op {
  readonly kind: "write" | "zero" | "discard";
  readonly offset: number;
  readonly length: number;
  readonly pattern?: number;
}

function qemuIoCommand(op: Op): string {
  if (op.kind === "write") return `write -P 0x${op.pattern!.toString(16)} ${op.offset} ${op.length}`;
  if (op.kind === "zero") return `write -z ${op.offset} ${op.length}`;
  return `discard ${op.offset} ${op.length}`;
}

/** The 64 KiB clusters the ops touch, as [start, end) byte ranges merged: what an incremental copies. */
function touchedClusters(ops: readonly Op[]): Array<[number, number]> {
  const ranges = ops
    .map((o): [number, number] => [
      Math.floor(o.offset / CLUSTER) * CLUSTER,
      Math.ceil((o.offset + o.length) / CLUSTER) * CLUSTER,
    ])
    .sort((a, b) => a[0] - b[0]);
  const out: Array<[number, number]> = [];
  for (const r of ranges) {
    const last = out[out.length - 1];
    if (last && r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
    else out.push([...r]);
  }
  return out;
}

/** Before the full backup: data with a hole between. */
const BEFORE_FULL: Op[] = [
  { kind: "write", offset: 0, length: 8 * MiB, pattern: 0x11 },
  { kind: "write", offset: 10 * MiB, length: MiB, pattern: 0x12 },
];
/** Between full and inc1: new data, a partial cluster, zeroes and a discard over data, data in a hole. */
const BEFORE_INC1: Op[] = [
  { kind: "write", offset: MiB, length: 64 * KiB, pattern: 0x21 },
  { kind: "write", offset: 2 * MiB + 100, length: 3000, pattern: 0x22 },
  { kind: "zero", offset: 4 * MiB, length: 256 * KiB },
  { kind: "discard", offset: 6 * MiB, length: 128 * KiB },
  { kind: "write", offset: 12 * MiB, length: 64 * KiB, pattern: 0x23 },
];
/** Between inc1 and inc2: zeroes over inc1's data, data over inc1's zeroes, a discard of full's data. */
const BEFORE_INC2: Op[] = [
  { kind: "zero", offset: MiB, length: 64 * KiB },
  { kind: "write", offset: 4 * MiB, length: 64 * KiB, pattern: 0x31 },
  { kind: "discard", offset: 10 * MiB, length: MiB },
  { kind: "write", offset: 15 * MiB, length: 4 * KiB, pattern: 0x32 },
];

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  zero: boolean;
  data: boolean;
}

async function imageMap(image: string): Promise<MapEntry[]> {
  return JSON.parse((await runOk("qemu-img", ["map", "--output=json", image])).stdout) as MapEntry[];
}

/** The byte ranges the top image itself allocates (data or zero clusters), merged. */
function topAllocated(map: readonly MapEntry[]): Array<[number, number]> {
  const out: Array<[number, number]> = [];
  for (const e of map) {
    if (e.depth !== 0 || (!e.data && !e.zero)) continue;
    // depth 0 without data and with zero is also what an image without backing reports for
    // unallocated space; callers only use this on overlays, where unallocated is depth 1.
    const last = out[out.length - 1];
    if (last && last[1] === e.start) last[1] += e.length;
    else out.push([e.start, e.start + e.length]);
  }
  return out;
}

/** The chain `qemu-img info --backing-chain` reports, top first, by file name. */
async function backingChain(image: string): Promise<string[]> {
  const infos = JSON.parse(
    (await runOk("qemu-img", ["info", "--backing-chain", "--output=json", image])).stdout,
  ) as Array<{ filename: string; format: string }>;
  for (const i of infos) assert.equal(i.format, "qcow2", `${i.filename} is qcow2`);
  return infos.map((i) => i.filename);
}

function sha(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

/** Restores `image` (with its chain) to raw and asserts it equals `expected` byte for byte. */
async function assertRestores(image: string, expected: string): Promise<void> {
  const restored = `${image}.restore.raw`;
  await runOk("qemu-img", ["convert", "-O", "raw", image, restored]);
  assert.ok(readFileSync(restored).equals(readFileSync(expected)), `restore of ${image} == ${expected}`);
}

/** The source as it reads now, through the export (nothing writes it while a test takes this). */
async function snapshotExport(daemon: RunningDaemon, path: string): Promise<string> {
  await runOk("qemu-img", ["convert", "-f", "raw", "-O", "raw", daemon.uri, path]);
  return path;
}

/** Runs a job command and waits for its BLOCK_JOB_COMPLETED without error. */
async function runJob(qmp: QmpClient, id: string, command: string, args: Record<string, unknown>) {
  const mark = qmp.events.length;
  await qmp.execute(command, { "job-id": id, ...args });
  const done = await eventAfter(qmp, mark, jobEvent(id, "BLOCK_JOB_COMPLETED"), 60_000);
  assert.equal(done.data.error, undefined, `job ${id}: ${String(done.data.error)}`);
}

async function serveWithQmp(
  t: TestContext,
  image: string,
): Promise<{ daemon: RunningDaemon; qmp: QmpClient }> {
  const qmpPath = join(tempDir(t, "drivetap-qmp-"), "qmp.sock");
  const daemon = await startDaemon({ image, args: ["--qmp", qmpPath] });
  stopAfter(t, daemon);
  return { daemon, qmp: await connectQmp(t, qmpPath) };
}

/** A raw source with BEFORE_FULL written, and the model: a raw file that gets the same writes. */
async function rawSource(t: TestContext) {
  const dir = tempDir(t, "drivetap-qcow2-backup-");
  const image = join(dir, "disk.img");
  const model = join(dir, "model.raw");
  await qemuImgCreate(image, DISK, { format: "raw" });
  await qemuImgCreate(model, DISK, { format: "raw" });
  const { daemon, qmp } = await serveWithQmp(t, image);
  const apply = async (ops: readonly Op[]): Promise<void> => {
    await qemuIo(daemon.uri, "raw", ops.map(qemuIoCommand));
    await qemuIo(model, "raw", ops.map(qemuIoCommand));
  };
  await apply(BEFORE_FULL);
  return { dir, daemon, qmp, apply, model };
}

/** Asserts that an incremental overlay holds exactly the clusters `ops` touched, and nothing else. */
async function assertHoldsOnly(overlay: string, ops: readonly Op[]): Promise<void> {
  assert.deepEqual(topAllocated(await imageMap(overlay)), touchedClusters(ops), `${overlay} allocation`);
}

/** Asserts a zeroed range of `overlay` is a zero cluster of the overlay itself, not a fall-through. */
async function assertZeroInTop(overlay: string, offset: number, length: number): Promise<void> {
  const map = await imageMap(overlay);
  const covering = map.filter((e) => e.start < offset + length && e.start + e.length > offset);
  assert.ok(covering.length > 0);
  for (const e of covering) {
    assert.equal(e.depth, 0, `${overlay} [${e.start}, +${e.length}) is in the overlay`);
    assert.equal(e.zero, true, `${overlay} [${e.start}, +${e.length}) reads zeros`);
    assert.equal(e.data, false, `${overlay} [${e.start}, +${e.length}) is a zero cluster`);
  }
}

/** One backup of a chain: its image and what the source read when its job started. */
interface Backup {
  readonly image: string;
  readonly state: string;
}

type Source = Awaited<ReturnType<typeof rawSource>>;

/**
 * The full backup of `source` into full.qcow2 by `backup`, with bitmap B recording from the same
 * point (made before or in the same transaction by `backup`).
 */
async function takeFull(source: Source, backup: (target: string) => Promise<void>): Promise<Backup[]> {
  const image = join(source.dir, "full.qcow2");
  const state = await snapshotExport(source.daemon, join(source.dir, "state0.raw"));
  await assertSame(state, source.model);
  await backup(image);
  await assertChecks(image);
  assert.deepEqual(await backingChain(image), [image]);
  await assertRestores(image, state);
  return [{ image, state }];
}

/**
 * The guest's `ops`, then an incremental into `name`, an overlay of the chain's last image made by
 * qemu-img, taken by `backup`. Afterwards every image of the chain checks clean and restores to its
 * own point in time, the overlay holds exactly the clusters `ops` touched, and each of `zeros` is a
 * zero cluster of the overlay (the image below holds data there).
 */
async function takeIncremental(
  source: Source,
  chain: Backup[],
  name: string,
  ops: readonly Op[],
  zeros: ReadonlyArray<[number, number]>,
  backup: (overlay: string) => Promise<void>,
): Promise<void> {
  await source.apply(ops);
  const state = await snapshotExport(source.daemon, join(source.dir, `${name}.state.raw`));
  await assertSame(state, source.model);
  const image = join(source.dir, `${name}.qcow2`);
  await qemuImgCreate(image, undefined, { backing: chain[chain.length - 1].image, backingFormat: "qcow2" });
  await backup(image);
  chain.push({ image, state });
  for (const b of chain) await assertChecks(b.image);
  assert.deepEqual(await backingChain(image), chain.map((b) => b.image).reverse());
  for (const b of chain) await assertRestores(b.image, b.state);
  await assertHoldsOnly(image, ops);
  for (const [offset, length] of zeros) await assertZeroInTop(image, offset, length);
}

/** Zeroed ranges of BEFORE_INC1 and BEFORE_INC2 over data of the image below. */
const INC1_ZEROS: Array<[number, number]> = [
  [4 * MiB, 256 * KiB],
  [6 * MiB, 128 * KiB],
];
const INC2_ZEROS: Array<[number, number]> = [
  [MiB, 64 * KiB],
  [10 * MiB, MiB],
];

test("incremental chain (drive-backup): full.qcow2 with a bitmap from the same transaction, then inc1 and inc2 made by qemu-img create -b; each restores to its point in time, unchanged clusters stay unallocated, zeroed ones are zero clusters", async (t) => {
  const source = await rawSource(t);
  const { qmp } = source;
  const chain = await takeFull(source, async (target) => {
    const mark = qmp.events.length;
    await qmp.execute("transaction", {
      actions: [
        { type: "block-dirty-bitmap-add", data: { node: "disk0", name: "B" } },
        {
          type: "drive-backup",
          data: { "job-id": "full", device: "disk0", target, sync: "full", format: "qcow2" },
        },
      ],
    });
    const done = await eventAfter(qmp, mark, jobEvent("full", "BLOCK_JOB_COMPLETED"), 60_000);
    assert.equal(done.data.error, undefined);
  });
  const incremental = (format?: string) => (target: string) =>
    runJob(qmp, "inc", "drive-backup", {
      device: "disk0",
      target,
      sync: "incremental",
      bitmap: "B",
      mode: "existing",
      ...(format === undefined ? {} : { format }),
    });
  await takeIncremental(source, chain, "inc1", BEFORE_INC1, INC1_ZEROS, incremental("qcow2"));
  // No format: an existing target is probed, as QEMU does.
  await takeIncremental(source, chain, "inc2", BEFORE_INC2, INC2_ZEROS, incremental());
  assert.ok(source.daemon.alive());
});

test("incremental chain (blockdev-backup): into qcow2 nodes added with blockdev-add, backing set to the previous backup's node, then left to the header's chain", async (t) => {
  const source = await rawSource(t);
  const { qmp } = source;
  const chain = await takeFull(source, async (target) => {
    await qmp.execute("block-dirty-bitmap-add", { node: "disk0", name: "B" });
    await runJob(qmp, "full", "drive-backup", { device: "disk0", target, sync: "full", format: "qcow2" });
  });
  /** blockdev-add the overlay (with `backing` as given), back up into it, blockdev-del what was added. */
  const intoNode = (backing?: BlockdevOptions) => async (overlay: string) => {
    const added = ["inc"];
    if (backing?.["node-name"] !== undefined) {
      await qmp.execute("blockdev-add", backing);
      added.push(String(backing["node-name"]));
    }
    await qmp.execute("blockdev-add", {
      driver: "qcow2",
      "node-name": "inc",
      file: { driver: "file", filename: overlay },
      ...(backing === undefined ? {} : { backing: backing["node-name"] }),
    });
    await runJob(qmp, "b", "blockdev-backup", {
      device: "disk0",
      target: "inc",
      sync: "incremental",
      bitmap: "B",
    });
    for (const name of added) await qmp.execute("blockdev-del", { "node-name": name });
  };
  const previous = {
    driver: "qcow2",
    "node-name": "prev",
    "read-only": true,
    file: { driver: "file", filename: chain[0].image },
  };
  await takeIncremental(source, chain, "inc1", BEFORE_INC1, INC1_ZEROS, intoNode(previous));
  await takeIncremental(source, chain, "inc2", BEFORE_INC2, INC2_ZEROS, intoNode());
});

test("sync=none into qcow2: the target names the source as its backing file (QEMU's layout) and holds the old data of exactly the clusters overwritten; over the source it reads the point in time", async (t) => {
  const source = await rawSource(t);
  const { dir, daemon, qmp, apply } = source;
  const state = await snapshotExport(daemon, join(dir, "state0.raw"));
  const target = join(dir, "none.qcow2");
  await qmp.execute("drive-backup", {
    "job-id": "n",
    device: "disk0",
    target,
    sync: "none",
    format: "qcow2",
  });
  await apply(BEFORE_INC1);
  const mark = qmp.events.length;
  await qmp.execute("block-job-cancel", { device: "n" });
  await eventAfter(qmp, mark, jobEvent("n", "BLOCK_JOB_CANCELLED"), 60_000);
  await assertChecks(target);
  const info = JSON.parse((await runOk("qemu-img", ["info", "--output=json", target])).stdout) as {
    "backing-filename"?: string;
    "backing-filename-format"?: string;
  };
  assert.equal(info["backing-filename"], join(dir, "disk.img"));
  assert.equal(info["backing-filename-format"], "raw");
  await assertHoldsOnly(target, BEFORE_INC1);
  // The daemon still serves the source (writable, not shared): read it as qemu-img -U would.
  const restored = join(dir, "restored.raw");
  await runOk("qemu-img", ["convert", "-U", "-O", "raw", target, restored]);
  assert.ok(readFileSync(restored).equals(readFileSync(state)), "target over the source == the start");
});

/** A qcow2 source over a qcow2 base that holds data: base.qcow2 <- disk.qcow2, served. */
async function qcow2Source(t: TestContext) {
  const dir = tempDir(t, "drivetap-qcow2-top-");
  const base = join(dir, "base.qcow2");
  const image = join(dir, "disk.qcow2");
  await qemuImgCreate(base, DISK);
  await qemuIo(base, "qcow2", ["write -P 0x41 0 8M"]);
  await qemuImgCreate(image, undefined, { backing: base, backingFormat: "qcow2" });
  const { daemon, qmp } = await serveWithQmp(t, image);
  return { dir, base, image, daemon, qmp };
}

/** Top-layer writes over the base: data, a zero cluster and a discard over base data, data in a hole. */
const TOP_OPS: Op[] = [
  { kind: "write", offset: MiB, length: 64 * KiB, pattern: 0x51 },
  { kind: "zero", offset: 2 * MiB, length: 128 * KiB },
  { kind: "discard", offset: 3 * MiB, length: 64 * KiB },
  { kind: "write", offset: 9 * MiB, length: 4 * KiB, pattern: 0x52 },
];

test("sync=top into qcow2: a qcow2 source with a backing file gives a target over the same backing file holding only the top layer, zero clusters included", async (t) => {
  const { dir, base, image, daemon, qmp } = await qcow2Source(t);
  await qemuIo(daemon.uri, "raw", TOP_OPS.map(qemuIoCommand));
  const state = await snapshotExport(daemon, join(dir, "state.raw"));
  const top = join(dir, "top.qcow2");
  // No format: a new target takes the source's (qcow2).
  await runJob(qmp, "top", "drive-backup", { device: "disk0", target: top, sync: "top" });
  await assertChecks(top);
  assert.deepEqual(await backingChain(top), [top, base]);
  await assertRestores(top, state);
  await assertHoldsOnly(top, TOP_OPS);
  await assertZeroInTop(top, 2 * MiB, 128 * KiB);
  await assertZeroInTop(top, 3 * MiB, 64 * KiB);

  // A mirror with sync=top makes the same target and, once pivoted, serves the same chain.
  const mtop = join(dir, "mtop.qcow2");
  const mark = qmp.events.length;
  await qmp.execute("drive-mirror", {
    "job-id": "m",
    device: "disk0",
    target: mtop,
    sync: "top",
    format: "qcow2",
  });
  await eventAfter(qmp, mark, jobEvent("m", "BLOCK_JOB_READY"), 60_000);
  await qmp.execute("block-job-complete", { device: "m" });
  const done = await eventAfter(qmp, mark, jobEvent("m", "BLOCK_JOB_COMPLETED"), 60_000);
  assert.equal(done.data.error, undefined);
  await qemuIo(daemon.uri, "raw", ["write -P 0x53 5M 4k"]);
  const after = await snapshotExport(daemon, join(dir, "after.raw"));
  assert.equal(await daemon.stop(), 0);
  await assertChecks(mtop);
  assert.deepEqual(await backingChain(mtop), [mtop, base]);
  await assertRestores(mtop, after);
  // The old source was left as it was: its own content plus nothing of the post-pivot write.
  await assertRestores(image, state);
});

test("mirror into qcow2: drive-mirror format=qcow2 pivots onto a qcow2 equal to the source, and blockdev-mirror into a qcow2 node made by qemu-img ends equal too", async (t) => {
  const { dir, daemon, qmp, apply, model } = await rawSource(t);
  // blockdev-mirror into a qcow2 node, soft-cancelled when in sync (the target stays a copy).
  const node = join(dir, "node.qcow2");
  await qemuImgCreate(node, DISK);
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "t",
    file: { driver: "file", filename: node },
  });
  let mark = qmp.events.length;
  await qmp.execute("blockdev-mirror", { "job-id": "bm", device: "disk0", target: "t", sync: "full" });
  await eventAfter(qmp, mark, jobEvent("bm", "BLOCK_JOB_READY"), 60_000);
  await apply(BEFORE_INC1);
  await qmp.execute("block-job-cancel", { device: "bm" });
  await eventAfter(qmp, mark, jobEvent("bm", "BLOCK_JOB_COMPLETED"), 60_000);
  await qmp.execute("blockdev-del", { "node-name": "t" });
  await assertChecks(node);
  await assertSame(node, model);

  const mirror = join(dir, "mirror.qcow2");
  mark = qmp.events.length;
  await qmp.execute("drive-mirror", {
    "job-id": "m",
    device: "disk0",
    target: mirror,
    sync: "full",
    format: "qcow2",
  });
  await eventAfter(qmp, mark, jobEvent("m", "BLOCK_JOB_READY"), 60_000);
  // Writes while in sync reach both sides; after the pivot they reach only the qcow2.
  await apply(BEFORE_INC2);
  await qmp.execute("block-job-complete", { device: "m" });
  const done = await eventAfter(qmp, mark, jobEvent("m", "BLOCK_JOB_COMPLETED"), 60_000);
  assert.equal(done.data.error, undefined);
  await apply([{ kind: "write", offset: 7 * MiB, length: 100 * KiB, pattern: 0x61 }]);
  assert.equal(await daemon.stop(), 0);
  await assertChecks(mirror);
  assert.deepEqual(await backingChain(mirror), [mirror]);
  await assertSame(mirror, model);
});

test("qcow2 targets an operator must not get: a raw file as qcow2, the source's own backing file, an overlay whose backing file is gone, a raw sync=top target of a chain, a sync=none qcow2 mirror; nothing is changed or left behind and the daemon serves on", async (t) => {
  const { dir, base, daemon, qmp } = await qcow2Source(t);
  const raw = join(dir, "other.raw");
  await qemuImgCreate(raw, DISK, { format: "raw" });
  await qemuIo(raw, "raw", ["write -P 0x77 0 64k"]);
  const rawSha = sha(raw);
  const baseSha = sha(base);

  await assertQmpError(
    qmp.execute("drive-backup", {
      device: "disk0",
      target: raw,
      sync: "full",
      mode: "existing",
      format: "qcow2",
    }),
    "GenericError",
    "Image is not in qcow2 format",
  );
  assert.equal(sha(raw), rawSha, "the raw file is untouched");

  for (const mode of ["existing", "absolute-paths"]) {
    await assertQmpError(
      qmp.execute("drive-backup", { device: "disk0", target: base, sync: "full", mode, format: "qcow2" }),
      "GenericError",
      `'${base}' is a backing file of node 'disk0' and cannot be a backup or mirror target`,
    );
    await assertQmpError(
      qmp.execute("drive-mirror", { device: "disk0", target: base, sync: "full", mode }),
      "GenericError",
      `'${base}' is a backing file of node 'disk0' and cannot be a backup or mirror target`,
    );
  }
  // The same file under other names: a symlink and a hard link are the backing file too.
  const viaSymlink = join(dir, "alias-symlink.qcow2");
  const viaHardLink = join(dir, "alias-hardlink.qcow2");
  symlinkSync(base, viaSymlink);
  linkSync(base, viaHardLink);
  for (const alias of [viaSymlink, viaHardLink]) {
    await assertQmpError(
      qmp.execute("drive-backup", { device: "disk0", target: alias, sync: "full", format: "qcow2" }),
      "GenericError",
      `'${alias}' is a backing file of node 'disk0' and cannot be a backup or mirror target`,
    );
  }
  assert.equal(sha(base), baseSha, "the backing file is untouched");

  const orphan = join(dir, "orphan.qcow2");
  const gone = join(dir, "gone.qcow2");
  await runOk("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-u",
    "-b",
    gone,
    "-F",
    "qcow2",
    orphan,
    String(DISK),
  ]);
  const orphanSha = sha(orphan);
  await assertQmpError(
    qmp.execute("drive-backup", { device: "disk0", target: orphan, sync: "full", mode: "existing" }),
    "GenericError",
    `Could not open backing file: Could not open '${gone}': No such file or directory`,
  );
  assert.equal(sha(orphan), orphanSha, "the overlay is untouched");
  assert.equal(existsSync(gone), false, "no backing file was made up");

  const before = readdirSync(dir).sort();
  await assertQmpError(
    qmp.execute("drive-backup", {
      device: "disk0",
      target: join(dir, "top.raw"),
      sync: "top",
      format: "raw",
    }),
    "GenericError",
    "Backing file not supported for file format 'raw'",
  );
  await assertQmpError(
    qmp.execute("drive-mirror", { device: "disk0", target: join(dir, "none.qcow2"), sync: "none" }),
    "GenericError",
    "drive-mirror sync=none into a qcow2 target is not supported",
  );
  assert.deepEqual(readdirSync(dir).sort(), before, "nothing was created");
  assert.deepEqual(await qmp.execute("query-block-jobs"), []);
  // The daemon still serves, and what it serves is unchanged.
  await qemuIo(daemon.uri, "raw", ["read -P 0x41 0 64k"], true);
});

test("the README's incremental-backups-into-qcow2 example, pasted into a shell, makes a chain of three that restores to the disk", async (t) => {
  const script = readmeSection("## Incremental backups into qcow2");
  assert.ok(script.includes("--sync incremental --bitmap b0 --mode existing"));
  const { dir, out, r } = await pasteIntoShell(t, script);
  assert.equal(r.code, 0, `the pasted example\n${out}\n${r.stderr}`);
  const images = out
    .split("\n")
    .filter((l) => l.startsWith("image: "))
    .map((l) => l.slice("image: ".length).trim());
  assert.deepEqual(
    images,
    ["inc2.qcow2", "inc1.qcow2", "full.qcow2"].map((f) => join(dir, f)),
    out,
  );
  assert.match(out, /No errors were found on the image\./);
  assert.match(out, /Images are identical\./);
  // Each incremental holds only its own clusters: inc1 the 64 KiB write and the 1 MiB of zeros.
  assert.deepEqual(topAllocated(await imageMap(join(dir, "inc1.qcow2"))), [
    [MiB, MiB + 64 * KiB],
    [4 * MiB, 5 * MiB],
  ]);
  assert.deepEqual(topAllocated(await imageMap(join(dir, "inc2.qcow2"))), [[0, MiB]]);
});
