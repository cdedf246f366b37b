/**
 * Persistent dirty bitmaps inside qcow2 images, against QEMU's own tools: bitmaps qemu-img and
 * qemu-io wrote are loaded and used by drivetap; what drivetap stores at a clean close is what
 * qemu-img info, qemu-img check and qemu-storage-daemon 7.2 read back (same counts, same
 * x-debug-block-dirty-bitmap-sha256); an incremental backup by QSD with drivetap's bitmap equals
 * drivetap's own; a kill -9 leaves the bitmaps inconsistent, as QEMU's are.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { QmpClient } from "../../src/qmp/client.js";
import { startDaemon, stopAfter, type RunningDaemon } from "../helpers/daemon.js";
import { assertQmpError, connectQmp, jobEvent } from "../helpers/jobs.js";
import { assertChecks, assertSame, qemuImgCreate, qemuIo } from "../helpers/qcow2.js";
import { startQsd } from "../helpers/qsd.js";
import { run, runOk, tempDir } from "../helpers/run.js";

const KiB = 1024;
const GRANULARITY = 64 * KiB;
const DISK = "64M";

interface BitmapInfo {
  name: string;
  granularity: number;
  count: number;
  recording: boolean;
  persistent: boolean;
  inconsistent?: boolean;
}

async function bitmapsOf(qmp: QmpClient, node: string): Promise<BitmapInfo[]> {
  const nodes = (await qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
  const n = nodes.find((x) => x["node-name"] === node);
  assert.ok(n, `node ${node} is listed`);
  return ((n["dirty-bitmaps"] as BitmapInfo[] | undefined) ?? []).sort((a, b) =>
    a.name.localeCompare(b.name),
  );
}

async function sha256Of(qmp: QmpClient, node: string, name: string): Promise<string> {
  const r = (await qmp.execute("x-debug-block-dirty-bitmap-sha256", { node, name })) as { sha256: string };
  return r.sha256;
}

interface Served {
  readonly daemon: RunningDaemon;
  readonly qmp: QmpClient;
}

async function serve(t: TestContext, image: string, args: readonly string[] = []): Promise<Served> {
  const qmpPath = join(tempDir(t, "drivetap-qbm-qmp-"), "qmp.sock");
  const daemon = await startDaemon({ image, args: ["--qmp", qmpPath, ...args] });
  stopAfter(t, daemon);
  return { daemon, qmp: await connectQmp(t, qmpPath) };
}

/** QSD 7.2 with the image as node d0 (file node f0). */
async function qsdOn(t: TestContext, image: string): Promise<QmpClient> {
  const { qmp } = await startQsd(t, [
    "--blockdev",
    `driver=file,filename=${image},node-name=f0`,
    "--blockdev",
    "driver=qcow2,file=f0,node-name=d0",
  ]);
  return qmp;
}

/** What QSD says of the image's bitmaps: their entries and SHA-256s; QSD is stopped cleanly. */
async function qsdView(
  t: TestContext,
  image: string,
): Promise<{ list: BitmapInfo[]; sha: Record<string, string> }> {
  const qmp = await qsdOn(t, image);
  const list = await bitmapsOf(qmp, "d0");
  const sha: Record<string, string> = {};
  for (const b of list) if (b.inconsistent !== true) sha[b.name] = await sha256Of(qmp, "d0", b.name);
  await qmp.execute("quit").catch(() => undefined);
  await qmp.closed;
  return { list, sha };
}

interface QemuImgBitmap {
  name: string;
  granularity: number;
  flags: string[];
}

async function imageBitmaps(image: string): Promise<QemuImgBitmap[]> {
  const info = JSON.parse((await runOk("qemu-img", ["info", "-U", "--output=json", image])).stdout) as {
    "format-specific": { data: { bitmaps?: QemuImgBitmap[] } };
  };
  return (info["format-specific"].data.bitmaps ?? []).sort((a, b) => a.name.localeCompare(b.name));
}

