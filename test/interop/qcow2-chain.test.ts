/**
 * Backing-chain jobs with real clients: blockdev-snapshot, block-stream and block-commit on a served
 * disk while qemu-io writes to it over NBD. What the guest saw is compared with a raw model built by
 * the same qemu-io commands; `qemu-img check`, `info` and `map` look at every image afterwards. The
 * QMP errors are one session run against qemu-storage-daemon 7.2 and drivetap's storage-daemon.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { copyFileSync, readFileSync } from "node:fs";
import { join } from "node:path";
import type { QmpClient } from "../../src/qmp/client.js";
import { startDaemon, stopAfter } from "../helpers/daemon.js";
import {
  connectQmp,
  eventAfter,
  jobEvent,
  jobEventLog,
  prng,
  statusEvent,
  testSeed,
} from "../helpers/jobs.js";
import { assertChecks, qemuImgCreate, qemuIo } from "../helpers/qcow2.js";
import { DRIVETAP_STORAGE_DAEMON, outcome, startQsd } from "../helpers/qsd.js";
import { run, runOk, start, tempDir } from "../helpers/run.js";

type T = Parameters<typeof tempDir>[0];
const MiB = 1024 * 1024;
const DISK_BYTES = 16 * MiB;
/** The part of the disk the upper layers and the guest write in chain tests. */
const UPPER_BYTES = 12 * MiB;

/** Sequential writes (each done before the next: the order is the model's), a pattern each. */
function writePlan(rnd: () => number, regionOffset: number, regionBytes: number, count: number): string[] {
  const out: string[] = [];
  for (let i = 0; i < count; i++) {
    const sectors = 1 + Math.floor(rnd() * 128);
    const start = Math.floor(rnd() * (regionBytes / 512 - sectors));
    out.push(
      `write -P 0x${(1 + Math.floor(rnd() * 254)).toString(16)} ${regionOffset + start * 512} ${sectors * 512}`,
    );
  }
  return out;
}

/** qemu-io over NBD, started (not awaited): tests act while it writes. */
function qemuIoNbd(uri: string, commands: readonly string[]) {
  const args = ["-f", "raw", uri];
  for (const c of commands) args.push("-c", c);
  return start("qemu-io", args);
}

function sha(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

async function imageInfo(path: string): Promise<Record<string, unknown>> {
  return JSON.parse((await runOk("qemu-img", ["info", "-U", "--output=json", path])).stdout) as Record<
    string,
    unknown
  >;
}

interface MapEntry {
  start: number;
  length: number;
  depth: number;
  data: boolean;
  zero: boolean;
}

async function imageMap(path: string): Promise<MapEntry[]> {
  return JSON.parse((await runOk("qemu-img", ["map", "-U", "--output=json", path])).stdout) as MapEntry[];
}

/** Whether [offset, offset + length) is all data in the top image itself (depth 0). */
function allocatedOnTop(map: readonly MapEntry[], offset: number, length: number): boolean {
  return map
    .filter((e) => e.start < offset + length && e.start + e.length > offset)
    .every((e) => e.depth === 0 && e.data);
}

/** The served disk read whole through NBD equals the model. */
async function assertServes(uri: string, model: string): Promise<void> {
  const r = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", uri, model]);
  assert.equal(r.code, 0, `export differs from the model: ${r.stdout}${r.stderr}`);
}

/** A raw base with data everywhere the tests look, served by `drivetap serve` with QMP. */
async function servedBase(t: T, seed: number) {
  const dir = tempDir(t, "drivetap-chain-");
  const base = join(dir, "base.raw");
  const model = join(dir, "model.raw");
  await qemuImgCreate(base, DISK_BYTES, { format: "raw" });
  await qemuIo(base, "raw", writePlan(prng(seed), 0, DISK_BYTES, 200));
  copyFileSync(base, model);
  const qmpPath = join(dir, "qmp.sock");
  const daemon = await startDaemon({ image: base, args: ["--qmp", qmpPath] });
  stopAfter(t, daemon);
  const qmp = await connectQmp(t, qmpPath);
  return { dir, base, model, daemon, qmp, uri: daemon.uri };
}

async function addQcow2(qmp: QmpClient, name: string, file: string, backing?: string | null): Promise<void> {
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": name,
    file: { driver: "file", filename: file },
    ...(backing === undefined ? {} : { backing }),
  });
}

