/**
 * What the block-job tests share: a daemon serving a temp image with a QMP socket and a connected
 * client, QMP job queries and deadline-bounded polling, seeded overlapping I/O from qemu-io and fio
 * (optionally through a sniffing proxy that records exactly which ranges were written), and byte
 * comparisons of images that name the first differing cluster.
 */
import assert from "node:assert/strict";
import { randomInt } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { TestContext } from "node:test";
import * as C from "../../src/nbd/protocol/constants.js";
import { QmpClient, type QmpEvent } from "../../src/qmp/client.js";
import { QmpError } from "../../src/qmp/errors.js";
import { makeImage, startDaemon, stopAfter, unixUri, type RunningDaemon } from "./daemon.js";
import { startSniffingProxy, type SniffedRequest } from "./raw-nbd.js";
import { start, tempDir, type RunResult } from "./run.js";

export const KiB = 1024;
export const MiB = 1024 * KiB;
/** The backup jobs' cluster (BACKUP_CLUSTER_BYTES): CBW copies whole clusters. */
export const CLUSTER_BYTES = 64 * KiB;

type T = Pick<TestContext, "after" | "diagnostic">;

// ---- seeded randomness -------------------------------------------------------------------------------

/** A small deterministic PRNG (mulberry32); returns floats in [0, 1). */
export function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

/** The seed for a test: DRIVETAP_SEED if set, else random; printed so a failure can be replayed. */
export function testSeed(t: T): number {
  const seed = process.env.DRIVETAP_SEED ? Number(process.env.DRIVETAP_SEED) : randomInt(2 ** 31);
  t.diagnostic(`seed ${seed} (replay with DRIVETAP_SEED=${seed})`);
  return seed;
}

/** Deterministic pseudo-random bytes (fast enough for tens of MiB). */
export function seededBytes(seed: number, length: number): Buffer {
  const out = Buffer.allocUnsafe(length);
  const rnd = prng(seed);
  let i = 0;
  for (; i + 4 <= length; i += 4) out.writeUInt32LE((rnd() * 4294967296) >>> 0, i);
  for (; i < length; i++) out[i] = (rnd() * 256) | 0;
  return out;
}

// ---- a daemon with QMP -------------------------------------------------------------------------------

export interface QmpDaemon {
  readonly daemon: RunningDaemon;
  readonly dir: string;
  readonly image: string;
  readonly qmpPath: string;
  readonly qmp: QmpClient;
  /** The NBD URI of the served disk. */
  readonly uri: string;
}

/**
 * Writes `content` (or a sparse image of sizeBytes, or what `make` makes) to a temp file, serves it
 * with --qmp and connects a QMP client. Everything is stopped and removed after the test.
 */
export async function serveWithQmp(
  t: T,
  opts: {
    content?: Buffer;
    sizeBytes?: number;
    prepare?: (image: string) => void;
    /** Makes the image to serve in the test's directory (a qcow2 overlay, say) instead of a raw one. */
    make?: (dir: string) => Promise<string>;
  },
): Promise<QmpDaemon> {
  const dir = tempDir(t, "drivetap-jobs-");
  let image = join(dir, "disk.img");
  if (opts.make) image = await opts.make(dir);
  else if (opts.content) writeFileSync(image, opts.content);
  else makeImage(image, opts.sizeBytes ?? 0);
  opts.prepare?.(image);
  const qmpPath = join(dir, "qmp.sock");
  const daemon = await startDaemon({ image, args: ["--qmp", qmpPath] });
  stopAfter(t, daemon);
  const qmp = await connectQmp(t, qmpPath);
  return { daemon, dir, image, qmpPath, qmp, uri: daemon.uri };
}

export async function connectQmp(t: Pick<TestContext, "after">, path: string): Promise<QmpClient> {
  const qmp = await QmpClient.connect(path);
  t.after(() => qmp.close());
  return qmp;
}

// ---- jobs over QMP -----------------------------------------------------------------------------------

