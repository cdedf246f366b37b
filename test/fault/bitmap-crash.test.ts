/**
 * Persistent dirty bitmaps across kill -9 of the daemon. A bitmap's marks are durable before the write
 * reaches the image, so after a crash and a restart on the same image the bitmap still holds every
 * acknowledged write, and, under load, every cluster whose bytes changed on disk (acknowledged or not).
 * QEMU marks such bitmaps inconsistent and forces a full backup; we must not.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readdirSync } from "node:fs";
import { join } from "node:path";
import type { QmpClient } from "../../src/qmp/client.js";
import {
  startDaemon,
  stopAfter,
  unixUri,
  untilImageUnlocked,
  type RunningDaemon,
} from "../helpers/daemon.js";
import {
  assertExit,
  connectQmp,
  KiB,
  MiB,
  pollUntil,
  prng,
  qemuIo,
  readFile,
  seededBytes,
  serveWithQmp,
  testSeed,
} from "../helpers/jobs.js";
import { runOk, start } from "../helpers/run.js";

const DISK = 16 * MiB;
/** The load test's disk: large enough that the writes before the kill leave most clusters clean. */
const LOAD_DISK = 64 * MiB;
const GRANULARITY = 64 * KiB;

interface BitmapInfo {
  name: string;
  count: number;
  recording: boolean;
  persistent: boolean;
  inconsistent: boolean;
}

async function bitmaps(qmp: QmpClient): Promise<BitmapInfo[]> {
  const nodes = (await qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
  return (nodes.find((n) => n["node-name"] === "disk0")?.["dirty-bitmaps"] as BitmapInfo[] | undefined) ?? [];
}

/** Kills the daemon with SIGKILL and waits until it is gone. */
async function crash(daemon: RunningDaemon): Promise<void> {
  daemon.proc.kill("SIGKILL");
  await daemon.exited;
  assert.equal(daemon.proc.signalCode, "SIGKILL");
}

/** Serves the same image again with a fresh QMP socket. */
async function restart(
  t: Parameters<typeof stopAfter>[0],
  image: string,
  dir: string,
  n: number,
): Promise<{ daemon: RunningDaemon; qmp: QmpClient }> {
  const qmpPath = join(dir, `qmp${n}.sock`);
  await untilImageUnlocked(image); // a killed daemon's ring may still hold the file a moment
  const daemon = await startDaemon({ image, args: ["--qmp", qmpPath] });
  stopAfter(t, daemon);
  return { daemon, qmp: await connectQmp(t, qmpPath) };
}

/** The clusters `nbdinfo --map=qemu:dirty-bitmap:NAME` reports dirty, via a read-only export. */
async function dirtyOnWire(qmp: QmpClient, socket: string, name: string): Promise<Set<number>> {
  await qmp.execute("block-export-add", {
    type: "nbd",
    id: "pull",
    "node-name": "disk0",
    name: "pull",
    bitmaps: [name],
  });
  const r = await runOk("nbdinfo", ["--json", `--map=qemu:dirty-bitmap:${name}`, unixUri(socket, "pull")]);
  const out = new Set<number>();
  for (const e of JSON.parse(r.stdout) as Array<{ offset: number; length: number; type: number }>) {
    if ((e.type & 1) === 0) continue;
    for (let c = e.offset / GRANULARITY; c < Math.ceil((e.offset + e.length) / GRANULARITY); c++) out.add(c);
  }
  await qmp.execute("block-export-del", { id: "pull" });
  return out;
}

test("persistent bitmaps survive kill -9 right after acknowledged writes", async (t) => {
  const seed = testSeed(t);
  const rnd = prng(seed);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK) });
  await d.qmp.execute("block-dirty-bitmap-add", { node: "disk0", name: "b0", persistent: true });
  await d.qmp.execute("block-dirty-bitmap-add", {
    node: "disk0",
    name: "off",
    persistent: true,
    disabled: true,
  });
  await d.qmp.execute("block-dirty-bitmap-add", { node: "disk0", name: "mem" });

  const commands: string[] = [];
  const written = new Set<number>();
  for (let i = 0; i < 80; i++) {
    const offset = Math.floor(rnd() * (DISK / 512 - 256)) * 512;
    const length = (1 + Math.floor(rnd() * 255)) * 512;
    // qemu-io sets FUA on every write unless told otherwise: plain writeback writes here.
    commands.push(
      i % 5 === 0
        ? `write -z ${offset} ${length}`
        : `write -P 0x${(0x20 + (i % 200)).toString(16)} ${offset} ${length}`,
    );
    for (let c = Math.floor(offset / GRANULARITY); c < Math.ceil((offset + length) / GRANULARITY); c++)
      written.add(c);
  }
  assertExit("qemu-io", await qemuIo(d.uri, commands));
  // Every write was acknowledged; no flush, no clean shutdown.
  await crash(d.daemon);

  const r = await restart(t, d.image, d.dir, 2);
  const list = await bitmaps(r.qmp);
  assert.deepEqual(
    list.map((b) => b.name).sort(),
    ["b0", "off"],
    "persistent bitmaps are back; the other is gone",
  );
  const b0 = list.find((b) => b.name === "b0")!;
  assert.equal(b0.persistent, true);
  assert.equal(b0.recording, true);
  assert.equal(b0.inconsistent, false);
  assert.equal(b0.count, written.size * GRANULARITY, "b0 holds every written cluster, nothing more");
  const off = list.find((b) => b.name === "off")!;
  assert.deepEqual([off.recording, off.count], [false, 0], "a disabled bitmap stays disabled and empty");
  assert.deepEqual(
    [...(await dirtyOnWire(r.qmp, r.daemon.socket, "b0"))].sort((a, b) => a - b),
    [...written].sort((a, b) => a - b),
  );

  // It keeps recording after the restart, and a second crash keeps that too.
  assertExit("qemu-io", await qemuIo(r.daemon.uri, [`write -P 0x77 ${DISK - 4096} 4096`]));
  await crash(r.daemon);
  const r3 = await restart(t, d.image, d.dir, 3);
  assert.equal(
    (await bitmaps(r3.qmp)).find((b) => b.name === "b0")?.count,
    (written.size + (written.has(DISK / GRANULARITY - 1) ? 0 : 1)) * GRANULARITY,
  );

  // Remove deletes the sidecar file.
  await r3.qmp.execute("block-dirty-bitmap-remove", { node: "disk0", name: "b0" });
  await r3.qmp.execute("block-dirty-bitmap-remove", { node: "disk0", name: "off" });
  const sidecar = `${d.image}.bitmaps`;
  assert.ok(existsSync(sidecar));
  assert.deepEqual(readdirSync(sidecar), [], "no bitmap files left");
});