test("blockdev-snapshot under writes: new writes land in the overlay, the base stays as it was", async (t) => {
  const seed = testSeed(t);
  const rnd = prng(seed + 1);
  const s = await servedBase(t, seed);
  const overlay = join(s.dir, "overlay.qcow2");
  await qemuImgCreate(overlay, DISK_BYTES);
  await addQcow2(s.qmp, "ov", overlay, null);

  const during = writePlan(rnd, 0, 8 * MiB, 3000);
  const writer = qemuIoNbd(s.uri, during);
  await writer.waitForStdout(/^wrote /m);
  await s.qmp.execute("blockdev-snapshot", { node: "disk0", overlay: "ov" });
  const baseAtSnapshot = sha(s.base);
  assert.equal(writer.proc.exitCode, null, "the snapshot was taken while qemu-io was still writing");
  const r = await writer.result;
  assert.equal(r.code, 0, r.stderr);
  assert.doesNotMatch(r.stdout, /failed|error/i);

  // Writes after the snapshot: only the overlay has them.
  const after = [`write -P 0xc1 ${10 * MiB} 1M`, `write -P 0xc2 ${12 * MiB + 4096} 70000`];
  const r2 = await qemuIoNbd(s.uri, after).result;
  assert.equal(r2.code, 0, r2.stderr);
  await qemuIo(s.model, "raw", [...during, ...after]);
  await assertServes(s.uri, s.model);
  const map = await imageMap(overlay);
  assert.ok(allocatedOnTop(map, 10 * MiB, 1 * MiB), `overlay map: ${JSON.stringify(map)}`);
  assert.ok(allocatedOnTop(map, 12 * MiB + 4096, 70000));
  assert.equal(sha(s.base), baseAtSnapshot, "the base does not change after the snapshot");

  assert.equal(await s.daemon.stop(), 0);
  assert.equal(sha(s.base), baseAtSnapshot);
  const info = await imageInfo(overlay);
  assert.equal(info["backing-filename"], s.base);
  assert.equal(info["backing-filename-format"], "raw");
  await assertChecks(overlay);
  const cmp = await run("qemu-img", ["compare", "-F", "raw", overlay, s.model]);
  assert.equal(cmp.code, 0, `the overlay and its header's chain read as the guest wrote: ${cmp.stdout}`);
});

/** Runs the same QMP session against qemu-storage-daemon and drivetap's, each in its own directory. */
async function compareSessions(
  t: T,
  prepare: (dir: string) => Promise<void>,
  session: (dir: string) => Array<[string, Record<string, unknown>]>,
): Promise<void> {
  const outcomes: unknown[][] = [];
  for (const command of [undefined, DRIVETAP_STORAGE_DAEMON]) {
    const { qmp, dir } = await startQsd(t, [], command);
    await prepare(dir);
    const got: unknown[] = [];
    for (const [name, args] of session(dir)) {
      got.push([name, JSON.parse(JSON.stringify(await outcome(qmp, name, args)).replaceAll(dir, "DIR"))]);
    }
    outcomes.push(got);
  }
  const differing = outcomes[0].flatMap((o, i) =>
    JSON.stringify(o) === JSON.stringify(outcomes[1][i])
      ? []
      : [`#${i}: QSD ${JSON.stringify(o)}, drivetap ${JSON.stringify(outcomes[1][i])}`],
  );
  assert.deepEqual(differing, []);
}

