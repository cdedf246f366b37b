/**
 * Dirty bitmaps with real clients: the QMP commands and QEMU's error texts, pull-mode incremental
 * backup (a bitmap started in a transaction with a full backup, read back by nbdinfo through the
 * qemu:dirty-bitmap meta context, its extents copied onto the full backup with libnbd), and push-mode
 * sync=incremental / sync=bitmap backups applied onto the full backup.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync } from "node:fs";
import { join } from "node:path";
import type { QmpClient } from "../../src/qmp/client.js";
import { unixUri } from "../helpers/daemon.js";
import {
  assertQmpError,
  assertSameImage,
  isZero,
  jobEvent,
  KiB,
  MiB,
  prng,
  qemuIo,
  readFile,
  seededBytes,
  serveWithQmp,
  testSeed,
  assertExit,
  eventAfter,
} from "../helpers/jobs.js";
import { run, runOk, SYSTEM_PYTHON } from "../helpers/run.js";

const DISK = 16 * MiB;
const GRANULARITY = 64 * KiB;

interface BitmapInfo {
  name: string;
  granularity: number;
  count: number;
  recording: boolean;
  persistent: boolean;
  busy: boolean;
  inconsistent: boolean;
}

async function bitmapsOf(qmp: QmpClient, node: string): Promise<BitmapInfo[] | undefined> {
  const nodes = (await qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
  const n = nodes.find((x) => x["node-name"] === node);
  assert.ok(n, `node ${node} is listed`);
  return n["dirty-bitmaps"] as BitmapInfo[] | undefined;
}

async function bitmapInfo(qmp: QmpClient, node: string, name: string): Promise<BitmapInfo> {
  const b = (await bitmapsOf(qmp, node))?.find((x) => x.name === name);
  assert.ok(b, `bitmap ${name} is listed on ${node}`);
  return b;
}

/** Seeded qemu-io writes, zeroes and discards; returns the commands and the clusters they touch. */
function writePlan(rnd: () => number, count: number): { commands: string[]; clusters: Set<number> } {
  const commands: string[] = [];
  const clusters = new Set<number>();
  for (let i = 0; i < count; i++) {
    const r = rnd();
    let offset: number;
    let length: number;
    if (r < 0.15) {
      // Discards on whole clusters: a client may drop the unaligned parts of a discard.
      const first = Math.floor(rnd() * (DISK / GRANULARITY - 4));
      offset = first * GRANULARITY;
      length = (1 + Math.floor(rnd() * 3)) * GRANULARITY;
      commands.push(`discard ${offset} ${length}`);
    } else {
      const sectors = DISK / 512;
      const start = Math.floor(rnd() * (sectors - 512));
      offset = start * 512;
      length = (1 + Math.floor(rnd() * 256)) * 512;
      commands.push(
        r < 0.3
          ? `write -z ${offset} ${length}`
          : `write -P 0x${(1 + (i % 250)).toString(16)} ${offset} ${length}`,
      );
    }
    for (let c = Math.floor(offset / GRANULARITY); c < Math.ceil((offset + length) / GRANULARITY); c++) {
      clusters.add(c);
    }
  }
  return { commands, clusters };
}

interface MapEntry {
  offset: number;
  length: number;
  type: number;
}

/** `nbdinfo --map=CONTEXT --json URI`, parsed. */
async function nbdinfoMap(uri: string, context: string): Promise<MapEntry[]> {
  const r = await runOk("nbdinfo", ["--json", `--map=${context}`, uri]);
  return JSON.parse(r.stdout) as MapEntry[];
}

/** The clusters a map marks dirty (flag bit 0), checking the map covers the disk without gaps. */
function dirtyClusters(map: readonly MapEntry[]): Set<number> {
  const out = new Set<number>();
  let pos = 0;
  for (const e of map) {
    assert.equal(e.offset, pos, "map extents are contiguous");
    pos += e.length;
    if ((e.type & 1) === 0) continue;
    assert.equal(e.offset % GRANULARITY, 0, "dirty extents start on a cluster");
    for (let c = e.offset / GRANULARITY; c < Math.ceil((e.offset + e.length) / GRANULARITY); c++) out.add(c);
  }
  assert.equal(pos, DISK, "the map covers the disk");
  return out;
}

