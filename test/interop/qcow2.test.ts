/**
 * qcow2 images made by qemu-img, served by the real daemon and written through NBD with qemu-io; the
 * same qemu-io commands applied to a raw image give the expected disk, which `qemu-img compare` checks,
 * and `qemu-img check` must find no error in what drivetap wrote. Backing chains, compressed clusters,
 * internal snapshots (COPIED), v2 images, `drivetap create`, blockdev-add and format probing.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { CLI, startDaemon, stopAfter, unixUri } from "../helpers/daemon.js";
import { connectQmp } from "../helpers/jobs.js";
import { assertChecks, assertSame, dirtyFlag, qemuImgCreate, qemuIo } from "../helpers/qcow2.js";
import { run, runOk, tempDir } from "../helpers/run.js";
import { QmpError } from "../../src/qmp/errors.js";

const MiB = 1024 * 1024;

/** Writes, zeroes and discards covering whole and partial clusters of every size tested. */
const GUEST_OPS = [
  "write -P 0xa1 0 4k",
  "write -P 0xa2 1000 3000",
  "write -P 0xa3 3M 5M",
  "write -P 0xa4 20M 100k",
  "write -z 4M 2M",
  "write -z 20M 4k",
  "discard 5M 1M",
  "discard 20M 4100",
  "write -P 0xa5 63M 1M",
  "write -P 0xa6 5M 700",
  "write -z -u 40M 8M",
  "write -P 0xa7 41M 512",
];

function sha(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

async function serveImage(t: Parameters<typeof stopAfter>[0], image: string, args: readonly string[] = []) {
  const daemon = await startDaemon({ image, args });
  stopAfter(t, daemon);
  return daemon;
}

for (const cluster of ["512", "64k", "2M"]) {
  test(`qcow2 (${cluster} clusters, made by qemu-img): qemu-io's writes, zeroes and discards through NBD equal the same on raw, and qemu-img check is clean`, async (t) => {
    const dir = tempDir(t, "drivetap-qcow2-");
    const image = join(dir, "disk.qcow2");
    const raw = join(dir, "expected.raw");
    await qemuImgCreate(image, "64M", { options: [`cluster_size=${cluster}`] });
    await qemuImgCreate(raw, "64M", { format: "raw" });
    const daemon = await serveImage(t, image);
    assert.match(daemon.stdout(), /67108864 bytes/);
    await qemuIo(daemon.uri, "raw", GUEST_OPS);
    await qemuIo(raw, "raw", GUEST_OPS);
    // Read back through the daemon before it stops (the L2 cache answers).
    await assertSame(daemon.uri, raw);
    assert.equal(await daemon.stop(), 0);
    await assertChecks(image);
    await assertSame(image, raw);
    const info = JSON.parse((await runOk("qemu-img", ["info", "--output=json", image])).stdout) as {
      "dirty-flag": boolean;
      "format-specific": { data: { corrupt: boolean } };
    };
    assert.equal(info["dirty-flag"], false, "a clean close clears the dirty bit");
  });
}

test("qcow2 partial writes into new clusters: a fresh cluster past the file's end gets only its data, a reused freed cluster is padded with zeros (its old data never shows); reopened, both read the same and qemu-img check is clean", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-fill-");
  const image = join(dir, "fill.qcow2");
  await qemuImgCreate(image, "8M");
  const hostOf = async (guest: number): Promise<number | undefined> => {
    const map = JSON.parse((await runOk("qemu-img", ["map", "-U", "--output=json", image])).stdout) as Array<{
      start: number;
      length: number;
      offset?: number;
      data: boolean;
    }>;
    const e = map.find((x) => x.data && x.start <= guest && guest < x.start + x.length);
    return e?.offset === undefined ? undefined : e.offset + (guest - e.start);
  };
  const daemon = await serveImage(t, image);
  // Cluster 0 full of 0xaa, then discarded: after the flush its host cluster is free again.
  await qemuIo(daemon.uri, "raw", ["write -P 0xaa 0 64k", "flush"]);
  const old = await hostOf(0);
  assert.ok(old !== undefined);
  await qemuIo(daemon.uri, "raw", ["discard 0 64k", "flush", "flush"]);
  // 4 KiB into cluster 5 reuses that cluster; 4 KiB into cluster 9 goes past the end of the file.
  const reads = [
    "read -P 0 320k 4k",
    "read -P 0xbb 324k 4k",
    "read -P 0 328k 56k",
    "read -P 0 576k 8k",
    "read -P 0xcc 584k 4k",
    "read -P 0 588k 52k",
  ];
  await qemuIo(daemon.uri, "raw", ["write -P 0xbb 324k 4k", "write -P 0xcc 584k 4k", "flush", ...reads]);
  assert.equal(await hostOf(324 * 1024), old! + 4096, "cluster 5 reused the freed cluster");
  assert.equal(await daemon.stop(), 0);
  await assertChecks(image);
  await qemuIo(image, "qcow2", reads, true);
  const again = await serveImage(t, image);
  await qemuIo(again.uri, "raw", reads, true);
});