test("qcow2 bitmaps written by qemu-img and qemu-io are loaded and kept up to date by drivetap; what it stores at close QEMU reads back bit for bit", async (t) => {
  const dir = tempDir(t, "drivetap-qbm-");
  const image = join(dir, "disk.qcow2");
  await qemuImgCreate(image, DISK);
  await runOk("qemu-img", ["bitmap", "--add", image, "b0"]);
  await runOk("qemu-img", ["bitmap", "--add", "-g", "4096", "--disable", image, "off"]);
  // QEMU records these in b0 (clusters 0, 160 and 161) and stores it when qemu-io closes.
  await qemuIo(image, "qcow2", ["write -P 0x11 0 64k", "write -P 0x12 10M 100k"]);
  const qemuBefore = await qsdView(t, image);
  assert.equal(qemuBefore.list.find((b) => b.name === "b0")?.count, 3 * GRANULARITY);

  const { daemon, qmp } = await serve(t, image);
  const loaded = await bitmapsOf(qmp, "disk0");
  assert.deepEqual(
    loaded.map((b) => [b.name, b.granularity, b.count, b.recording, b.persistent, b.inconsistent === true]),
    [
      ["b0", GRANULARITY, 3 * GRANULARITY, true, true, false],
      ["off", 4096, 0, false, true, false],
    ],
  );
  assert.equal(await sha256Of(qmp, "disk0", "b0"), qemuBefore.sha.b0, "drivetap loaded QEMU's bits");
  assert.deepEqual(
    (await imageBitmaps(image)).map((b) => [b.name, b.flags]),
    [
      ["b0", ["in-use", "auto"]],
      ["off", ["in-use"]],
    ],
    "a writable open marks the bitmaps in use before anything is written",
  );
  const block = (await qmp.execute("query-block")) as Array<{ inserted: { "dirty-bitmaps"?: BitmapInfo[] } }>;
  assert.equal(block[0].inserted["dirty-bitmaps"]?.find((b) => b.name === "b0")?.count, 3 * GRANULARITY);

  await qmp.execute("block-dirty-bitmap-add", {
    node: "disk0",
    name: "new",
    persistent: true,
    granularity: 128 * KiB,
  });
  await qemuIo(daemon.uri, "raw", [
    "write -P 0x21 20M 4k",
    "write -z 30M 64k",
    "discard 40M 64k",
    "write 0 512",
  ]);
  const b0 = (await bitmapsOf(qmp, "disk0")).find((b) => b.name === "b0")!;
  assert.equal(b0.count, 6 * GRANULARITY, "three more clusters (cluster 0 was dirty already)");
  const mine: Record<string, string> = {};
  for (const name of ["b0", "new", "off"]) mine[name] = await sha256Of(qmp, "disk0", name);
  const counts = Object.fromEntries((await bitmapsOf(qmp, "disk0")).map((b) => [b.name, b.count]));
  assert.equal(counts.new, 4 * 128 * KiB, "four writes, each in its own 128 KiB cluster");
  assert.equal(await daemon.stop(), 0);

  assert.deepEqual(
    (await imageBitmaps(image)).map((b) => [b.name, b.granularity, b.flags]),
    [
      ["b0", GRANULARITY, ["auto"]],
      ["new", 128 * KiB, ["auto"]],
      ["off", 4096, []],
    ],
  );
  await assertChecks(image);
  const qemuAfter = await qsdView(t, image);
  assert.deepEqual(
    Object.fromEntries(qemuAfter.list.map((b) => [b.name, b.count])),
    counts,
    "QSD 7.2 counts what drivetap counted",
  );
  assert.deepEqual(qemuAfter.sha, mine, "QSD 7.2 reads drivetap's bits exactly");
  await assertChecks(image);
});