function sorted(s: Set<number>): number[] {
  return [...s].sort((a, b) => a - b);
}

/** Copies [offset, length) ranges from an NBD export into a file, with libnbd (a real pull client). */
async function pullExtents(uri: string, file: string, extents: readonly MapEntry[]): Promise<void> {
  const py = `
import json, sys, nbd
uri, path, extents = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
h = nbd.NBD()
h.connect_uri(uri)
with open(path, "r+b") as f:
    for off, length in extents:
        pos = off
        while pos < off + length:
            n = min(off + length - pos, 4 << 20)
            f.seek(pos)
            f.write(h.pread(n, pos))
            pos += n
h.shutdown()
`;
  const r = await run(SYSTEM_PYTHON, [
    "-c",
    py,
    uri,
    file,
    JSON.stringify(extents.map((e) => [e.offset, e.length])),
  ]);
  assert.equal(r.code, 0, `libnbd pull failed: ${r.stderr}`);
}

async function fullBackupWithBitmap(
  qmp: QmpClient,
  target: string,
  bitmap: Record<string, unknown> = {},
): Promise<void> {
  await qmp.execute("transaction", {
    actions: [
      { type: "block-dirty-bitmap-add", data: { node: "disk0", name: "bitmap0", ...bitmap } },
      { type: "drive-backup", data: { "job-id": "full", device: "disk0", sync: "full", target } },
    ],
  });
  const done = await qmp.waitForEvent(jobEvent("full", "BLOCK_JOB_COMPLETED"), 60_000);
  assert.equal(done.data.error, undefined, "the full backup succeeded");
}