test("blockdev-snapshot's errors are qemu-storage-daemon's", async (t) => {
  await compareSessions(
    t,
    async (dir) => {
      await qemuImgCreate(join(dir, "base.raw"), "4M", { format: "raw" });
      await qemuImgCreate(join(dir, "ov.qcow2"), "4M");
      await qemuImgCreate(join(dir, "ov8.qcow2"), "8M");
      await qemuImgCreate(join(dir, "nob.qcow2"), "4M");
      // Its backing is another file: drivetap's writable nodes do not share "write" with a reader.
      await qemuImgCreate(join(dir, "other.raw"), "4M", { format: "raw" });
      await qemuImgCreate(join(dir, "ovb.qcow2"), "4M", {
        backing: join(dir, "other.raw"),
        backingFormat: "raw",
      });
    },
    (dir) => {
      const file = (name: string) => ({ driver: "file", filename: join(dir, name) });
      return [
        ["blockdev-add", { driver: "raw", "node-name": "base", file: file("base.raw") }],
        ["blockdev-add", { driver: "qcow2", "node-name": "ov", backing: null, file: file("ov.qcow2") }],
        ["blockdev-add", { driver: "qcow2", "node-name": "ov8", backing: null, file: file("ov8.qcow2") }],
        ["blockdev-add", { driver: "qcow2", "node-name": "nob", backing: null, file: file("nob.qcow2") }],
        ["blockdev-add", { driver: "qcow2", "node-name": "ovb", file: file("ovb.qcow2") }],
        ["blockdev-snapshot", { node: "nope", overlay: "ov" }],
        ["blockdev-snapshot", { node: "base", overlay: "nope" }],
        ["blockdev-snapshot", { node: "base", overlay: "ovb" }],
        ["blockdev-snapshot", { node: "base", overlay: "base" }],
        ["blockdev-snapshot", { node: "base" }],
        ["blockdev-snapshot", { node: "base", overlay: "ov", extra: 1 }],
        // QEMU takes an overlay of another size (reads past the base's end read zeros).
        ["blockdev-snapshot", { node: "base", overlay: "ov8" }],
        ["blockdev-snapshot", { node: "base", overlay: "ov" }],
        ["blockdev-snapshot", { node: "ov8", overlay: "nob" }],
        ["blockdev-snapshot", { node: "nob", overlay: "ov8" }],
      ];
    },
  );
});

/**
 * base.raw <- mid.qcow2 <- top.qcow2, each holding data of its own, and a raw model of what top reads;
 * top is served by `drivetap serve` (its chain opened from the headers) with QMP.
 */
async function servedChain(t: T, seed: number) {
  const dir = tempDir(t, "drivetap-chain-");
  const base = join(dir, "base.raw");
  const mid = join(dir, "mid.qcow2");
  const top = join(dir, "top.qcow2");
  const model = join(dir, "model.raw");
  const rnd = prng(seed);
  await qemuImgCreate(base, DISK_BYTES, { format: "raw" });
  await qemuImgCreate(mid, DISK_BYTES, { backing: base, backingFormat: "raw" });
  await qemuImgCreate(top, DISK_BYTES, { backing: mid, backingFormat: "qcow2" });
  const layers: Array<[string, string, string[]]> = [
    [base, "raw", writePlan(rnd, 0, DISK_BYTES, 150)],
    // The last quarter is base's alone: a stream down to base must leave it there.
    [mid, "qcow2", writePlan(rnd, 0, UPPER_BYTES, 150)],
    [top, "qcow2", writePlan(rnd, 0, UPPER_BYTES, 50)],
  ];
  await qemuImgCreate(model, DISK_BYTES, { format: "raw" });
  for (const [image, format, plan] of layers) {
    await qemuIo(image, format, plan);
    await qemuIo(model, "raw", plan);
  }
  const qmpPath = join(dir, "qmp.sock");
  const daemon = await startDaemon({ image: top, args: ["--qmp", qmpPath] });
  stopAfter(t, daemon);
  const qmp = await connectQmp(t, qmpPath);
  return { dir, base, mid, top, model, daemon, qmp, uri: daemon.uri };
}

