/**
 * blockdev-create, block_resize and query-blockstats through the real daemon: images made by a create
 * job and then served and written by qemu-io, the job's events next to those of the installed
 * qemu-storage-daemon 7.2, a create over a served image refused with the image intact, sizes seen by
 * nbdinfo and qemu-img after a resize, a resize refused while a backup job holds the node, and
 * stats counters against exactly what qemu-io did.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { QmpClient } from "../../src/qmp/client.js";
import { unixUri } from "../helpers/daemon.js";
import {
  assertQmpError,
  eventAfter,
  jobEventLog,
  serveWithQmp,
  statusEvent,
  type QmpDaemon,
} from "../helpers/jobs.js";
import { startQsd } from "../helpers/qsd.js";
import { run, runOk } from "../helpers/run.js";

const MiB = 1024 * 1024;

/** Runs blockdev-create and waits for the job to conclude; returns its query-jobs entry. */
async function create(
  qmp: QmpClient,
  id: string,
  options: Record<string, unknown>,
): Promise<Record<string, unknown>> {
  const mark = qmp.events.length;
  await qmp.execute("blockdev-create", { "job-id": id, options });
  await eventAfter(qmp, mark, statusEvent(id, "concluded"));
  const jobs = (await qmp.execute("query-jobs")) as Array<Record<string, unknown>>;
  const job = jobs.find((j) => j.id === id);
  assert.ok(job, `query-jobs lists ${id}`);
  return job;
}