test("qcow2 bitmaps: an incremental backup by QSD 7.2 with drivetap's bitmap equals drivetap's own", async (t) => {
  const dir = tempDir(t, "drivetap-qbm-inc-");
  const image = join(dir, "disk.qcow2");
  await qemuImgCreate(image, DISK);
  await qemuIo(image, "qcow2", ["write -P 0x31 0 8M"]);
  {
    const { daemon, qmp } = await serve(t, image);
    await qmp.execute("block-dirty-bitmap-add", { node: "disk0", name: "inc", persistent: true });
    await qemuIo(daemon.uri, "raw", [
      "write -P 0x32 1M 64k",
      "write -P 0x33 5M 200k",
      "write -P 0x34 50M 4k",
    ]);
    assert.equal(await daemon.stop(), 0);
  }
  const copy = join(dir, "copy.qcow2");
  copyFileSync(image, copy);

  // QSD's backup, from the copy.
  const qsdTarget = join(dir, "qsd-target.raw");
  await qemuImgCreate(qsdTarget, DISK, { format: "raw" });
  const qsd = await qsdOn(t, copy);
  await qsd.execute("blockdev-add", { driver: "file", filename: qsdTarget, "node-name": "t0" });
  await qsd.execute("blockdev-backup", {
    "job-id": "j",
    device: "d0",
    target: "t0",
    sync: "incremental",
    bitmap: "inc",
  });
  const qsdDone = await qsd.waitForEvent(jobEvent("j", "BLOCK_JOB_COMPLETED"), 60_000);
  assert.equal(qsdDone.data.error, undefined);
  await qsd.execute("quit").catch(() => undefined);

  // drivetap's, from the image.
  const mineTarget = join(dir, "drivetap-target.raw");
  const { daemon, qmp } = await serve(t, image);
  await qmp.execute("drive-backup", {
    "job-id": "j",
    device: "disk0",
    sync: "incremental",
    bitmap: "inc",
    target: mineTarget,
    format: "raw", // a new target takes the source's format (qcow2) otherwise, as in QEMU
  });
  const done = await qmp.waitForEvent(jobEvent("j", "BLOCK_JOB_COMPLETED"), 60_000);
  assert.equal(done.data.error, undefined);
  assert.equal((await bitmapsOf(qmp, "disk0"))[0].count, 0, "the backup cleared what it copied");
  assert.equal(await daemon.stop(), 0);

  await assertSame(qsdTarget, mineTarget);
  // Not two empty files: the dirty clusters hold the source's data, the clean ones zeros.
  const target = readFileSync(mineTarget);
  assert.equal(target[1024 * KiB], 0x32);
  assert.equal(target[5 * 1024 * KiB + 100 * KiB], 0x33);
  assert.equal(target[50 * 1024 * KiB], 0x34);
  assert.equal(target[2 * 1024 * KiB], 0, "a clean cluster is not copied");
  // Both cleared the bitmap on success and stored that.
  assert.deepEqual(
    (await qsdView(t, image)).list.map((b) => b.count),
    [0],
  );
  await assertChecks(image);
  await assertChecks(copy);
});

test("qcow2 bitmaps after kill -9: inconsistent, as QSD 7.2 reports too; unusable but removable; a resize is refused", async (t) => {
  const dir = tempDir(t, "drivetap-qbm-crash-");
  const image = join(dir, "disk.qcow2");
  await qemuImgCreate(image, DISK);
  await runOk("qemu-img", ["bitmap", "--add", image, "b0"]);
  {
    const { daemon, qmp } = await serve(t, image);
    await qmp.execute("block-dirty-bitmap-add", { node: "disk0", name: "b1", persistent: true });
    await qemuIo(daemon.uri, "raw", ["write -P 0x41 0 64k"]);
    daemon.proc.kill("SIGKILL");
    await daemon.exited;
  }
  // b1 was never stored (QEMU stores new bitmaps at close too); b0 stays in use.
  assert.deepEqual(
    (await imageBitmaps(image)).map((b) => [b.name, b.flags]),
    [["b0", ["in-use", "auto"]]],
  );
  await runOk("qemu-img", ["check", "-r", "all", image]);
  const qemu = await qsdView(t, image);
  assert.deepEqual(
    qemu.list.map((b) => [b.name, b.inconsistent, b.recording, b.count]),
    [["b0", true, false, 0]],
  );

  const { daemon, qmp } = await serve(t, image);
  await daemon.waitForStderr(/bitmap is inconsistent/);
  assert.deepEqual(
    (await bitmapsOf(qmp, "disk0")).map((b) => [b.name, b.inconsistent, b.recording, b.count, b.persistent]),
    [["b0", true, false, 0, true]],
  );
  const unusable = "Bitmap 'b0' is inconsistent and cannot be used";
  for (const cmd of ["block-dirty-bitmap-clear", "block-dirty-bitmap-enable", "block-dirty-bitmap-disable"]) {
    await assertQmpError(qmp.execute(cmd, { node: "disk0", name: "b0" }), "GenericError", unusable);
  }
  await assertQmpError(
    qmp.execute("drive-backup", {
      "job-id": "j",
      device: "disk0",
      sync: "incremental",
      bitmap: "b0",
      target: join(dir, "t.raw"),
    }),
    "GenericError",
    unusable,
  );
  await assertQmpError(
    qmp.execute("block_resize", { "node-name": "disk0", size: 128 * 1024 * 1024 }),
    "GenericError",
    "Cannot resize node 'disk0': it has the persistent dirty bitmap 'b0'",
  );
  await qmp.execute("block-dirty-bitmap-remove", { node: "disk0", name: "b0" });
  assert.deepEqual(await imageBitmaps(image), [], "removed from the image at once, as QEMU does");
  assert.equal(await daemon.stop(), 0);
  await assertChecks(image);
});

