/**
 * Mirror and stream jobs whose remote target goes away and comes back:
 *
 * - the central scenario: a write-blocking mirror to qemu-nbd reaches READY; fio writes with
 *   verify=crc32c; the target is killed with SIGKILL mid-load; writes keep succeeding; the job turns
 *   degraded and says so; qemu-nbd restarts on the same socket; the job resyncs by itself; a cancel
 *   then completes with qemu-img compare finding target == source;
 * - a TCP target in a network namespace behind a veth pair whose link is cut (requests hang, they do
 *   not fail) and restored: writes succeed after at most the configured request timeout;
 * - nbdkit's delay filter (slow but alive: never degraded) and error filter (target EIO: a job error
 *   under on-target-error, not an outage);
 * - a stream job (sync=stream) to an nbd target survives the same kill.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { makeImage, readImage } from "../helpers/daemon.js";
import {
  assertExit,
  blockJob,
  jobEvent,
  MiB,
  pollUntil,
  qemuIo,
  seededBytes,
  serveWithQmp,
  testSeed,
  type QmpDaemon,
} from "../helpers/jobs.js";
import { assertIdentical, cancelInSync, startNbdkit, startQemuNbd } from "../helpers/remote.js";
import { run, runOk, start } from "../helpers/run.js";

const DISK_BYTES = 48 * MiB;

async function writeOps(d: QmpDaemon): Promise<number> {
  const nodes = (await d.qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
  const disk = nodes.find((n) => n["node-name"] === "disk0")!;
  return (disk["x-stats"] as { writeOps: number }).writeOps;
}

/** fio randwrite over a region with crc32c verification: every acknowledged write is read back. */
function verifiedFio(uri: string, seed: number, offsetBytes: number, sizeBytes: number) {
  return start("fio", [
    "--name=outage",
    "--ioengine=nbd",
    `--uri=${uri}`,
    "--rw=randwrite",
    "--bsrange=4k-64k",
    "--iodepth=16",
    `--offset=${offsetBytes}`,
    `--size=${sizeBytes}`,
    `--randseed=${seed}`,
    "--rate_iops=1500",
    "--verify=crc32c",
    "--verify_fatal=1",
    "--verify_state_save=0",
    "--output-format=terse",
  ]);
}

async function mirrorToNbd(d: QmpDaemon, socket: string, extra: Record<string, unknown> = {}): Promise<void> {
  await d.qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "tgt",
    server: { type: "unix", path: socket },
    ...extra,
  });
  await d.qmp.execute("blockdev-mirror", {
    "job-id": "m0",
    device: "disk0",
    target: "tgt",
    sync: "full",
    "copy-mode": "write-blocking",
  });
  await d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_READY"), 60_000);
}

test("central scenario: mirror to qemu-nbd, kill -9 the target under load, restart, resync, target == source", async (t) => {
  const seed = testSeed(t);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK_BYTES) });
  const targetImage = join(d.dir, "target.img");
  makeImage(targetImage, DISK_BYTES);
  const remote = await startQemuNbd(t, targetImage, join(d.dir, "target.sock"));
  await mirrorToNbd(d, remote.socket);

  const before = await writeOps(d);
  const fio = verifiedFio(d.uri, seed, 0, 16 * MiB);
  await pollUntil("fio under way", async () => (await writeOps(d)) > before + 300);
  await remote.kill();
  const degraded = await d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_DEGRADED"), 30_000);
  assert.match(String(degraded.data.reason), /NBD|connection|unreachable/i);

  // While the target is down: the guest's writes succeed, the job records what the target misses.
  assertExit("fio", await fio.result);
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x77 40M 1M", "discard 44M 1M", "flush"]));
  const down = (await blockJob(d.qmp, "m0")) as unknown as Record<string, unknown>;
  assert.equal(down["x-degraded"], true);
  assert.ok((down["x-dirty-bytes"] as number) >= 1 * MiB, `dirty bytes recorded: ${down["x-dirty-bytes"]}`);
  assert.equal(down.status, "ready", "an outage is not a job failure");

  const resynced = d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_RESYNCED"), 60_000);
  await remote.restart();
  await resynced;
  const up = (await blockJob(d.qmp, "m0")) as unknown as Record<string, unknown>;
  assert.equal(up["x-degraded"], false);

  // More writes after the resync are mirrored again, then a cancel leaves the target in sync.
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x78 46M 64k", "flush"]));
  await cancelInSync(d, "m0");
  await assertIdentical(d.image, targetImage);
});

