/**
 * `drivetap serve IMAGE` builds qemu-storage-daemon's layout for an image: a `file` protocol node
 * (`#block-NAME-file`) with a `raw` format node over it that keeps `--node-name`. Checked through QMP
 * next to qemu-storage-daemon 7.2 given the same two nodes, with qemu-io writing through the export;
 * the built-in memory and null-co disks stay one node each, as QEMU's null-co is.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { imageFileNodeName } from "../../src/daemon/daemon.js";
import { CLI, startDaemon, stopAfter } from "../helpers/daemon.js";
import { assertExit, assertQmpError, connectQmp, MiB, qemuIo, serveWithQmp } from "../helpers/jobs.js";
import { startQsd } from "../helpers/qsd.js";
import { run, tempDir } from "../helpers/run.js";

type NodeEntry = Record<string, unknown> & { "node-name": string; image: Record<string, unknown> };

/** What a node's role in the layout shows: driver, format, read-only, and whether `file` is the image. */
function role(n: NodeEntry, image: string): Record<string, unknown> {
  return {
    drv: n.drv,
    format: n.image.format,
    ro: n.ro,
    fileIsImage: n.file === image && n.image.filename === image,
    "virtual-size": n.image["virtual-size"],
  };
}

test("serve IMAGE: a file node under a raw node that keeps --node-name, as qemu-storage-daemon lays it out", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 4 * MiB });
  const fileNode = imageFileNodeName("disk0");
  assert.equal(fileNode, "#block-disk0-file", "the documented, stable name");

  const nodes = (await d.qmp.execute("query-named-block-nodes")) as NodeEntry[];
  assert.deepEqual(nodes.map((n) => n["node-name"]).sort(), [fileNode, "disk0"].sort());
  const raw = nodes.find((n) => n["node-name"] === "disk0")!;
  const file = nodes.find((n) => n["node-name"] === fileNode)!;
  assert.deepEqual(role(raw, d.image), {
    drv: "raw",
    format: "raw",
    ro: false,
    fileIsImage: true,
    "virtual-size": 4 * MiB,
  });
  assert.deepEqual(role(file, d.image), {
    drv: "file",
    format: "file",
    ro: false,
    fileIsImage: true,
    "virtual-size": 4 * MiB,
  });
  assert.deepEqual(file["x-users"], ["child of disk0"]);
  assert.deepEqual(raw["x-users"], ["export export0"]);

  // query-block lists the top only.
  const block = (await d.qmp.execute("query-block")) as Array<{ device: string; inserted: { drv: string } }>;
  assert.deepEqual(
    block.map((b) => [b.device, b.inserted.drv]),
    [["disk0", "raw"]],
  );

  // qemu-storage-daemon with the same two nodes shows the same roles.
  const qsd = await startQsd(t);
  const qsdImage = join(qsd.dir, "q.img");
  writeFileSync(qsdImage, Buffer.alloc(4 * MiB));
  await qsd.qmp.execute("blockdev-add", { driver: "file", "node-name": "f0", filename: qsdImage });
  await qsd.qmp.execute("blockdev-add", { driver: "raw", "node-name": "disk0", file: "f0" });
  const theirs = (await qsd.qmp.execute("query-named-block-nodes")) as NodeEntry[];
  assert.deepEqual(
    role(
      theirs.find((n) => n["node-name"] === "disk0")!,
      qsdImage,
    ),
    role(raw, d.image),
    "the raw node",
  );
  assert.deepEqual(
    role(
      theirs.find((n) => n["node-name"] === "f0")!,
      qsdImage,
    ),
    role(file, d.image),
    "the file node",
  );

  // The file node belongs to the raw node: nobody else may take it, delete it or name it.
  await assertQmpError(
    d.qmp.execute("blockdev-del", { "node-name": fileNode }),
    "GenericError",
    `Node '${fileNode}' is busy: child of disk0`,
  );
  await assertQmpError(
    d.qmp.execute("block-export-add", { type: "nbd", id: "e1", "node-name": fileNode, name: "f" }),
    "GenericError",
    /is busy: child of disk0/,
  );
  await assertQmpError(
    d.qmp.execute("blockdev-add", { driver: "memory", "node-name": fileNode, size: MiB }),
    "GenericError",
    `Invalid node-name: '${fileNode}'`,
  );
  await d.qmp.execute("blockdev-add", { driver: "memory", "node-name": "m", size: 4 * MiB });
  await assertQmpError(
    d.qmp.execute("blockdev-backup", { device: "disk0", target: fileNode, sync: "full" }),
    "GenericError",
    /is busy: child of disk0/,
  );

  // Writes through the export reach the image through both nodes, and the raw node counts them.
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x5c 1M 64k", "flush"]));
  const disk = readFileSync(d.image);
  assert.ok(disk.subarray(MiB, MiB + 65536).equals(Buffer.alloc(65536, 0x5c)), "the write reached the image");
  const stats = (await d.qmp.execute("query-blockstats")) as Array<{
    device: string;
    stats: { wr_operations: number };
    parent?: { "node-name": string };
  }>;
  assert.deepEqual(
    stats.map((s) => s.device),
    ["disk0", "m"],
    "devices are the top nodes",
  );
  assert.equal(stats[0].stats.wr_operations, 1);
  assert.equal(stats[0].parent?.["node-name"], fileNode);
});

test("serve IMAGE --node-name: the raw node takes the name, the file node is derived from it", async (t) => {
  const dir = tempDir(t, "drivetap-layout-");
  const image = join(dir, "disk.img");
  writeFileSync(image, Buffer.alloc(MiB));
  const qmpPath = join(dir, "qmp.sock");
  const daemon = await startDaemon({ image, args: ["--qmp", qmpPath, "--node-name", "vda"] });
  stopAfter(t, daemon);
  const qmp = await connectQmp(t, qmpPath);
  const nodes = (await qmp.execute("query-named-block-nodes")) as NodeEntry[];
  assert.deepEqual(nodes.map((n) => [n["node-name"], n.drv]).sort(), [
    ["#block-vda-file", "file"],
    ["vda", "raw"],
  ]);
  const exports = (await qmp.execute("query-block-exports")) as Array<{ "node-name": string }>;
  assert.deepEqual(
    exports.map((e) => e["node-name"]),
    ["vda"],
  );

  // A name QMP would refuse is refused on the command line too, before anything opens.
  const bad = await run(process.execPath, [
    CLI,
    "serve",
    image,
    "--socket",
    join(dir, "bad.sock"),
    "--node-name",
    "#block-x",
  ]);
  assert.notEqual(bad.code, 0);
  assert.match(bad.stderr, /Invalid node-name: '#block-x'/);
});

for (const [what, image, drv] of [
  ["the built-in memory disk", undefined, "memory"],
  ["null-co://", "null-co://", "null-co"],
] as const) {
  test(`serve ${what}: one node, no format node over it`, async (t) => {
    const dir = tempDir(t, "drivetap-layout-");
    const qmpPath = join(dir, "qmp.sock");
    const daemon = await startDaemon({ image, args: ["--qmp", qmpPath, "--size", "1M"] });
    stopAfter(t, daemon);
    const qmp = await connectQmp(t, qmpPath);
    const nodes = (await qmp.execute("query-named-block-nodes")) as NodeEntry[];
    assert.deepEqual(
      nodes.map((n) => [n["node-name"], n.drv, n.image["virtual-size"]]),
      [["disk0", drv, MiB]],
    );
  });
}