function sha(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

async function nbdSize(uri: string): Promise<number> {
  return Number((await runOk("nbdinfo", ["--size", uri])).stdout.trim());
}

async function qemuImgSize(path: string): Promise<number> {
  const info = JSON.parse((await runOk("qemu-img", ["info", "-U", "--output=json", path])).stdout) as {
    "virtual-size": number;
  };
  return info["virtual-size"];
}

async function served(t: TestContext, sizeBytes = 4 * MiB): Promise<QmpDaemon> {
  return serveWithQmp(t, { sizeBytes });
}

test("blockdev-create makes an image that blockdev-add opens and qemu-io writes and reads through an export", async (t) => {
  const d = await served(t);
  const image = join(d.dir, "made.img");
  const job = await create(d.qmp, "c0", { driver: "file", filename: image, size: 8 * MiB });
  assert.deepEqual(job, {
    id: "c0",
    type: "create",
    status: "concluded",
    "current-progress": 1,
    "total-progress": 1,
  });
  assert.equal(statSync(image).size, 8 * MiB);
  // Not a block job: only status changes, and it is not in query-block-jobs.
  assert.deepEqual(jobEventLog(d.qmp, "c0"), ["created", "running", "waiting", "pending", "concluded"]);
  assert.deepEqual(await d.qmp.execute("query-block-jobs"), []);
  await assertQmpError(
    d.qmp.execute("block-job-cancel", { device: "c0" }),
    "DeviceNotActive",
    "Block job 'c0' not found",
  );

  // It stays concluded until job-dismiss, as in QEMU.
  const mark = d.qmp.events.length;
  await d.qmp.execute("job-dismiss", { id: "c0" });
  await eventAfter(d.qmp, mark, statusEvent("c0", "null"));
  assert.deepEqual(await d.qmp.execute("query-jobs"), []);

  await d.qmp.execute("blockdev-add", {
    driver: "raw",
    "node-name": "made",
    file: { driver: "file", filename: image },
  });
  await d.qmp.execute("block-export-add", {
    type: "nbd",
    id: "e1",
    "node-name": "made",
    name: "made",
    writable: true,
  });
  const uri = unixUri(d.daemon.socket, "made");
  await runOk("qemu-io", ["-f", "raw", uri, "-c", "write -P 0x5a 1M 64k"]);
  const read = await runOk("qemu-io", [
    "-f",
    "raw",
    uri,
    "-c",
    "read -P 0x5a 1M 64k",
    "-c",
    "read -P 0 0 1M",
  ]);
  assert.doesNotMatch(read.stdout + read.stderr, /Pattern verification failed/);
  assert.ok(
    readFileSync(image)
      .subarray(MiB, MiB + 64 * 1024)
      .every((b) => b === 0x5a),
    "the data is in the file",
  );
});

test("blockdev-create's events, replies and errors match qemu-storage-daemon 7.2's", async (t) => {
  const d = await served(t);
  const qsd = await startQsd(t);
  for (const [name, qmp, dir] of [
    ["drivetap", d.qmp, d.dir],
    ["qsd", qsd.qmp, qsd.dir],
  ] as const) {
    // An existing file is truncated and resized, as QEMU's file driver does.
    const existing = join(dir, "old.img");
    writeFileSync(existing, Buffer.alloc(8192, 0x77));
    const ok = await create(qmp, "ok", { driver: "file", filename: existing, size: 4096 });
    assert.equal(ok.error, undefined, name);
    assert.deepEqual(readFileSync(existing), Buffer.alloc(4096), `${name}: old contents gone`);
    const missingDir = join(dir, "nodir", "x.img");
    const failed = await create(qmp, "bad", { driver: "file", filename: missingDir, size: 4096 });
    assert.equal(failed.error, `Could not create '${missingDir}': No such file or directory`, name);
    assert.deepEqual(jobEventLog(qmp, "bad"), ["created", "running", "aborting", "concluded"], name);
    const meta = await create(qmp, "meta", {
      driver: "file",
      filename: join(dir, "m.img"),
      size: 1,
      preallocation: "metadata",
    });
    assert.equal(meta.error, "Unsupported preallocation mode: metadata", name);
    const negative = await create(qmp, "neg", { driver: "file", filename: join(dir, "n.img"), size: -1 });
    assert.equal(negative.error, "Could not resize file: Invalid argument", name);
    const full = await create(qmp, "full", {
      driver: "file",
      filename: join(dir, "f.img"),
      size: MiB,
      preallocation: "full",
    });
    assert.equal(full.error, undefined, name);
    assert.ok(statSync(join(dir, "f.img")).blocks * 512 >= MiB, `${name}: preallocation=full allocates`);
    const jobs = (await qmp.execute("query-jobs")) as Array<Record<string, unknown>>;
    assert.deepEqual(
      jobs.map((j) => Object.keys(j).sort()).sort(),
      [
        ["current-progress", "id", "status", "total-progress", "type"],
        ["current-progress", "error", "id", "status", "total-progress", "type"],
        ["current-progress", "error", "id", "status", "total-progress", "type"],
        ["current-progress", "error", "id", "status", "total-progress", "type"],
        ["current-progress", "id", "status", "total-progress", "type"],
      ].sort(),
      name,
    );
    await assertQmpError(
      qmp.execute("blockdev-create", {
        "job-id": "ok",
        options: { driver: "file", filename: existing, size: 1 },
      }),
      "GenericError",
      "Job ID 'ok' already in use",
    );
    await assertQmpError(
      qmp.execute("blockdev-create", { "job-id": "r", options: { driver: "raw" } }),
      "GenericError",
      "Driver does not support blockdev-create",
    );
    await assertQmpError(
      qmp.execute("blockdev-create", { "job-id": "r", options: { driver: "nbd" } }),
      "GenericError",
      "Driver does not support blockdev-create",
    );
    await assertQmpError(
      qmp.execute("blockdev-create", { "job-id": "r", options: { filename: existing } }),
      "GenericError",
      "Parameter 'options.driver' is missing",
    );
    await assertQmpError(
      qmp.execute("blockdev-create", { options: { driver: "file", filename: existing, size: 1 } }),
      "GenericError",
      "Parameter 'job-id' is missing",
    );
    await assertQmpError(
      qmp.execute("blockdev-create", { "job-id": "r", options: { driver: "file", filename: existing } }),
      "GenericError",
      "Parameter 'options.size' is missing",
    );
    await assertQmpError(qmp.execute("job-dismiss", { id: "nope" }), "GenericError", "Job not found");
    for (const id of ["ok", "bad", "meta", "neg", "full"]) await qmp.execute("job-dismiss", { id });
    assert.deepEqual(await qmp.execute("query-jobs"), [], name);
  }
});

test("blockdev-create over a file a node has open is refused and the file stays intact", async (t) => {
  const content = Buffer.alloc(2 * MiB, 0x3c);
  const d = await serveWithQmp(t, { content });
  const before = sha(d.image);
  // Another name for the same file: the refusal goes by device and inode.
  const alias = join(d.dir, "alias.img");
  await runOk("ln", [d.image, alias]);
  for (const [id, filename] of [
    ["same", d.image],
    ["alias", alias],
  ] as const) {
    const job = await create(d.qmp, id, { driver: "file", filename, size: 4096 });
    assert.equal(job.error, `'${filename}' is in use by node 'disk0'`);
  }
  assert.equal(sha(d.image), before, "the served image is untouched");
  assert.equal(statSync(d.image).size, 2 * MiB);
  const read = await runOk("qemu-io", ["-f", "raw", d.uri, "-c", "read -P 0x3c 0 2M"]);
  assert.doesNotMatch(read.stdout + read.stderr, /Pattern verification failed/);
});

test("block_resize grows and shrinks a file node: nbdinfo on a new connection and qemu-img info see it", async (t) => {
  const d = await served(t, 4 * MiB);
  await d.qmp.execute("block-dirty-bitmap-add", { node: "disk0", name: "b0", granularity: 65536 });
  await runOk("qemu-io", ["-f", "raw", d.uri, "-c", "write -P 0x11 0 1M"]);
  await d.qmp.execute("block_resize", { device: "disk0", size: 16 * MiB });
  assert.equal(await nbdSize(d.uri), 16 * MiB);
  assert.equal(await qemuImgSize(d.image), 16 * MiB);
  // The grown part reads zeros and is writable; the old data stays.
  await runOk("qemu-io", ["-f", "raw", d.uri, "-c", "write -P 0x22 15M 64k"]);
  const check = await runOk("qemu-io", [
    "-f",
    "raw",
    d.uri,
    "-c",
    "read -P 0x11 0 1M",
    "-c",
    "read -P 0 8M 1M",
    "-c",
    "read -P 0x22 15M 64k",
  ]);
  assert.doesNotMatch(check.stdout + check.stderr, /Pattern verification failed/);
  // The bitmap grew with the disk and recorded the write past the old end.
  const bitmaps = async (): Promise<{ count: number }[]> => {
    const nodes = (await d.qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
    return nodes.find((n) => n["node-name"] === "disk0")!["dirty-bitmaps"] as { count: number }[];
  };
  assert.equal((await bitmaps())[0].count, MiB + 64 * 1024, "the first MiB and the write past the old end");

  await d.qmp.execute("block_resize", { "node-name": "disk0", size: MiB + 4096 });
  assert.equal(await nbdSize(d.uri), MiB + 4096);
  assert.equal(await qemuImgSize(d.image), MiB + 4096);
  assert.equal((await bitmaps())[0].count, MiB, "clusters past the new end are dropped, the rest kept");
  const after = await runOk("qemu-io", [
    "-f",
    "raw",
    d.uri,
    "-c",
    "read -P 0x11 0 1M",
    "-c",
    "read -P 0 1M 4k",
  ]);
  assert.doesNotMatch(after.stdout + after.stderr, /Pattern verification failed/);
});

test("block_resize refuses what cannot be resized, with QEMU's texts", async (t) => {
  const d = await served(t, 4 * MiB);
  await assertQmpError(
    d.qmp.execute("block_resize", { "node-name": "disk0", size: -1 }),
    "GenericError",
    "Parameter 'size' expects a >0 size",
  );
  await assertQmpError(
    d.qmp.execute("block_resize", { "node-name": "nope", size: 1 }),
    "GenericError",
    "Cannot find device='' nor node-name='nope'",
  );
  await assertQmpError(
    d.qmp.execute("block_resize", { device: "nope", size: 1 }),
    "GenericError",
    "Cannot find device='nope' nor node-name=''",
  );
  await assertQmpError(
    d.qmp.execute("block_resize", { size: 1 }),
    "GenericError",
    "Cannot find device='' nor node-name=''",
  );
  await assertQmpError(
    d.qmp.execute("block-resize", { "node-name": "disk0", size: 1 }),
    "CommandNotFound",
    /block-resize/,
  );
  await d.qmp.execute("blockdev-add", { driver: "null-co", "node-name": "n0", size: MiB });
  await assertQmpError(
    d.qmp.execute("block_resize", { "node-name": "n0", size: 2 * MiB }),
    "GenericError",
    "Image format driver does not support resize",
  );
  const ro = join(d.dir, "ro.img");
  writeFileSync(ro, Buffer.alloc(4096));
  await d.qmp.execute("blockdev-add", { driver: "file", "node-name": "ro", filename: ro, "read-only": true });
  await assertQmpError(
    d.qmp.execute("block_resize", { "node-name": "ro", size: 8192 }),
    "GenericError",
    "Image is read-only",
  );
  await d.qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "r",
    server: { type: "unix", path: d.daemon.socket },
    export: "",
  });
  await assertQmpError(
    d.qmp.execute("block_resize", { "node-name": "r", size: 8192 }),
    "GenericError",
    "Image format driver does not support resize",
  );
  // A huge sparse memory disk is fine; a bitmap that would need gigabytes is refused first.
  await d.qmp.execute("blockdev-add", { driver: "memory", "node-name": "m", size: MiB });
  await d.qmp.execute("block-dirty-bitmap-add", { node: "m", name: "b", granularity: 512 });
  await assertQmpError(
    d.qmp.execute("block_resize", { "node-name": "m", size: 2 ** 50 }),
    "GenericError",
    /dirty bitmap 'b' would need/,
  );
  await d.qmp.execute("block-dirty-bitmap-remove", { node: "m", name: "b" });
  await d.qmp.execute("block_resize", { "node-name": "m", size: 2 ** 50 });
  const nodes = (await d.qmp.execute("query-named-block-nodes")) as Array<{
    "node-name": string;
    image: { "virtual-size": number };
  }>;
  assert.equal(nodes.find((n) => n["node-name"] === "m")!.image["virtual-size"], 2 ** 50);
});

