/**
 * The NBD client driver against real servers: a node opened with blockdev-add driver=nbd on qemu-nbd
 * and on nbdkit, exported again by drivetap and driven by qemu-io and nbdinfo. Covers reads, writes
 * split past the request limit, write-zeroes, trim, flush, block status, server errors, a refused
 * connect, and reconnecting after the server was killed and restarted on the same socket.
 */
import assert from "node:assert/strict";
import { existsSync, writeFileSync, rmSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { makeImage, readImage, unixUri } from "../helpers/daemon.js";
import {
  assertExit,
  assertQmpError,
  MiB,
  pollUntil,
  qemuIo,
  seededBytes,
  serveWithQmp,
  type QmpDaemon,
} from "../helpers/jobs.js";
import { startNbdkit, startQemuNbd } from "../helpers/remote.js";
import { runOk } from "../helpers/run.js";

const TARGET_BYTES = 80 * MiB;

async function remoteConnected(d: QmpDaemon): Promise<boolean | undefined> {
  const nodes = (await d.qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
  return nodes.find((n) => n["node-name"] === "remote")?.["x-connected"] as boolean | undefined;
}

async function exportRemote(d: QmpDaemon, options: Record<string, unknown>): Promise<string> {
  await d.qmp.execute("blockdev-add", { driver: "nbd", "node-name": "remote", ...options });
  await d.qmp.execute("block-export-add", {
    type: "nbd",
    id: "e-remote",
    "node-name": "remote",
    name: "remote",
    writable: true,
  });
  return unixUri(d.daemon.socket, "remote");
}

test("an nbd node on qemu-nbd reads, writes (split past 32 MiB), zeroes, trims and reports holes", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const targetImage = join(d.dir, "target.img");
  makeImage(targetImage, TARGET_BYTES);
  const remote = await startQemuNbd(t, targetImage, join(d.dir, "qnbd.sock"));
  const uri = await exportRemote(d, { server: { type: "unix", path: remote.socket }, export: "" });

  const r = await qemuIo(uri, [
    "write -P 0xab 0 1M",
    "write -P 0x5c 8M 40M", // over the 32 MiB request limit: the driver splits it
    "write -z 2M 1M",
    "write -P 0x11 4M 128k",
    "discard 4M 64k",
    "flush",
    "read -P 0xab 0 1M",
    "read -P 0x5c 8M 40M",
    "read -P 0 2M 1M",
  ]);
  assertExit("qemu-io through the nbd node", r);
  assert.doesNotMatch(r.stdout, /Pattern verification failed|error/i);

  // What qemu-nbd wrote to its file is what was written through drivetap.
  assert.ok(readImage(targetImage, 0, 1 * MiB).every((b) => b === 0xab));
  assert.ok(readImage(targetImage, 8 * MiB, 40 * MiB).every((b) => b === 0x5c));
  assert.ok(readImage(targetImage, 4 * MiB + 64 * 1024, 64 * 1024).every((b) => b === 0x11));
  assert.ok(
    readImage(targetImage, 4 * MiB, 64 * 1024).every((b) => b === 0),
    "the trimmed range reads zero",
  );

  // Block status comes from qemu-nbd: the untouched tail of the sparse file is a hole.
  const map = await runOk("nbdinfo", ["--map", "--json", uri]);
  const extents = JSON.parse(map.stdout) as Array<{ offset: number; length: number; type: number }>;
  const tail = extents.find((e) => e.offset <= 60 * MiB && e.offset + e.length > 60 * MiB);
  assert.ok(tail, "an extent covers 60 MiB");
  assert.equal(tail.type & 1, 1, `60 MiB is reported as a hole: ${map.stdout}`);
  const head = extents.find((e) => e.offset === 0);
  assert.equal(head?.type, 0, "the written start is data");
});

test("an nbd node on nbdkit's memory plugin passes server errors through and recovers", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const trigger = join(d.dir, "fail-writes");
  const remote = await startNbdkit(t, join(d.dir, "kit.sock"), [
    "--filter=error",
    "memory",
    "64M",
    "error-pwrite=EIO",
    "error-pwrite-rate=100%",
    `error-pwrite-file=${trigger}`,
  ]);
  const uri = await exportRemote(d, { server: { type: "unix", path: remote.socket } });

  const data = seededBytes(7, 256 * 1024);
  writeFileSync(join(d.dir, "pattern.bin"), data);
  assertExit("write", await qemuIo(uri, ["write -P 0x42 1M 256k", "read -P 0x42 1M 256k"]));

  writeFileSync(trigger, "");
  const failed = await qemuIo(uri, ["write -P 0x43 1M 4k"]);
  assert.match(failed.stdout + failed.stderr, /Input\/output error/, "the server's EIO reaches the client");
  rmSync(trigger);
  assertExit("write after the fault", await qemuIo(uri, ["write -P 0x44 1M 4k", "read -P 0x44 1M 4k"]));
  assert.ok(!existsSync(trigger));

  // The daemon kept serving its own disk through all this.
  assertExit("own disk", await qemuIo(d.uri, ["write -P 1 0 4k", "read -P 1 0 4k"]));
});