/** A network namespace with nbdkit on TCP, joined to the host by a veth pair. */
async function netnsTarget(
  t: TestContext,
  dir: string,
): Promise<{ host: string; cut(): Promise<void>; restore(): Promise<void> }> {
  const ns = `dt${process.pid % 100000}`;
  const hostIf = `${ns}h`;
  const nsIf = `${ns}n`;
  const octet = 10 + (process.pid % 200);
  const hostIp = `10.213.${octet}.1`;
  const nsIp = `10.213.${octet}.2`;
  await run("ip", ["netns", "del", ns]);
  await runOk("ip", ["netns", "add", ns]);
  t.after(async () => {
    await run("ip", ["link", "del", hostIf]);
    await run("ip", ["netns", "del", ns]);
  });
  await runOk("ip", ["link", "add", hostIf, "type", "veth", "peer", "name", nsIf]);
  await runOk("ip", ["link", "set", nsIf, "netns", ns]);
  await runOk("ip", ["addr", "add", `${hostIp}/30`, "dev", hostIf]);
  await runOk("ip", ["link", "set", hostIf, "up"]);
  await runOk("ip", ["-n", ns, "addr", "add", `${nsIp}/30`, "dev", nsIf]);
  await runOk("ip", ["-n", ns, "link", "set", nsIf, "up"]);
  await runOk("ip", ["-n", ns, "link", "set", "lo", "up"]);
  const kit = start(
    "ip",
    ["netns", "exec", ns, "nbdkit", "-f", "-i", nsIp, "-p", "10809", "memory", `${DISK_BYTES}`],
    { timeoutMs: 30 * 60_000 },
  );
  t.after(() => kit.proc.kill("SIGKILL"));
  await pollUntil("nbdkit in the namespace", async () => {
    const r = await run("nbdinfo", ["--size", `nbd://${nsIp}:10809`]);
    return r.code === 0;
  });
  void dir;
  return {
    host: nsIp,
    cut: () => runOk("ip", ["link", "set", hostIf, "down"]).then(() => undefined),
    restore: () => runOk("ip", ["link", "set", hostIf, "up"]).then(() => undefined),
  };
}

test("a TCP target behind a veth link that is cut and restored: bounded waits, then resync", async (t) => {
  const seed = testSeed(t);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK_BYTES) });
  const net = await netnsTarget(t, d.dir);
  await d.qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "tgt",
    server: { type: "inet", host: net.host, port: "10809" },
    "x-request-timeout": 1,
  });
  await d.qmp.execute("blockdev-mirror", {
    "job-id": "m0",
    device: "disk0",
    target: "tgt",
    sync: "full",
    "copy-mode": "write-blocking",
  });
  await d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_READY"), 60_000);

  await net.cut();
  // The link is down without a reset: requests to the target hang until the 1 s request timeout.
  const startedMs = Date.now();
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x31 1M 256k", "flush"]));
  const waitedMs = Date.now() - startedMs;
  t.diagnostic(`a write during the cut took ${waitedMs} ms`);
  assert.ok(waitedMs < 15_000, `the write was held at most a bounded time (${waitedMs} ms)`);
  await d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_DEGRADED"), 30_000);
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x32 2M 256k", "write -z 3M 64k", "flush"]));

  const resynced = d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_RESYNCED"), 60_000);
  await net.restore();
  await resynced;
  await cancelInSync(d, "m0");
  // Compare through NBD: the target lives in nbdkit's memory.
  const r = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", d.image, `nbd://${net.host}:10809`]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /Images are identical/);
});