/** Writes while `act` runs: `act` is started once qemu-io has written, and must return before it ends. */
async function whileWriting(uri: string, plan: readonly string[], act: () => Promise<void>): Promise<void> {
  const writer = qemuIoNbd(uri, plan);
  await writer.waitForStdout(/^wrote /m);
  await act();
  assert.equal(writer.proc.exitCode, null, "qemu-io was still writing when the command returned");
  const r = await writer.result;
  assert.equal(r.code, 0, r.stderr);
  assert.doesNotMatch(r.stdout, /failed|error/i);
}

test("block-stream of the whole chain under writes: top keeps the guest's writes and has no backing", async (t) => {
  const seed = testSeed(t);
  const s = await servedChain(t, seed);
  const baseSha = sha(s.base);
  const during = writePlan(prng(seed + 7), 0, UPPER_BYTES, 2500);
  const mark = s.qmp.events.length;
  await whileWriting(s.uri, during, async () => {
    // Paced, so the copy and the guest's writes overlap for a while.
    await s.qmp.execute("block-stream", { "job-id": "s0", device: "disk0", speed: 8 * MiB });
    await s.qmp.execute("block-job-pause", { device: "s0" });
    await eventAfter(s.qmp, mark, statusEvent("s0", "paused"));
    await s.qmp.execute("block-job-resume", { device: "s0" });
  });
  const done = await eventAfter(s.qmp, mark, jobEvent("s0", "BLOCK_JOB_COMPLETED"));
  assert.equal(done.data.error, undefined);
  assert.equal(done.data.type, "stream");
  assert.equal(done.data.offset, DISK_BYTES);
  await eventAfter(s.qmp, mark, statusEvent("s0", "null"));
  assert.deepEqual(jobEventLog(s.qmp, "s0"), [
    "created",
    "running",
    "paused",
    "running",
    "waiting",
    "pending",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
  ]);
  await qemuIo(s.model, "raw", during);
  await assertServes(s.uri, s.model);
  assert.equal(await s.daemon.stop(), 0);
  const info = await imageInfo(s.top);
  assert.equal(info["backing-filename"], undefined, `top has no backing: ${JSON.stringify(info)}`);
  await assertChecks(s.top);
  await assertChecks(s.mid);
  const cmp = await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", s.top, s.model]);
  assert.equal(cmp.code, 0, `top alone reads what the guest saw: ${cmp.stdout}`);
  assert.equal(sha(s.base), baseSha, "stream only writes the top");
});

test("block-stream down to a base: the intermediate is dropped, top names the base", async (t) => {
  const seed = testSeed(t);
  const s = await servedChain(t, seed);
  const midSha = sha(s.mid);
  const during = writePlan(prng(seed + 9), 0, UPPER_BYTES, 2000);
  const mark = s.qmp.events.length;
  await whileWriting(s.uri, during, async () => {
    await s.qmp.execute("block-stream", { "job-id": "s1", device: "disk0", base: s.base, speed: 8 * MiB });
  });
  const done = await eventAfter(s.qmp, mark, jobEvent("s1", "BLOCK_JOB_COMPLETED"));
  assert.equal(done.data.error, undefined);
  await qemuIo(s.model, "raw", during);
  await assertServes(s.uri, s.model);
  // Only what mid held was copied: base's own clusters are still base's.
  const map = await imageMap(s.top);
  assert.ok(
    map.filter((e) => e.start >= UPPER_BYTES).every((e) => e.depth === 1),
    `top reads base's own quarter from base: ${JSON.stringify(map.filter((e) => e.start >= UPPER_BYTES))}`,
  );
  assert.ok(!map.some((e) => e.depth === 2), "no third layer");
  assert.equal(await s.daemon.stop(), 0);
  const info = await imageInfo(s.top);
  assert.equal(info["backing-filename"], s.base);
  assert.equal(info["backing-filename-format"], "raw");
  await assertChecks(s.top);
  assert.equal(sha(s.mid), midSha, "the dropped intermediate is not written");
  const cmp = await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", s.top, s.model]);
  assert.equal(cmp.code, 0, `top over base reads what the guest saw: ${cmp.stdout}`);
});