test("block_resize is refused while a backup job holds the node, and works again after it", async (t) => {
  const d = await served(t, 8 * MiB);
  await d.qmp.execute("blockdev-add", { driver: "memory", "node-name": "t", size: 8 * MiB });
  // Slow enough to still be running while we try.
  await d.qmp.execute("blockdev-backup", {
    "job-id": "j",
    device: "disk0",
    target: "t",
    sync: "full",
    speed: 64 * 1024,
  });
  await assertQmpError(
    d.qmp.execute("block_resize", { "node-name": "disk0", size: 16 * MiB }),
    "GenericError",
    "Permission conflict on node 'disk0': permissions 'resize' are both required by block_resize and unshared by block job j (backup source)",
  );
  await assertQmpError(
    d.qmp.execute("block_resize", { "node-name": "t", size: 16 * MiB }),
    "GenericError",
    /unshared by block job j \(backup target\)/,
  );
  assert.equal(await nbdSize(d.uri), 8 * MiB, "the size did not change");
  const mark = d.qmp.events.length;
  await d.qmp.execute("block-job-cancel", { device: "j", force: true });
  await eventAfter(d.qmp, mark, statusEvent("j", "null"));
  await d.qmp.execute("block_resize", { "node-name": "disk0", size: 16 * MiB });
  assert.equal(await nbdSize(d.uri), 16 * MiB);
});