test("dirty bitmap commands: QEMU's arguments, errors and query-named-block-nodes entry", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: DISK });
  const q = d.qmp;
  assert.equal(await bitmapsOf(q, "disk0"), undefined, "no dirty-bitmaps member without bitmaps");
  await q.execute("block-dirty-bitmap-add", { node: "disk0", name: "a" });
  await q.execute("block-dirty-bitmap-add", { node: "disk0", name: "b", granularity: 4096, disabled: true });
  assert.deepEqual(await bitmapInfo(q, "disk0", "a"), {
    name: "a",
    granularity: 65536,
    count: 0,
    recording: true,
    persistent: false,
    busy: false,
    inconsistent: false,
  });
  assert.equal((await bitmapInfo(q, "disk0", "b")).recording, false);

  await assertQmpError(
    q.execute("block-dirty-bitmap-add", { node: "disk0", name: "a" }),
    "GenericError",
    "Bitmap already exists: a",
  );
  await assertQmpError(
    q.execute("block-dirty-bitmap-add", { node: "disk0", name: "" }),
    "GenericError",
    "Bitmap name cannot be empty",
  );
  for (const g of [256, 3000, 65537]) {
    await assertQmpError(
      q.execute("block-dirty-bitmap-add", { node: "disk0", name: "g", granularity: g }),
      "GenericError",
      "Granularity must be power of 2 and at least 512",
    );
  }
  await assertQmpError(
    q.execute("block-dirty-bitmap-add", { node: "nope", name: "x" }),
    "GenericError",
    "Cannot find device='nope' nor node-name='nope'",
  );
  await assertQmpError(
    q.execute("block-dirty-bitmap-clear", { node: "disk0", name: "zz" }),
    "GenericError",
    "Dirty bitmap 'zz' not found",
  );
  await q.execute("blockdev-add", { driver: "memory", "node-name": "mem", size: DISK });
  await assertQmpError(
    q.execute("block-dirty-bitmap-add", { node: "mem", name: "p", persistent: true }),
    "GenericError",
    /^Can't store persistent bitmaps to mem: /,
  );

  // a records writes, b (disabled) does not; enabling it starts recording.
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x11 0 4096", "write -z 1M 4096", "discard 2M 64k"]));
  assert.equal((await bitmapInfo(q, "disk0", "a")).count, 3 * GRANULARITY);
  assert.equal((await bitmapInfo(q, "disk0", "b")).count, 0);
  await q.execute("block-dirty-bitmap-enable", { node: "disk0", name: "b" });
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x12 8M 512"]));
  assert.equal((await bitmapInfo(q, "disk0", "b")).count, 4096, "granularity 4096: one cluster");
  assert.equal((await bitmapInfo(q, "disk0", "a")).count, 4 * GRANULARITY);
  await q.execute("block-dirty-bitmap-disable", { node: "disk0", name: "a" });
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x13 10M 512"]));
  assert.equal(
    (await bitmapInfo(q, "disk0", "a")).count,
    4 * GRANULARITY,
    "a disabled bitmap records nothing",
  );

  // Merge b (4 KiB clusters) into a fresh c (64 KiB): c gets the 64 KiB clusters around b's.
  await q.execute("block-dirty-bitmap-add", { node: "disk0", name: "c", disabled: true });
  await q.execute("block-dirty-bitmap-merge", {
    node: "disk0",
    target: "c",
    bitmaps: ["b", { node: "disk0", name: "b" }],
  });
  assert.equal((await bitmapInfo(q, "disk0", "c")).count, 2 * GRANULARITY, "b's clusters at 8M and 10M");
  await assertQmpError(
    q.execute("block-dirty-bitmap-merge", { node: "disk0", target: "c", bitmaps: ["b", "nope"] }),
    "GenericError",
    "Dirty bitmap 'nope' not found",
  );

  await q.execute("block-dirty-bitmap-clear", { node: "disk0", name: "a" });
  assert.equal((await bitmapInfo(q, "disk0", "a")).count, 0);
  // An exported bitmap is busy: it cannot be removed or cleared until the export goes.
  await q.execute("block-export-add", {
    type: "nbd",
    id: "e1",
    "node-name": "disk0",
    name: "e1",
    bitmaps: ["c"],
  });
  assert.equal((await bitmapInfo(q, "disk0", "c")).busy, true);
  const busy = "Bitmap 'c' is currently in use by another operation and cannot be used";
  await assertQmpError(
    q.execute("block-dirty-bitmap-remove", { node: "disk0", name: "c" }),
    "GenericError",
    busy,
  );
  await assertQmpError(
    q.execute("block-dirty-bitmap-clear", { node: "disk0", name: "c" }),
    "GenericError",
    busy,
  );
  await assertQmpError(
    q.execute("block-export-add", {
      type: "nbd",
      id: "e2",
      "node-name": "disk0",
      name: "e2",
      bitmaps: ["zz"],
    }),
    "GenericError",
    "Bitmap 'zz' is not found",
  );
  await assertQmpError(
    q.execute("block-export-add", {
      type: "nbd",
      id: "e3",
      "node-name": "disk0",
      name: "e3",
      writable: true,
      bitmaps: ["b"],
    }),
    "GenericError",
    "Enabled bitmap 'b' incompatible with writable export",
  );
  await q.execute("block-export-del", { id: "e1" });
  for (const name of ["a", "b", "c"]) await q.execute("block-dirty-bitmap-remove", { node: "disk0", name });
  assert.equal(await bitmapsOf(q, "disk0"), undefined);

  // Backup argument checks with bitmaps (QEMU's texts).
  const target = join(d.dir, "t.img");
  await assertQmpError(
    q.execute("drive-backup", { device: "disk0", sync: "incremental", target }),
    "GenericError",
    "must provide a valid bitmap name for 'incremental' sync mode",
  );
  await assertQmpError(
    q.execute("drive-backup", { device: "disk0", sync: "bitmap", bitmap: "x", target }),
    "GenericError",
    "Bitmap 'x' could not be found",
  );
  await q.execute("block-dirty-bitmap-add", { node: "disk0", name: "x" });
  await assertQmpError(
    q.execute("drive-backup", { device: "disk0", sync: "bitmap", bitmap: "x", target }),
    "GenericError",
    "Bitmap sync mode must be given when providing a bitmap",
  );
  await assertQmpError(
    q.execute("drive-backup", {
      device: "disk0",
      sync: "incremental",
      bitmap: "x",
      "bitmap-mode": "never",
      target,
    }),
    "GenericError",
    "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
  );
  await assertQmpError(
    q.execute("drive-backup", { device: "disk0", sync: "full", "bitmap-mode": "always", target }),
    "GenericError",
    "Cannot specify bitmap sync mode without a bitmap",
  );
  await assertQmpError(
    q.execute("drive-backup", {
      device: "disk0",
      sync: "none",
      bitmap: "x",
      "bitmap-mode": "always",
      target,
    }),
    "GenericError",
    "sync mode 'none' does not produce meaningful bitmap outputs",
  );
});