test("qcow2 backing chain: qcow2 over qcow2 over raw, relative names resolved next to each image; reads fall through, partial writes copy the rest from below, the backing files stay unchanged", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-chain-");
  const base = join(dir, "base.raw");
  const mid = join(dir, "mid.qcow2");
  const top = join(dir, "top.qcow2");
  const expected = join(dir, "expected.raw");
  await qemuImgCreate(base, "64M", { format: "raw" });
  await qemuIo(base, "raw", ["write -P 0x11 0 64M"]);
  await qemuImgCreate(mid, undefined, { backing: "base.raw", backingFormat: "raw", cwd: dir });
  await qemuIo(mid, "qcow2", ["write -P 0x22 1M 1M", "write -z 8M 1M"]);
  await qemuImgCreate(top, undefined, {
    options: ["cluster_size=4k"],
    backing: "mid.qcow2",
    backingFormat: "qcow2",
    cwd: dir,
  });
  const ops = [
    "write -P 0x33 1000 100",
    "write -P 0x44 1M 512",
    "write -P 0x55 8M 10",
    "discard 2M 64k",
    "write -z 3M 4k",
  ];
  await runOk("qemu-img", ["convert", "-O", "raw", mid, expected]);
  await qemuIo(expected, "raw", ops);
  const baseSum = sha(base);
  const midSum = sha(mid);

  const daemon = await serveImage(t, top);
  // Before any write: the whole chain shows through.
  await qemuIo(daemon.uri, "raw", [
    "read -P 0x11 0 1M",
    "read -P 0x22 1M 1M",
    "read -P 0 8M 1M",
    "read -P 0x11 9M 1M",
  ]);
  await qemuIo(daemon.uri, "raw", ops);
  await assertSame(daemon.uri, expected);
  const map = (await runOk("nbdinfo", ["--map", daemon.uri])).stdout;
  assert.match(map, /data/, map);
  assert.equal(await daemon.stop(), 0);
  assert.equal(sha(base), baseSum, "the raw base is not written");
  assert.equal(sha(mid), midSum, "the middle image is not written");
  await assertChecks(top);
  await assertSame(top, expected);
});

test("qcow2 compressed clusters (qemu-img convert -c) read back, and a write into one reallocates it; the image checks clean", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-zip-");
  const raw = join(dir, "src.raw");
  const image = join(dir, "c.qcow2");
  await qemuImgCreate(raw, "16M", { format: "raw" });
  await qemuIo(raw, "raw", ["write -P 0x61 0 3M", "write -P 0x62 5M 64k", "write -P 0x63 10M 1000"]);
  await runOk("qemu-img", ["convert", "-c", "-O", "qcow2", raw, image]);
  const info = (await runOk("qemu-img", ["check", image])).stdout;
  assert.match(info, /compressed clusters/);
  assert.doesNotMatch(info, / 0\.00% compressed/, "the source image does hold compressed clusters");
  const daemon = await serveImage(t, image);
  await assertSame(daemon.uri, raw);
  const ops = ["write -P 0x64 100 200", "write -z 5M 4k", "discard 10M 64k"];
  await qemuIo(daemon.uri, "raw", ops);
  await qemuIo(raw, "raw", ops);
  await assertSame(daemon.uri, raw);
  assert.equal(await daemon.stop(), 0);
  await assertChecks(image);
  await assertSame(image, raw);
});