test("a cancelled block-stream leaves the chain as it was", async (t) => {
  const s = await servedChain(t, testSeed(t));
  const mark = s.qmp.events.length;
  await s.qmp.execute("block-stream", { "job-id": "s2", device: "disk0", speed: 1 * MiB });
  await s.qmp.execute("block-job-cancel", { device: "s2" });
  await eventAfter(s.qmp, mark, jobEvent("s2", "BLOCK_JOB_CANCELLED"));
  await assertServes(s.uri, s.model);
  assert.equal(await s.daemon.stop(), 0);
  assert.equal((await imageInfo(s.top))["backing-filename"], s.mid);
  await assertChecks(s.top);
});

/**
 * A served raw base with two overlays put on it by blockdev-snapshot (mid, then top), each holding
 * writes of its own; the export serves top. The base and the overlays are graph nodes, so a commit
 * can write the base through its node.
 */
async function snapshotChain(t: T, seed: number) {
  const s = await servedBase(t, seed);
  const mid = join(s.dir, "mid.qcow2");
  const top = join(s.dir, "top.qcow2");
  const rnd = prng(seed + 3);
  for (const [name, file] of [
    ["mid", mid],
    ["top", top],
  ] as const) {
    await qemuImgCreate(file, DISK_BYTES);
    await addQcow2(s.qmp, name, file, null);
    await s.qmp.execute("blockdev-snapshot", { node: name === "mid" ? "disk0" : "mid", overlay: name });
    const plan = writePlan(rnd, 0, UPPER_BYTES, 150);
    const r = await qemuIoNbd(s.uri, plan).result;
    assert.equal(r.code, 0, r.stderr);
    await qemuIo(s.model, "raw", plan);
  }
  return { ...s, mid, top };
}

test("block-commit of an intermediate under writes: mid merged into the base, top over the base", async (t) => {
  const seed = testSeed(t);
  const s = await snapshotChain(t, seed);
  const topBefore = await imageMap(s.top);
  const during = writePlan(prng(seed + 11), 0, DISK_BYTES, 2000);
  const mark = s.qmp.events.length;
  await whileWriting(s.uri, during, async () => {
    await s.qmp.execute("block-commit", { "job-id": "c0", device: "top", "top-node": "mid", speed: 8 * MiB });
  });
  const done = await eventAfter(s.qmp, mark, jobEvent("c0", "BLOCK_JOB_COMPLETED"));
  assert.equal(done.data.error, undefined);
  assert.equal(done.data.type, "commit");
  assert.ok(
    !jobEventLog(s.qmp, "c0").includes("BLOCK_JOB_READY"),
    "an intermediate commit completes by itself",
  );
  await qemuIo(s.model, "raw", during);
  await assertServes(s.uri, s.model);
  const nodes = (await s.qmp.execute("query-named-block-nodes", {})) as Array<Record<string, unknown>>;
  assert.ok(
    nodes.some((n) => n["node-name"] === "mid"),
    "mid stays a node of its own, unused",
  );
  assert.equal(await s.daemon.stop(), 0);
  const info = await imageInfo(s.top);
  assert.equal(info["backing-filename"], s.base);
  assert.equal(info["backing-filename-format"], "raw");
  await assertChecks(s.top);
  await assertChecks(s.mid);
  assert.ok(topBefore.length > 0);
  const cmp = await run("qemu-img", ["compare", "-F", "raw", s.top, s.model]);
  assert.equal(cmp.code, 0, `top over the base reads what the guest saw: ${cmp.stdout}`);
});