test("qcow2 bitmaps: refusals with QEMU's reasons (v2 image, read-only), and a stale extension (autoclear bit cleared by an older writer) is ignored and dropped", async (t) => {
  const dir = tempDir(t, "drivetap-qbm-refuse-");
  const v2 = join(dir, "v2.qcow2");
  await qemuImgCreate(v2, "16M", { options: ["compat=0.10"] });
  {
    const { daemon, qmp } = await serve(t, v2);
    await assertQmpError(
      qmp.execute("block-dirty-bitmap-add", { node: "disk0", name: "x", persistent: true }),
      "GenericError",
      "Can't make bitmap 'x' persistent in 'disk0': Cannot store dirty bitmaps in qcow2 v2 files",
    );
    await qmp.execute("block-dirty-bitmap-add", { node: "disk0", name: "x" });
    assert.equal(await daemon.stop(), 0);
  }
  const ro = join(dir, "ro.qcow2");
  await qemuImgCreate(ro, "16M");
  await runOk("qemu-img", ["bitmap", "--add", ro, "b0"]);
  {
    const { daemon, qmp } = await serve(t, ro, ["--read-only"]);
    assert.deepEqual(
      (await bitmapsOf(qmp, "disk0")).map((b) => b.name),
      ["b0"],
    );
    await assertQmpError(
      qmp.execute("block-dirty-bitmap-add", { node: "disk0", name: "x", persistent: true }),
      "GenericError",
      "Can't make bitmap 'x' persistent in 'disk0': the image is read-only",
    );
    assert.equal(await daemon.stop(), 0);
    assert.deepEqual(
      (await imageBitmaps(ro)).map((b) => b.flags),
      [["auto"]],
      "a read-only open marks nothing",
    );
  }

  // A writer without bitmap support clears autoclear bit 0; QEMU then ignores the extension.
  const stale = join(dir, "stale.qcow2");
  await qemuImgCreate(stale, "16M");
  await runOk("qemu-img", ["bitmap", "--add", stale, "old"]);
  const b = readFileSync(stale);
  b[95] &= ~1;
  writeFileSync(stale, b);
  const { daemon, qmp } = await serve(t, stale);
  await daemon.waitForStderr(/a program lacking bitmap support modified this image/);
  assert.deepEqual(await bitmapsOf(qmp, "disk0"), []);
  assert.equal(await daemon.stop(), 0);
  const info = await run("qemu-img", ["info", "--output=json", stale]);
  assert.doesNotMatch(info.stdout, /"bitmaps"/, "the stale extension is gone");
  // Its directory and table are leaked, as with QEMU; check -r reclaims them.
  const check = await run("qemu-img", ["check", stale]);
  assert.equal(check.code, 3, check.stdout);
  await runOk("qemu-img", ["check", "-r", "leaks", stale]);
  await assertChecks(stale);
});

test("qcow2 bitmaps of a blockdev-add'ed qcow2 node: stored at blockdev-del (not handed to its file node) and loaded again by the next blockdev-add", async (t) => {
  const dir = tempDir(t, "drivetap-qbm-del-");
  const image = join(dir, "disk.qcow2");
  await qemuImgCreate(image, "16M");
  await runOk("qemu-img", ["bitmap", "--add", image, "b0"]);
  const qmpPath = join(dir, "qmp.sock");
  const daemon = await startDaemon({ args: ["--qmp", qmpPath] });
  stopAfter(t, daemon);
  const qmp = await connectQmp(t, qmpPath);
  await qmp.execute("blockdev-add", { driver: "file", filename: image, "node-name": "f0" });
  const addQcow2 = () => qmp.execute("blockdev-add", { driver: "qcow2", file: "f0", "node-name": "q0" });
  await addQcow2();
  await qmp.execute("block-dirty-bitmap-add", { node: "q0", name: "n1", persistent: true, disabled: true });
  assert.deepEqual(
    (await bitmapsOf(qmp, "q0")).map((b) => b.name),
    ["b0", "n1"],
  );
  await qmp.execute("blockdev-del", { "node-name": "q0" });
  assert.deepEqual(await bitmapsOf(qmp, "f0"), [], "the file node does not inherit them");
  assert.deepEqual(
    (await imageBitmaps(image)).map((b) => [b.name, b.flags]),
    [
      ["b0", ["auto"]],
      ["n1", []],
    ],
  );
  await addQcow2();
  assert.deepEqual(
    (await bitmapsOf(qmp, "q0")).map((b) => [b.name, b.recording, b.inconsistent === true]),
    [
      ["b0", true, false],
      ["n1", false, false],
    ],
  );
  assert.equal(await daemon.stop(), 0);
  await assertChecks(image);
});