test("qcow2 internal snapshot: writes honour the COPIED flag (shared clusters are copied), so the snapshot keeps its data", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-snap-");
  const image = join(dir, "s.qcow2");
  const before = join(dir, "before.raw");
  await qemuImgCreate(image, "16M");
  await qemuIo(image, "qcow2", ["write -P 0x71 0 4M"]);
  await runOk("qemu-img", ["snapshot", "-c", "s1", image]);
  await runOk("qemu-img", ["convert", "-O", "raw", image, before]);
  const daemon = await serveImage(t, image);
  await qemuIo(daemon.uri, "raw", [
    "write -P 0x72 4k 4k",
    "write -P 0x73 1M 1M",
    "write -z 2M 64k",
    "discard 3M 64k",
  ]);
  await qemuIo(daemon.uri, "raw", [
    "read -P 0x72 4k 4k",
    "read -P 0x71 0 4k",
    "read -P 0x73 1M 1M",
    "read -P 0 2M 64k",
  ]);
  assert.equal(await daemon.stop(), 0);
  await assertChecks(image);
  await runOk("qemu-img", ["snapshot", "-a", "s1", image]);
  await assertSame(image, before);
});

test("qcow2 v2 (compat=0.10): read and written (zeroes emulated as data), qemu-img check clean", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-v2-");
  const image = join(dir, "v2.qcow2");
  const raw = join(dir, "expected.raw");
  await qemuImgCreate(image, "16M", { options: ["compat=0.10"] });
  await qemuImgCreate(raw, "16M", { format: "raw" });
  const pre = ["write -P 0x81 0 2M", "write -P 0x82 7M 100k"];
  await qemuIo(image, "qcow2", pre);
  await qemuIo(raw, "raw", pre);
  const daemon = await serveImage(t, image);
  await assertSame(daemon.uri, raw);
  const ops = ["write -P 0x83 1M 10k", "write -z 7M 64k", "write -P 0x84 12M 4k"];
  await qemuIo(daemon.uri, "raw", ops);
  await qemuIo(raw, "raw", ops);
  assert.equal(await daemon.stop(), 0);
  await assertChecks(image);
  await assertSame(image, raw);
});