test("kill -9 under fio load: after restart every cluster that changed on disk is dirty", async (t) => {
  const seed = testSeed(t);
  const original = seededBytes(seed, LOAD_DISK);
  const d = await serveWithQmp(t, { content: original });
  await d.qmp.execute("block-dirty-bitmap-add", { node: "disk0", name: "b0", persistent: true });
  // Random data (fio's default buffers) over a seeded image: a changed cluster is visible in its bytes.
  const fio = start("fio", [
    "--name=crash",
    "--ioengine=nbd",
    `--uri=${d.uri}`,
    "--rw=randwrite",
    "--bsrange=4k-64k",
    "--iodepth=32",
    // Paced, so the kill lands while most of the disk is still clean.
    "--rate_iops=2000",
    `--size=${LOAD_DISK}`,
    `--io_size=${4 * 1024 * MiB}`,
    `--randseed=${seed}`,
    "--norandommap",
    "--output-format=terse",
    // Jobs as threads of one process, so killing it stops them all.
    "--thread",
  ]);
  await pollUntil("writes reaching the disk under load", async () => {
    const nodes = (await d.qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
    const stats = nodes.find((n) => n["node-name"] === "disk0")?.["x-stats"] as
      { writeOps: number } | undefined;
    return (stats?.writeOps ?? 0) > 200;
  });
  await crash(d.daemon);
  // fio fails once its server is gone (and may spin on errors): stop it.
  fio.proc.kill("SIGKILL");
  await fio.result;

  const r = await restart(t, d.image, d.dir, 2);
  const dirty = await dirtyOnWire(r.qmp, r.daemon.socket, "b0");
  const now = readFile(d.image);
  let changed = 0;
  const missing: number[] = [];
  for (let c = 0; c < LOAD_DISK / GRANULARITY; c++) {
    const a = now.subarray(c * GRANULARITY, (c + 1) * GRANULARITY);
    if (a.equals(original.subarray(c * GRANULARITY, (c + 1) * GRANULARITY))) continue;
    changed++;
    if (!dirty.has(c)) missing.push(c);
  }
  assert.ok(changed > 10, `the load changed the disk (${changed} clusters)`);
  assert.ok(dirty.size < LOAD_DISK / GRANULARITY / 2, `most clusters stay clean (${dirty.size} dirty)`);
  assert.deepEqual(missing, [], "changed clusters missing from the bitmap after the crash");
});