export interface BlockJobInfo {
  type: string;
  device: string;
  len: number;
  offset: number;
  busy: boolean;
  paused: boolean;
  speed: number;
  "io-status": string;
  ready: boolean;
  status: string;
  "auto-finalize": boolean;
  "auto-dismiss": boolean;
  error?: string;
}

export async function blockJobs(qmp: QmpClient): Promise<BlockJobInfo[]> {
  return (await qmp.execute("query-block-jobs")) as BlockJobInfo[];
}

export async function blockJob(qmp: QmpClient, id: string): Promise<BlockJobInfo> {
  const job = (await blockJobs(qmp)).find((j) => j.device === id);
  assert.ok(job, `job ${id} is listed by query-block-jobs`);
  return job;
}

export const POLL_INTERVAL_MS = 20;

/**
 * Polls `probe` until it returns a value other than undefined/false, failing after `timeoutMs` with
 * the last value seen. For states no event announces (a stream job back in sync).
 */
export async function pollUntil<V>(
  what: string,
  probe: () => Promise<V | undefined | false>,
  timeoutMs = 20_000,
  describe: () => Promise<unknown> = async () => undefined,
): Promise<V> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const v = await probe();
    if (v !== undefined && v !== false) return v;
    if (Date.now() > deadline) {
      assert.fail(
        `timed out after ${timeoutMs} ms waiting for ${what}; last: ${JSON.stringify(await describe())}`,
      );
    }
    await new Promise((resolve) => setTimeout(resolve, POLL_INTERVAL_MS));
  }
}

/** Waits until the stream job has nothing left to repair (offset == len). */
export function waitInSync(qmp: QmpClient, id: string, timeoutMs = 20_000): Promise<BlockJobInfo> {
  let last: BlockJobInfo | undefined;
  return pollUntil(
    `job ${id} in sync (offset == len)`,
    async () => {
      last = await blockJob(qmp, id);
      return last.offset === last.len && last.status === "running" ? last : undefined;
    },
    timeoutMs,
    async () => last,
  );
}

/** Matches an event about job `id` (JOB_STATUS_CHANGE carries `id`, block job events `device`). */
export function jobEvent(
  id: string,
  event: string,
  extra?: (e: QmpEvent) => boolean,
): (e: QmpEvent) => boolean {
  return (e) => e.event === event && (e.data.device === id || e.data.id === id) && (extra ? extra(e) : true);
}

export function statusEvent(id: string, status: string): (e: QmpEvent) => boolean {
  return jobEvent(id, "JOB_STATUS_CHANGE", (e) => e.data.status === status);
}

/**
 * Waits for a matching event received at or after index `mark` of qmp.events (take the mark before
 * the command that causes it): earlier events with the same name do not count.
 */
export function eventAfter(
  qmp: QmpClient,
  mark: number,
  match: (e: QmpEvent) => boolean,
  timeoutMs?: number,
): Promise<QmpEvent> {
  return qmp.waitForEvent((e) => qmp.events.indexOf(e) >= mark && match(e), timeoutMs);
}

/** The statuses and block-job events of job `id` a client has seen, in order. */
export function jobEventLog(qmp: QmpClient, id: string): string[] {
  return qmp.events
    .filter((e) => e.data.device === id || e.data.id === id)
    .map((e) => (e.event === "JOB_STATUS_CHANGE" ? String(e.data.status) : e.event));
}

/** Asserts the promise rejects with a QmpError of that class whose text matches. */
export async function assertQmpError(
  p: Promise<unknown>,
  errorClass: string,
  desc: string | RegExp,
): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(err instanceof QmpError, `expected a QmpError, got ${String(err)}`);
    assert.equal(err.errorClass, errorClass, err.message);
    if (typeof desc === "string") assert.equal(err.message, desc);
    else assert.match(err.message, desc);
    return true;
  });
}

// ---- writers -----------------------------------------------------------------------------------------