test("nbdkit delay filter: a slow target is not an outage; error filter: target EIO follows on-target-error", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 8 * MiB });
  const slow = await startNbdkit(t, join(d.dir, "slow.sock"), [
    "--filter=delay",
    "memory",
    `${8 * MiB}`,
    "wdelay=200ms",
  ]);
  await d.qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "tgt",
    server: { type: "unix", path: slow.socket },
  });
  await d.qmp.execute("blockdev-mirror", {
    "job-id": "m0",
    device: "disk0",
    target: "tgt",
    sync: "none",
    "copy-mode": "write-blocking",
  });
  await d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_READY"), 30_000);
  assertExit(
    "qemu-io",
    await qemuIo(d.uri, ["aio_write -P 0x41 0 64k", "aio_write -P 0x42 1M 64k", "aio_flush"]),
  );
  assert.ok(!d.qmp.events.some(jobEvent("m0", "BLOCK_JOB_DEGRADED")), "a slow target is not degraded");
  const r = await run("qemu-io", [
    "-f",
    "raw",
    "-r",
    `nbd+unix:///?socket=${slow.socket}`,
    "-c",
    "read -P 0x42 1M 64k",
  ]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.doesNotMatch(r.stdout, /fail/i);
  await cancelInSync(d, "m0");

  const trigger = join(d.dir, "fail");
  const faulty = await startNbdkit(t, join(d.dir, "faulty.sock"), [
    "--filter=error",
    "memory",
    `${8 * MiB}`,
    "error-pwrite=EIO",
    "error-pwrite-rate=100%",
    `error-pwrite-file=${trigger}`,
  ]);
  await d.qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "bad",
    server: { type: "unix", path: faulty.socket },
  });
  await d.qmp.execute("blockdev-mirror", {
    "job-id": "m1",
    device: "disk0",
    target: "bad",
    sync: "none",
    "copy-mode": "write-blocking",
    "on-target-error": "report",
  });
  await d.qmp.waitForEvent(jobEvent("m1", "BLOCK_JOB_READY"), 30_000);
  const { writeFileSync } = await import("node:fs");
  writeFileSync(trigger, "");
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x43 2M 64k"]));
  const err = await d.qmp.waitForEvent(jobEvent("m1", "BLOCK_JOB_ERROR"), 30_000);
  assert.equal(err.data.action, "report");
  const done = await d.qmp.waitForEvent(jobEvent("m1", "BLOCK_JOB_COMPLETED"), 30_000);
  assert.ok(done.data.error, "the job failed with the target's error");
  assert.ok(!d.qmp.events.some(jobEvent("m1", "BLOCK_JOB_DEGRADED")), "EIO is a target error, not an outage");
});

test("a stream job to an nbd target survives the target's kill -9 and resyncs", async (t) => {
  const seed = testSeed(t);
  const content = seededBytes(seed, 16 * MiB);
  const d = await serveWithQmp(t, { content });
  const targetImage = join(d.dir, "target.img");
  const { writeFileSync } = await import("node:fs");
  writeFileSync(targetImage, content); // a copy taken before the stream starts
  const remote = await startQemuNbd(t, targetImage, join(d.dir, "target.sock"));
  await d.qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "tgt",
    server: { type: "unix", path: remote.socket },
  });
  await d.qmp.execute("blockdev-backup", { "job-id": "s0", device: "disk0", target: "tgt", sync: "stream" });
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x51 0 1M", "flush"]));
  await remote.kill();
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x52 2M 1M", "discard 4M 1M", "flush"]));
  await d.qmp.waitForEvent(jobEvent("s0", "BLOCK_JOB_DEGRADED"), 30_000);
  const resynced = d.qmp.waitForEvent(jobEvent("s0", "BLOCK_JOB_RESYNCED"), 60_000);
  await remote.restart();
  await resynced;
  await d.qmp.execute("block-job-cancel", { device: "s0" });
  await d.qmp.waitForEvent(jobEvent("s0", "BLOCK_JOB_CANCELLED"), 60_000);
  await assertIdentical(d.image, targetImage);
});

test("SIGTERM with a mirror target that died: the exit says which node's final flush failed and what it means", async (t) => {
  const d = await serveWithQmp(t, { content: seededBytes(testSeed(t), 8 * MiB) });
  const targetImage = join(d.dir, "target.img");
  makeImage(targetImage, 8 * MiB);
  const remote = await startQemuNbd(t, targetImage, join(d.dir, "target.sock"));
  await mirrorToNbd(d, remote.socket, { "reconnect-delay": 1 });
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x61 0 1M"]));
  await remote.kill();
  const code = await d.daemon.stop("SIGTERM");
  // The served disk is flushed; the target's writes since its last flush may be lost, so not 0.
  assert.equal(code, 1, d.daemon.stderr());
  assert.match(d.daemon.stderr(), /final flush of node 'tgt' failed: .*unreachable.*may not be durable/);
  assert.equal(readImage(d.image, 0, 1)[0], 0x61, "the served disk's acknowledged write is in its image");
});