test("block_resize of a raw node over a child node resizes both, in the raw node's export", async (t) => {
  const d = await served(t, MiB);
  const image = join(d.dir, "child.img");
  writeFileSync(image, Buffer.alloc(MiB));
  await d.qmp.execute("blockdev-add", { driver: "file", "node-name": "f", filename: image });
  await d.qmp.execute("blockdev-add", { driver: "raw", "node-name": "r", file: "f" });
  await d.qmp.execute("block-export-add", {
    type: "nbd",
    id: "er",
    "node-name": "r",
    name: "r",
    writable: true,
  });
  await d.qmp.execute("block_resize", { "node-name": "r", size: 3 * MiB });
  assert.equal(await nbdSize(unixUri(d.daemon.socket, "r")), 3 * MiB);
  assert.equal(statSync(image).size, 3 * MiB);
  const nodes = (await d.qmp.execute("query-named-block-nodes")) as Array<{
    "node-name": string;
    image: { "virtual-size": number };
  }>;
  assert.equal(nodes.find((n) => n["node-name"] === "f")!.image["virtual-size"], 3 * MiB);
});

interface Stats {
  [k: string]: number | boolean | unknown[];
}

test("query-blockstats counts what qemu-io did, with QEMU's members and types (compared with qemu-storage-daemon)", async (t) => {
  const d = await served(t, 4 * MiB);
  const statsOf = async (args: Record<string, unknown> = {}): Promise<Array<Record<string, unknown>>> =>
    (await d.qmp.execute("query-blockstats", args)) as Array<Record<string, unknown>>;
  const before = (await statsOf())[0].stats as Stats;
  assert.equal(before.idle_time_ns, undefined, "no idle time before any I/O");
  await runOk("qemu-io", [
    "-f",
    "raw",
    d.uri,
    "-c",
    "write -P 1 0 64k",
    "-c",
    "write -P 2 1M 4k",
    "-c",
    "write -z 2M 128k",
    "-c",
    "read 0 8k",
    "-c",
    "read 1M 4k",
    "-c",
    "read 3M 512",
    "-c",
    "discard 2M 64k",
    "-c",
    "flush",
  ]);
  const [entry] = await statsOf();
  assert.equal(entry.device, "disk0");
  assert.equal(entry["node-name"], "disk0");
  const s = entry.stats as Stats;
  assert.equal(s.rd_operations, 3);
  assert.equal(s.rd_bytes, 8192 + 4096 + 512);
  assert.equal(s.wr_operations, 3, "two writes and a write-zeroes");
  assert.equal(s.wr_bytes, 65536 + 4096 + 131072);
  assert.equal(s["x-zero-operations"], 1);
  assert.equal(s["x-zero-bytes"], 131072);
  assert.equal(s.unmap_operations, 1);
  assert.equal(s.unmap_bytes, 65536);
  assert.equal(s.wr_highest_offset, 2 * MiB + 131072);
  assert.ok((s.flush_operations as number) >= 1, "qemu-io's flush");
  for (const k of ["rd_total_time_ns", "wr_total_time_ns", "unmap_total_time_ns"]) {
    assert.ok((s[k] as number) > 0, `${k} > 0`);
  }
  assert.ok(typeof s.idle_time_ns === "number" && s.idle_time_ns >= 0);
  assert.equal(s.failed_rd_operations, 0);
  assert.equal(s.invalid_wr_operations, 0);

  // A request the node refuses counts as invalid, one the driver fails as failed.
  await d.qmp.execute("blockdev-add", {
    driver: "error-inject",
    "node-name": "bad",
    "fail-writes": true,
    file: { driver: "memory", size: MiB },
  });
  await d.qmp.execute("block-export-add", {
    type: "nbd",
    id: "eb",
    "node-name": "bad",
    name: "bad",
    writable: true,
  });
  const badUri = unixUri(d.daemon.socket, "bad");
  const failedWrite = await run("qemu-io", ["-f", "raw", badUri, "-c", "write 0 4k"]);
  assert.match(failedWrite.stdout + failedWrite.stderr, /write failed/);
  await runOk("qemu-io", ["-f", "raw", badUri, "-c", "read 0 4k"]);
  const bad = (await statsOf({ "query-nodes": true })).find((e) => e["node-name"] === "bad")!.stats as Stats;
  assert.ok((bad.failed_wr_operations as number) >= 1, "the injected write error is failed");
  assert.equal(bad.rd_operations, 1);

  // The same members with the same JSON types as qemu-storage-daemon's node stats.
  const qsd = await startQsd(t);
  const qsdImage = join(qsd.dir, "q.img");
  writeFileSync(qsdImage, Buffer.alloc(MiB));
  // The layout `drivetap serve IMAGE` builds: a raw node over a file node, whose stats are `parent`.
  await qsd.qmp.execute("blockdev-add", { driver: "file", "node-name": "q", filename: qsdImage });
  await qsd.qmp.execute("blockdev-add", { driver: "raw", "node-name": "qr", file: "q" });
  const theirStats = (await qsd.qmp.execute("query-blockstats", { "query-nodes": true })) as Array<
    Record<string, unknown>
  >;
  const theirs = theirStats.find((e) => e["node-name"] === "q")!;
  const theirRaw = theirStats.find((e) => e["node-name"] === "qr")!;
  const ourStats = await statsOf({ "query-nodes": true });
  const ours = ourStats.find((e) => e["node-name"] === "#block-disk0-file")!;
  const ourRaw = ourStats.find((e) => e["node-name"] === "disk0")!;
  const shape = (o: Record<string, unknown>): Array<[string, string]> =>
    Object.entries(o)
      .filter(([k]) => !k.startsWith("x-") && k !== "idle_time_ns")
      .map(([k, v]): [string, string] => [k, Array.isArray(v) ? "array" : typeof v])
      .sort();
  assert.deepEqual(shape(ours.stats as Stats), shape(theirs.stats as Stats));
  const members = (o: Record<string, unknown>): string[] =>
    Object.keys(o)
      .filter((k) => k !== "driver-specific")
      .sort();
  assert.deepEqual(members(ours), members(theirs));
  assert.deepEqual(members(ourRaw), members(theirRaw));
  assert.deepEqual(members(ourRaw), ["node-name", "parent", "stats"]);
  assert.deepEqual(shape(ourRaw.stats as Stats), shape(theirRaw.stats as Stats));
  // A file node carries QEMU's BlockStatsSpecificFile.
  const fileImage = join(d.dir, "f.img");
  writeFileSync(fileImage, Buffer.alloc(MiB));
  await d.qmp.execute("blockdev-add", { driver: "file", "node-name": "f", filename: fileImage });
  const ourFile = (await statsOf({ "query-nodes": true })).find((e) => e["node-name"] === "f")!;
  assert.deepEqual(
    Object.keys(ourFile["driver-specific"] as object).sort(),
    Object.keys(theirs["driver-specific"] as object).sort(),
  );
});