test("drivetap create -f qcow2 makes images qemu-img accepts (cluster sizes, backing file), and qemu-io writes to them check clean", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-create-");
  for (const cluster of ["512", "64k", "2M"]) {
    const image = join(dir, `c${cluster}.qcow2`);
    const out = await runOk(process.execPath, [
      CLI,
      "create",
      "-f",
      "qcow2",
      "--cluster-size",
      cluster,
      image,
      "1G",
    ]);
    assert.match(out.stdout, /Formatting/);
    await assertChecks(image);
    const info = JSON.parse((await runOk("qemu-img", ["info", "--output=json", image])).stdout) as {
      "virtual-size": number;
      "cluster-size": number;
    };
    assert.equal(info["virtual-size"], 1024 * MiB);
    assert.equal(info["cluster-size"], cluster === "512" ? 512 : cluster === "64k" ? 65536 : 2 * MiB);
    await qemuIo(image, "qcow2", ["write -P 0x91 0 3M", "write -P 0x92 900M 1M"]);
    await assertChecks(image);
  }
  const base = join(dir, "base.raw");
  writeFileSync(base, Buffer.alloc(4 * MiB, 0x5a));
  const top = join(dir, "top.qcow2");
  await runOk(process.execPath, [CLI, "create", "-f", "qcow2", "-b", "base.raw", "-F", "raw", top]);
  const info = JSON.parse((await runOk("qemu-img", ["info", "--output=json", top])).stdout) as {
    "virtual-size": number;
    "backing-filename": string;
    "backing-filename-format": string;
  };
  assert.equal(info["virtual-size"], 4 * MiB, "the size comes from the backing file");
  assert.equal(info["backing-filename"], "base.raw");
  assert.equal(info["backing-filename-format"], "raw");
  await qemuIo(top, "qcow2", ["read -P 0x5a 0 4M"]);
  // Refusals: no backing format, no size, a bad cluster size.
  const noFmt = await run(process.execPath, [
    CLI,
    "create",
    "-f",
    "qcow2",
    "-b",
    "base.raw",
    join(dir, "x.qcow2"),
  ]);
  assert.equal(noFmt.code, 1);
  assert.match(noFmt.stderr, /Backing file specified without backing format/);
  const noSize = await run(process.execPath, [CLI, "create", "-f", "qcow2", join(dir, "y.qcow2")]);
  assert.match(noSize.stderr, /needs a size/);
  const badCluster = await run(process.execPath, [
    CLI,
    "create",
    "-f",
    "qcow2",
    "--cluster-size",
    "3000",
    join(dir, "z.qcow2"),
    "1M",
  ]);
  assert.match(badCluster.stderr, /Cluster size must be a power of two between 512 and 2048k/);
});

test("serve probes the format: qcow2 by its magic, a raw guess is warned about and its block 0 cannot become a qcow2 header; --format raw serves a qcow2 file's bytes", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-probe-");
  const image = join(dir, "p.qcow2");
  const raw = join(dir, "p.raw");
  await qemuImgCreate(image, "8M");
  writeFileSync(raw, Buffer.alloc(MiB));
  const q = await serveImage(t, image);
  assert.match(q.stdout(), /8388608 bytes/);
  assert.equal(await q.stop(), 0);
  const r = await serveImage(t, raw, ["-v"]);
  await r.waitForStderr(/probing guessed raw/);
  // A guest may not turn a probed raw image into a qcow2 header (QEMU's rule for block 0)...
  const headerFile = join(dir, "header.bin");
  writeFileSync(headerFile, readFileSync(image).subarray(0, 512));
  const refused = await run("qemu-io", ["-f", "raw", r.uri, "-c", `write -s ${headerFile} 0 512`]);
  assert.match(refused.stdout + refused.stderr, /Operation not permitted/);
  // ...but other writes to block 0 go through.
  await qemuIo(r.uri, "raw", ["write -P 0x51 0 512", "read -P 0x51 0 512"]);
  assert.equal(await r.stop(), 0);
  assert.equal(readFileSync(raw)[0], 0x51);
  const forced = await serveImage(t, image, ["--format", "raw", "--read-only"]);
  const size = readFileSync(image).length;
  assert.match(forced.stdout(), new RegExp(`${size} bytes`));
  assert.doesNotMatch(forced.stderr(), /probing/);
});

test("a dirty image with lazy refcounts (qemu-io killed) serves read-only as it is: no repair, still dirty (writable opens repair: fault/qcow2-lazy-repair)", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-lazy-");
  const image = join(dir, "lazy.qcow2");
  await qemuImgCreate(image, "8M", { options: ["lazy_refcounts=on"] });
  // sigraise 9 kills qemu-io before it can clear the dirty bit.
  const r = await run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x99 0 64k", "-c", "sigraise 9", image]);
  assert.equal(r.signal, "SIGKILL");
  assert.equal(await dirtyFlag(image), true);
  const sum = sha(image);
  const ro = await serveImage(t, image, ["--read-only"]);
  await qemuIo(ro.uri, "raw", ["read -P 0x99 0 64k"], true);
  assert.equal(await ro.stop(), 0);
  assert.equal(sha(image), sum);
  assert.equal(await dirtyFlag(image), true);
});