export interface PlanOptions {
  /** Commands go into [regionOffset, regionOffset + regionBytes). */
  readonly regionOffset: number;
  readonly regionBytes: number;
  readonly count: number;
  readonly lengthMax?: number;
  /** Leave out flushes and discards, which wait for what is in flight: the most overlap. */
  readonly aioOnly?: boolean;
}

/**
 * A seeded qemu-io script of overlapping requests: mostly aio_write with a distinct pattern each, some
 * aio_write -z, some (cluster-aligned) discards, and an aio_flush now and then. aio requests stay in
 * flight together, so overlapping ones race in the server.
 */
export function qemuIoPlan(rnd: () => number, o: PlanOptions): string[] {
  const commands: string[] = [];
  const lengthMax = o.lengthMax ?? 256 * KiB;
  const sectors = o.regionBytes / 512;
  for (let i = 0; i < o.count; i++) {
    const r = o.aioOnly ? 0.1 + rnd() * 0.9 : rnd();
    if (r < 0.06) {
      const clusters = o.regionBytes / CLUSTER_BYTES;
      const first = Math.floor(rnd() * clusters);
      const n = Math.min(1 + Math.floor(rnd() * 4), clusters - first);
      commands.push(`discard ${o.regionOffset + first * CLUSTER_BYTES} ${n * CLUSTER_BYTES}`);
      continue;
    }
    if (r < 0.1) {
      commands.push("aio_flush");
      continue;
    }
    const start = Math.floor(rnd() * sectors);
    const length = Math.min(1 + Math.floor(rnd() * (lengthMax / 512)), sectors - start) * 512;
    const offset = o.regionOffset + start * 512;
    if (r < 0.25) commands.push(`aio_write -z ${offset} ${length}`);
    else commands.push(`aio_write -P 0x${(1 + (i % 254)).toString(16)} ${offset} ${length}`);
  }
  commands.push("aio_flush");
  return commands;
}

export interface FioOptions {
  readonly offset?: number;
  readonly sizeBytes: number;
  readonly ioBytes: number;
  readonly seed: number;
  readonly bsrange?: string;
  readonly iodepth?: number;
}

function qemuIoArgs(uri: string, commands: readonly string[]): string[] {
  const args = ["-f", "raw", "-t", "writeback", uri];
  for (const c of commands) args.push("-c", c);
  return args;
}

function fioArgs(uri: string, o: FioOptions): string[] {
  return [
    "--name=overlap",
    "--ioengine=nbd",
    `--uri=${uri}`,
    "--rw=randwrite",
    `--bsrange=${o.bsrange ?? "4k-128k"}`,
    `--iodepth=${o.iodepth ?? 32}`,
    `--offset=${o.offset ?? 0}`,
    `--size=${o.sizeBytes}`,
    `--io_size=${o.ioBytes}`,
    `--randseed=${o.seed}`,
    "--norandommap",
    "--output-format=terse",
  ];
}

/** Fails unless the tool exited 0 (and, for qemu-io, which exits 0 after a failed aio, printed no failure). */
export function assertExit(what: string, r: RunResult): void {
  const text = `${what} exited ${r.code ?? r.signal}\nstdout: ${r.stdout.slice(-2000)}\nstderr: ${r.stderr}`;
  assert.equal(r.code, 0, text);
  if (what === "qemu-io") assert.doesNotMatch(r.stdout + r.stderr, /failed|error/i, text);
}

/**
 * Runs a qemu-io script and fio at the same time, each against its own URI (the export, or a recording
 * proxy in front of it); both must succeed.
 */
export async function runWriters(
  qemu: { uri: string; commands: readonly string[] },
  fio: (FioOptions & { uri: string }) | null,
): Promise<void> {
  const q = start("qemu-io", qemuIoArgs(qemu.uri, qemu.commands));
  const f = fio ? start("fio", fioArgs(fio.uri, fio)) : null;
  const [qr, fr] = await Promise.all([q.result, f?.result]);
  assertExit("qemu-io", qr);
  if (fr) assertExit("fio", fr);
}