test("block_resize takes the resize lock: another process that does not share resize keeps the size", async (t) => {
  const d = await served(t, MiB);
  const image = join(d.dir, "shared.img");
  writeFileSync(image, Buffer.alloc(MiB));
  await d.qmp.execute("blockdev-add", { driver: "file", "node-name": "s", filename: image });
  await d.qmp.execute("block_resize", { "node-name": "s", size: 2 * MiB });
  // qemu-nbd -r reads the image and, like every qemu-nbd, refuses to share resize. --fork returns
  // once it serves.
  const pidfile = join(d.dir, "qemu-nbd.pid");
  await runOk("qemu-nbd", [
    "-r",
    "-f",
    "raw",
    "--fork",
    "--pid-file",
    pidfile,
    `--socket=${join(d.dir, "qn.sock")}`,
    image,
  ]);
  // The pid is read now: the temp directory (and the pid file in it) may be gone by the time the
  // after-hooks run, and a forked qemu-nbd would outlive the test.
  const pid = Number(readFileSync(pidfile, "utf8"));
  t.after(() => {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // Already gone.
    }
  });
  await assertQmpError(
    d.qmp.execute("block_resize", { "node-name": "s", size: 4 * MiB }),
    "GenericError",
    `Failed to get "resize" lock. Is another process using the image [${image}]?`,
  );
  assert.equal(statSync(image).size, 2 * MiB);
  // The node's own locks are as before: it still writes.
  await d.qmp.execute("block-export-add", {
    type: "nbd",
    id: "es",
    "node-name": "s",
    name: "s",
    writable: true,
  });
  await runOk("qemu-io", ["-f", "raw", unixUri(d.daemon.socket, "s"), "-c", "write -P 9 0 4k"]);
});