test("blockdev-add driver=qcow2 over QMP: inline file, a file node by name, backing null or a node; errors name the problem", async (t) => {
  const dir = tempDir(t, "drivetap-qcow2-qmp-");
  const base = join(dir, "base.qcow2");
  const top = join(dir, "top.qcow2");
  await qemuImgCreate(base, "8M");
  await qemuIo(base, "qcow2", ["write -P 0x3c 0 1M"]);
  await qemuImgCreate(top, undefined, { backing: base, backingFormat: "qcow2" });
  const qmpPath = join(dir, "qmp.sock");
  const daemon = await startDaemon({ args: ["--qmp", qmpPath] });
  stopAfter(t, daemon);
  const qmp = await connectQmp(t, qmpPath);
  // The chain from the header.
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "q1",
    file: { driver: "file", filename: top },
  });
  await qmp.execute("block-export-add", {
    type: "nbd",
    id: "e1",
    "node-name": "q1",
    name: "q1",
    writable: true,
  });
  await qemuIo(unixUri(daemon.socket, "q1"), "raw", ["read -P 0x3c 0 1M", "write -P 0x3d 0 4k"]);
  // q1 holds "write" on top.qcow2: another node of the daemon cannot share it meanwhile.
  await assert.rejects(
    qmp.execute("blockdev-add", { driver: "file", "node-name": "f2", filename: top, "read-only": true }),
    /Failed to get shared "write" lock: node 'q1' holds "write"/,
  );
  await qmp.execute("block-export-del", { id: "e1" });
  await qmp.execute("blockdev-del", { "node-name": "q1" });
  // backing: null hides the base; the copy-on-write filled the rest of the written cluster.
  await qmp.execute("blockdev-add", { driver: "file", "node-name": "f2", filename: top, "read-only": true });
  await assert.rejects(
    qmp.execute("blockdev-add", { driver: "qcow2", "node-name": "q2", file: "f2", backing: null }),
    (e: QmpError) => /read-only/.test(e.message),
    "a read-only file node cannot back a writable qcow2 node",
  );
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "q2",
    file: "f2",
    backing: null,
    "read-only": true,
  });
  await qmp.execute("block-export-add", { type: "nbd", id: "e2", "node-name": "q2", name: "q2" });
  await qemuIo(
    unixUri(daemon.socket, "q2"),
    "raw",
    ["read -P 0x3d 0 4k", "read -P 0x3c 4k 60k", "read -P 0 64k 960k"],
    true,
  );
  // backing: a node by name.
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "b3",
    file: { driver: "file", filename: base },
    "read-only": true,
  });
  await qmp.execute("blockdev-add", {
    driver: "qcow2",
    "node-name": "q3",
    "read-only": true,
    file: { driver: "file", filename: top, "force-share": true },
    backing: "b3",
  });
  await qmp.execute("block-export-add", { type: "nbd", id: "e3", "node-name": "q3", name: "q3" });
  await qemuIo(unixUri(daemon.socket, "q3"), "raw", ["read -P 0x3d 0 4k", "read -P 0x3c 4k 1020k"], true);
  await assert.rejects(qmp.execute("blockdev-del", { "node-name": "b3" }), /busy/);
  // Not qcow2 at all.
  const junk = join(dir, "junk.img");
  writeFileSync(junk, Buffer.alloc(MiB));
  await assert.rejects(
    qmp.execute("blockdev-add", {
      driver: "qcow2",
      "node-name": "q4",
      file: { driver: "file", filename: junk },
    }),
    (e: QmpError) => e.errorClass === "GenericError" && /Could not open.*not a qcow2 image/.test(e.message),
  );
  await qmp.execute("block-export-del", { id: "e3" });
  await qmp.execute("blockdev-del", { "node-name": "q3" });
  await qmp.execute("blockdev-del", { "node-name": "b3" });
});