test("active block-commit: READY, writes mirrored into the base, complete pivots the export onto it", async (t) => {
  const seed = testSeed(t);
  const s = await snapshotChain(t, seed);
  const during = writePlan(prng(seed + 13), 0, DISK_BYTES, 2000);
  const mark = s.qmp.events.length;
  await whileWriting(s.uri, during, async () => {
    await s.qmp.execute("block-commit", { "job-id": "c1", device: "top", speed: 8 * MiB });
  });
  await eventAfter(s.qmp, mark, jobEvent("c1", "BLOCK_JOB_READY"));
  const ready = (await s.qmp.execute("query-block-jobs", {})) as Array<Record<string, unknown>>;
  assert.equal(ready[0].type, "commit");
  assert.equal(ready[0].ready, true);
  // Writes after READY reach the base too.
  const after = [`write -P 0xd1 ${13 * MiB} 512k`];
  assert.equal((await qemuIoNbd(s.uri, after).result).code, 0);
  await s.qmp.execute("block-job-complete", { device: "c1" });
  const done = await eventAfter(s.qmp, mark, jobEvent("c1", "BLOCK_JOB_COMPLETED"));
  assert.equal(done.data.error, undefined);
  const exports = (await s.qmp.execute("query-block-exports", {})) as Array<Record<string, unknown>>;
  assert.equal(exports[0]["node-name"], "disk0", "the export serves the base now");
  const later = [`write -P 0xd2 ${14 * MiB} 64k`];
  assert.equal((await qemuIoNbd(s.uri, later).result).code, 0);
  await qemuIo(s.model, "raw", [...during, ...after, ...later]);
  await assertServes(s.uri, s.model);
  assert.equal(await s.daemon.stop(), 0);
  const cmp = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", s.base, s.model]);
  assert.equal(cmp.code, 0, `the base alone holds what the guest saw: ${cmp.stdout}`);
  await assertChecks(s.top);
  await assertChecks(s.mid);
});

test("block-stream's and block-commit's errors are qemu-storage-daemon's", async (t) => {
  await compareSessions(
    t,
    async (dir) => {
      await qemuImgCreate(join(dir, "base.raw"), "4M", { format: "raw" });
      await qemuImgCreate(join(dir, "mid.qcow2"), "4M");
      await qemuImgCreate(join(dir, "top.qcow2"), "4M");
      await qemuImgCreate(join(dir, "other.raw"), "4M", { format: "raw" });
      await qemuImgCreate(join(dir, "lone.qcow2"), "4M");
    },
    (dir) => {
      const file = (name: string) => ({ driver: "file", filename: join(dir, name) });
      return [
        ["blockdev-add", { driver: "raw", "node-name": "base", file: file("base.raw") }],
        ["blockdev-add", { driver: "qcow2", "node-name": "mid", backing: "base", file: file("mid.qcow2") }],
        ["blockdev-add", { driver: "qcow2", "node-name": "top", backing: "mid", file: file("top.qcow2") }],
        ["blockdev-add", { driver: "raw", "node-name": "other", file: file("other.raw") }],
        ["blockdev-add", { driver: "qcow2", "node-name": "lone", backing: null, file: file("lone.qcow2") }],
        ["block-stream", { device: "nope" }],
        ["block-stream", { device: "top", "base-node": "other" }],
        ["block-stream", { device: "top", "base-node": "nope" }],
        ["block-stream", { device: "top", "base-node": "top" }],
        ["block-stream", { device: "top", base: join(dir, "other.raw") }],
        ["block-stream", { device: "top", base: join(dir, "nope") }],
        ["block-stream", { device: "top", base: join(dir, "base.raw"), "base-node": "base" }],
        ["block-stream", { device: "top", "backing-file": "x" }],
        ["block-stream", { device: "top" }],
        ["block-stream", { device: "top", "job-id": "1bad" }],
        ["block-stream", { device: "top", "job-id": "s0", "on-error": "sometimes" }],
        ["block-commit", { device: "nope" }],
        ["block-commit", { device: "base" }],
        ["block-commit", { device: "lone", "job-id": "c9" }],
        ["block-commit", { device: "top", "base-node": "other" }],
        ["block-commit", { device: "top", "top-node": "other" }],
        ["block-commit", { device: "top", "top-node": "nope" }],
        ["block-commit", { device: "top", "top-node": "base" }],
        ["block-commit", { device: "top", "top-node": "mid", "base-node": "mid" }],
        ["block-commit", { device: "top", "top-node": "base", "base-node": "mid" }],
        ["block-commit", { device: "top", base: join(dir, "nope") }],
        ["block-commit", { device: "top", top: join(dir, "nope") }],
        ["block-commit", { device: "top", base: join(dir, "base.raw"), "base-node": "base" }],
        ["block-commit", { device: "top", top: join(dir, "top.qcow2"), "top-node": "top" }],
        ["block-commit", { device: "top", "backing-file": "x" }],
        ["block-commit", { device: "top" }],
      ];
    },
  );
});