/** Bytes a qemuIoPlan script changes (writes, zeroes and discards), as the server sees them. */
export function planBytes(commands: readonly string[]): number {
  let bytes = 0;
  for (const c of commands) {
    const m = /^(?:aio_write|discard)\b.* (\d+) (\d+)$/.exec(c);
    if (m) bytes += Number(m[2]);
  }
  return bytes;
}

/**
 * The stream tests' script: a wide region of small overlapping requests, then a hot 1 MiB where writes
 * of up to 1 MiB (which the file driver runs on the threadpool, so they may finish out of order) all
 * overlap. Without ordering between source and target, the hot region ends up different.
 */
export function streamPlan(rnd: () => number, wideOffset: number, hotOffset: number): string[] {
  return [
    ...qemuIoPlan(rnd, { regionOffset: wideOffset, regionBytes: 8 * MiB, count: 300 }),
    ...qemuIoPlan(rnd, {
      regionOffset: hotOffset,
      regionBytes: 1 * MiB,
      count: 500,
      lengthMax: 1 * MiB,
      aioOnly: true,
    }),
  ];
}

/** Runs qemu-io commands to completion and returns the result (no assertion). */
export function qemuIo(uri: string, commands: readonly string[]): Promise<RunResult> {
  return start("qemu-io", qemuIoArgs(uri, commands)).result;
}

export interface Recorded {
  /** The URI writers should use: a proxy in front of the daemon. */
  readonly uri: string;
  /** Every request sent through it. */
  readonly requests: SniffedRequest[];
}

/** A sniffing proxy in front of the daemon: records exactly which requests the writers sent. */
export async function recordingProxy(t: Pick<TestContext, "after">, d: QmpDaemon): Promise<Recorded> {
  const proxy = await startSniffingProxy(d.daemon.socket, d.dir);
  t.after(() => proxy.close());
  return { uri: unixUri(proxy.socket), requests: proxy.requests };
}

const MUTATING = new Set([C.NBD_CMD_WRITE, C.NBD_CMD_WRITE_ZEROES, C.NBD_CMD_TRIM]);

/** The requests that change data (write, write-zeroes, trim). */
export function mutations(requests: readonly SniffedRequest[]): SniffedRequest[] {
  return requests.filter((r) => MUTATING.has(r.type) && r.length > 0);
}

/** Per cluster: whether any mutating request touched it. */
export function touchedClusters(requests: readonly SniffedRequest[], diskBytes: number): boolean[] {
  const touched = new Array<boolean>(Math.ceil(diskBytes / CLUSTER_BYTES)).fill(false);
  for (const r of mutations(requests)) {
    const first = Math.floor(r.offset / CLUSTER_BYTES);
    const end = Math.ceil((r.offset + r.length) / CLUSTER_BYTES);
    for (let c = first; c < end; c++) touched[c] = true;
  }
  return touched;
}

// ---- comparing images --------------------------------------------------------------------------------

/** Asserts two images are equal, naming the first differing cluster and how many differ. */
export function assertSameImage(actual: Buffer, expected: Buffer, what: string): void {
  assert.equal(actual.length, expected.length, `${what}: size`);
  if (actual.equals(expected)) return;
  const bad: number[] = [];
  for (let off = 0; off < actual.length; off += CLUSTER_BYTES) {
    const end = Math.min(off + CLUSTER_BYTES, actual.length);
    if (!actual.subarray(off, end).equals(expected.subarray(off, end))) bad.push(off / CLUSTER_BYTES);
  }
  assert.fail(
    `${what}: ${bad.length} of ${Math.ceil(actual.length / CLUSTER_BYTES)} clusters differ, first at byte ${bad[0] * CLUSTER_BYTES}`,
  );
}

export function readFile(path: string): Buffer {
  return readFileSync(path);
}

export function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}