test("pull-mode incremental backup: bitmap started with a full backup, read by nbdinfo, copied with libnbd", async (t) => {
  const seed = testSeed(t);
  const rnd = prng(seed);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK) });
  const base = join(d.dir, "base.img");
  await fullBackupWithBitmap(d.qmp, base);
  assertSameImage(readFile(base), readFile(d.image), "the full backup");
  assert.equal((await bitmapInfo(d.qmp, "disk0", "bitmap0")).count, 0, "nothing written since the backup");

  const plan = writePlan(rnd, 60);
  assertExit("qemu-io", await qemuIo(d.uri, plan.commands));

  await d.qmp.execute("block-export-add", {
    type: "nbd",
    id: "pull",
    "node-name": "disk0",
    name: "pull",
    bitmaps: ["bitmap0"],
  });
  const pullUri = unixUri(d.daemon.socket, "pull");
  const map = await nbdinfoMap(pullUri, "qemu:dirty-bitmap:bitmap0");
  assert.deepEqual(
    sorted(dirtyClusters(map)),
    sorted(plan.clusters),
    "exactly the written clusters are dirty",
  );
  assert.equal((await bitmapInfo(d.qmp, "disk0", "bitmap0")).count, plan.clusters.size * GRANULARITY);

  // base:allocation and the bitmap together on one connection still answer (one chunk each).
  const both = await runOk("nbdinfo", ["--map=base:allocation", pullUri]);
  assert.match(both.stdout, /data|hole|zero/);

  const rebuilt = join(d.dir, "rebuilt.img");
  copyFileSync(base, rebuilt);
  await pullExtents(
    pullUri,
    rebuilt,
    map.filter((e) => (e.type & 1) !== 0),
  );
  const cmp = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", rebuilt, d.image]);
  assert.equal(cmp.code, 0, `full backup + pulled dirty extents == source\n${cmp.stdout}${cmp.stderr}`);
  // And the pull was needed: the full backup alone differs.
  const stale = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", base, d.image]);
  assert.equal(stale.code, 1, "the full backup alone is older than the source");
});