test("chain commands refuse nodes a job uses, and the daemon goes on serving", async (t) => {
  const s = await servedChain(t, testSeed(t));
  const mark = s.qmp.events.length;
  await s.qmp.execute("block-stream", { "job-id": "s3", device: "disk0", speed: 64 * 1024 });
  const overlay = join(s.dir, "ov.qcow2");
  await qemuImgCreate(overlay, DISK_BYTES);
  await addQcow2(s.qmp, "ov", overlay, null);
  const busy = /Node 'disk0' is busy: block job s3 \(stream\)/;
  await assert.rejects(s.qmp.execute("blockdev-snapshot", { node: "disk0", overlay: "ov" }), busy);
  await assert.rejects(s.qmp.execute("block-stream", { "job-id": "s4", device: "disk0" }), busy);
  await assert.rejects(s.qmp.execute("block-commit", { "job-id": "c4", device: "disk0" }), busy);
  await assert.rejects(
    s.qmp.execute("block-stream", { "job-id": "s3", device: "ov" }),
    /Job ID 's3' already in use/,
  );
  // A commit into a base the overlay's header opened (no node of its own) is refused by name.
  await s.qmp.execute("block-job-cancel", { device: "s3" });
  await eventAfter(s.qmp, mark, jobEvent("s3", "BLOCK_JOB_CANCELLED"));
  await assert.rejects(
    s.qmp.execute("block-commit", { "job-id": "c5", device: "disk0" }),
    /was opened read-only from its overlay's header/,
  );
  await assertServes(s.uri, s.model);
});

test("block-stream on a top with an in-image bitmap: the header keeps the bitmap, and the store at close keeps the new backing name", async (t) => {
  const seed = testSeed(t);
  const s = await servedChain(t, seed);
  await s.qmp.execute("block-dirty-bitmap-add", { node: "disk0", name: "b0", persistent: true });
  await qemuIo(s.uri, "raw", ["write -P 0x5a 1M 64k"]);
  await qemuIo(s.model, "raw", ["write -P 0x5a 1M 64k"]);
  const mark = s.qmp.events.length;
  await s.qmp.execute("block-stream", { "job-id": "s0", device: "disk0", base: s.base });
  const done = await eventAfter(s.qmp, mark, jobEvent("s0", "BLOCK_JOB_COMPLETED"));
  assert.equal(done.data.error, undefined);
  await eventAfter(s.qmp, mark, statusEvent("s0", "null"));
  assert.equal(await s.daemon.stop(), 0);
  const info = (await imageInfo(s.top)) as {
    "backing-filename"?: string;
    "backing-filename-format"?: string;
    "format-specific"?: { data?: { bitmaps?: Array<{ name: string; flags: string[] }> } };
  };
  assert.equal(info["backing-filename"], s.base, "the bitmap store at close kept the new backing name");
  assert.deepEqual(
    info["format-specific"]?.data?.bitmaps?.map((b) => [b.name, b.flags]),
    [["b0", ["auto"]]],
    "the backing rewrite kept the bitmaps extension",
  );
  assert.equal(info["backing-filename-format"], "raw");
  await assertChecks(s.top);
  const cmp = await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", s.top, s.model]);
  assert.equal(cmp.code, 0, cmp.stdout);
});