test("blockdev-create driver=qcow2 writes an image into a file node that qemu-img checks and drivetap serves", async (t) => {
  const d = await served(t);
  const image = join(d.dir, "made.qcow2");
  // QEMU's workflow: create and add the file node, then create the format inside it.
  await create(d.qmp, "c-file", { driver: "file", filename: image, size: 0 });
  await d.qmp.execute("blockdev-add", { driver: "file", "node-name": "made-file", filename: image });
  const refused = await create(d.qmp, "c-enc", {
    driver: "qcow2",
    file: "made-file",
    size: 64 * MiB,
    encrypt: { format: "luks", "key-secret": "s0" },
  });
  assert.match(String(refused.error), /drivetap cannot create qcow2 images with encryption/);
  assert.equal(statSync(image).size, 0, "a refused create writes nothing");
  const job = await create(d.qmp, "c-qcow2", {
    driver: "qcow2",
    file: "made-file",
    size: 64 * MiB,
    "cluster-size": 65536,
  });
  assert.equal(job.error, undefined, `the create job succeeded: ${String(job.error)}`);
  assert.equal(await qemuImgSize(image), 64 * MiB);
  await runOk("qemu-img", ["check", "-U", image]);

  // The file node now holds the image: a qcow2 node over it serves it.
  await d.qmp.execute("blockdev-add", { driver: "qcow2", "node-name": "made", file: "made-file" });
  await d.qmp.execute("block-export-add", {
    type: "nbd",
    id: "e1",
    "node-name": "made",
    name: "made",
    writable: true,
  });
  const uri = unixUri(d.daemon.socket, "made");
  assert.equal(await nbdSize(uri), 64 * MiB);
  await runOk("qemu-io", ["-f", "raw", uri, "-c", "write -P 0x7c 5M 192k"]);
  const read = await runOk("qemu-io", [
    "-f",
    "raw",
    uri,
    "-c",
    "read -P 0x7c 5M 192k",
    "-c",
    "read -P 0 0 5M",
  ]);
  assert.doesNotMatch(read.stdout + read.stderr, /Pattern verification failed/);

  // A file node in use (under the qcow2 node) cannot be recreated.
  const busy = await create(d.qmp, "c-busy", { driver: "qcow2", file: "made-file", size: 1 * MiB });
  assert.match(String(busy.error), /busy/);
  await d.qmp.execute("block-export-del", { id: "e1" });
  await d.qmp.execute("blockdev-del", { "node-name": "made" });
  await d.qmp.execute("blockdev-del", { "node-name": "made-file" });
  const check = await runOk("qemu-img", ["check", "--output=json", image]);
  const result = JSON.parse(check.stdout) as { corruptions?: number; leaks?: number };
  assert.equal(result.corruptions ?? 0, 0);
  assert.equal(result.leaks ?? 0, 0);
  const verify = await runOk("qemu-io", ["-f", "qcow2", image, "-c", "read -P 0x7c 5M 192k"]);
  assert.doesNotMatch(verify.stdout + verify.stderr, /Pattern verification failed/);
});