test("blockdev-add of an nbd node fails clearly when nobody listens", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  await assertQmpError(
    d.qmp.execute("blockdev-add", {
      driver: "nbd",
      "node-name": "nobody",
      server: { type: "unix", path: join(d.dir, "nobody.sock") },
    }),
    "GenericError",
    /^Failed to connect to the NBD server: /,
  );
  await assertQmpError(
    d.qmp.execute("blockdev-add", { driver: "nbd", "node-name": "noserver" }),
    "GenericError",
    "Parameter 'server' is missing",
  );
  const nodes = (await d.qmp.execute("query-named-block-nodes")) as Array<{ "node-name": string }>;
  assert.ok(!nodes.some((n) => n["node-name"] === "nobody"));
});

test("after the server is killed, the nbd node reconnects by itself when it is back", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const targetImage = join(d.dir, "target.img");
  makeImage(targetImage, 8 * MiB);
  const remote = await startQemuNbd(t, targetImage, join(d.dir, "qnbd.sock"));
  const uri = await exportRemote(d, {
    server: { type: "unix", path: remote.socket },
    "reconnect-delay": 30,
  });
  assertExit("first write", await qemuIo(uri, ["write -P 0x61 0 64k"]));

  await remote.kill();
  await d.daemon.waitForStderr(/NBD target connection lost/);
  // A write issued while the server is down waits (reconnect-delay) and lands once it is back.
  const pending = qemuIo(uri, ["write -P 0x62 64k 64k", "flush"]);
  await d.daemon.waitForStderr(/NBD reconnect failed/);
  await remote.restart();
  assertExit("write across the outage", await pending);
  assert.equal(await remoteConnected(d), true, "query-named-block-nodes shows the link up again");
  assert.ok(readImage(targetImage, 64 * 1024, 64 * 1024).every((b) => b === 0x62));
  assert.ok(readImage(targetImage, 0, 64 * 1024).every((b) => b === 0x61));
});

test("with reconnect-delay 0, I/O while the server is down fails at once instead of hanging", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const targetImage = join(d.dir, "target.img");
  makeImage(targetImage, 8 * MiB);
  const remote = await startQemuNbd(t, targetImage, join(d.dir, "qnbd.sock"));
  const uri = await exportRemote(d, { server: { type: "unix", path: remote.socket } });
  await remote.kill();
  await d.daemon.waitForStderr(/NBD target connection lost/);
  const r = await qemuIo(uri, ["write -P 0x63 0 4k"]);
  assert.match(r.stdout + r.stderr, /Input\/output error/);
  assert.equal(await remoteConnected(d), false);
  await remote.restart();
  await pollUntil("the nbd node reconnected", async () => (await remoteConnected(d)) === true);
  assertExit("write after reconnect", await qemuIo(uri, ["write -P 0x64 0 4k", "read -P 0x64 0 4k"]));
});