test("push-mode sync=incremental: applied onto the full backup it equals the source; writes during the job stay recorded", async (t) => {
  const seed = testSeed(t);
  const rnd = prng(seed);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK) });
  const base = join(d.dir, "base.img");
  await fullBackupWithBitmap(d.qmp, base);

  const plan = writePlan(rnd, 40);
  assertExit("qemu-io", await qemuIo(d.uri, plan.commands));
  const inc = join(d.dir, "inc.img");
  // Slow enough to write during the job, into a cluster that was clean at its start.
  const clean = [...Array(DISK / GRANULARITY).keys()].find((c) => !plan.clusters.has(c))!;
  const mark = d.qmp.events.length;
  await d.qmp.execute("drive-backup", {
    "job-id": "inc",
    device: "disk0",
    sync: "incremental",
    bitmap: "bitmap0",
    target: inc,
    speed: 1,
  });
  assert.equal((await bitmapInfo(d.qmp, "disk0", "bitmap0")).busy, true, "the job holds the bitmap");
  const before = readFile(d.image);
  assertExit("qemu-io", await qemuIo(d.uri, [`write -P 0xee ${clean * GRANULARITY} 4096`]));
  await d.qmp.execute("block-job-set-speed", { device: "inc", speed: 0 });
  const done = await eventAfter(d.qmp, mark, jobEvent("inc", "BLOCK_JOB_COMPLETED"), 60_000);
  assert.equal(done.data.error, undefined, "the incremental backup succeeded");
  assert.equal(done.data.len, plan.clusters.size * GRANULARITY, "the job copied the dirty clusters only");

  // The target holds the start-time data of exactly the dirty clusters, zeros elsewhere.
  const incData = readFile(inc);
  for (let c = 0; c < DISK / GRANULARITY; c++) {
    const piece = incData.subarray(c * GRANULARITY, (c + 1) * GRANULARITY);
    if (!plan.clusters.has(c)) assert.ok(isZero(piece), `cluster ${c} was not dirty: not copied`);
  }
  const applied = readFile(base);
  for (const c of plan.clusters)
    incData.copy(applied, c * GRANULARITY, c * GRANULARITY, (c + 1) * GRANULARITY);
  assertSameImage(applied, before, "full backup + incremental vs the source at the job's start");

  const after = await bitmapInfo(d.qmp, "disk0", "bitmap0");
  assert.equal(after.busy, false);
  assert.equal(after.count, GRANULARITY, "on success only the write made during the job is left");

  // A second incremental with bitmap-mode never copies that cluster and keeps the bitmap as it was.
  const inc2 = join(d.dir, "inc2.img");
  await d.qmp.execute("drive-backup", {
    "job-id": "inc2",
    device: "disk0",
    sync: "bitmap",
    bitmap: "bitmap0",
    "bitmap-mode": "never",
    target: inc2,
  });
  const done2 = await d.qmp.waitForEvent(jobEvent("inc2", "BLOCK_JOB_COMPLETED"), 60_000);
  assert.equal(done2.data.error, undefined);
  assert.equal(done2.data.len, GRANULARITY);
  assert.equal((await bitmapInfo(d.qmp, "disk0", "bitmap0")).count, GRANULARITY, "never: unchanged");
  const inc2Data = readFile(inc2);
  assert.ok(
    inc2Data.subarray(clean * GRANULARITY, clean * GRANULARITY + 4096).equals(Buffer.alloc(4096, 0xee)),
    "the second incremental holds the write",
  );
});

test("transaction: a bad action after a bitmap-add leaves no bitmap behind", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: DISK });
  await assertQmpError(
    d.qmp.execute("transaction", {
      actions: [
        { type: "block-dirty-bitmap-add", data: { node: "disk0", name: "bitmap0" } },
        { type: "blockdev-backup", data: { "job-id": "b", device: "disk0", sync: "full", target: "nope" } },
      ],
    }),
    "GenericError",
    /nope/,
  );
  assert.equal(await bitmapsOf(d.qmp, "disk0"), undefined, "the bitmap was not kept");
  // A bitmap added and used by an incremental backup in the same transaction.
  await d.qmp.execute("blockdev-add", { driver: "memory", "node-name": "m", size: DISK });
  await d.qmp.execute("transaction", {
    actions: [
      { type: "block-dirty-bitmap-add", data: { node: "disk0", name: "bitmap0" } },
      {
        type: "blockdev-backup",
        data: { "job-id": "i", device: "disk0", sync: "incremental", bitmap: "bitmap0", target: "m" },
      },
    ],
  });
  const done = await d.qmp.waitForEvent(jobEvent("i", "BLOCK_JOB_COMPLETED"), 60_000);
  assert.equal(done.data.error, undefined);
  assert.equal(done.data.len, 0, "a new bitmap is empty: nothing to copy");
});
