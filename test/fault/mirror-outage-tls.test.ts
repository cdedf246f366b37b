/**
 * The mirror's central outage scenario over TLS: a write-blocking mirror to a qemu-nbd that requires
 * x509 TLS reaches READY; fio writes with verify=crc32c; the target is killed with SIGKILL mid-load;
 * writes keep succeeding and the job turns degraded; qemu-nbd restarts on the same socket with the
 * same credentials; the job resyncs by itself over a new TLS session; a cancel then completes with
 * qemu-img compare finding target == source.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { makeImage } from "../helpers/daemon.js";
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
import { assertIdentical, cancelInSync, startQemuNbd } from "../helpers/remote.js";
import { start } from "../helpers/run.js";
import { makeClientTlsFixture, type ClientTlsFixture } from "../helpers/tls-client-certs.js";

const DISK_BYTES = 48 * MiB;
let f: ClientTlsFixture;
const cleanups: Array<() => unknown> = [];
before(async () => {
  f = await makeClientTlsFixture({ after: (fn) => void cleanups.push(fn as () => unknown) });
});
after(() => {
  for (const fn of cleanups) fn();
});

async function writeOps(d: QmpDaemon): Promise<number> {
  const nodes = (await d.qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
  const disk = nodes.find((n) => n["node-name"] === "disk0")!;
  return (disk["x-stats"] as { writeOps: number }).writeOps;
}

test("central scenario over TLS: kill -9 the TLS target under load, restart, resync, target == source", async (t) => {
  const seed = testSeed(t);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK_BYTES) });
  const targetImage = join(d.dir, "target.img");
  makeImage(targetImage, DISK_BYTES);
  const tls = { kind: "x509", dir: f.serverDir, verifyPeer: true } as const;
  const remote = await startQemuNbd(t, targetImage, join(d.dir, "target.sock"), { tls });

  await d.qmp.execute("object-add", {
    "qom-type": "tls-creds-x509",
    id: "tls0",
    dir: f.clientDir,
    endpoint: "client",
  });
  await d.qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "tgt",
    server: { type: "unix", path: remote.socket },
    "tls-creds": "tls0",
  });
  await d.qmp.execute("blockdev-mirror", {
    "job-id": "m0",
    device: "disk0",
    target: "tgt",
    sync: "full",
    "copy-mode": "write-blocking",
  });
  await d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_READY"), 60_000);

  const before = await writeOps(d);
  const fio = start("fio", [
    "--name=outage-tls",
    "--ioengine=nbd",
    `--uri=${d.uri}`,
    "--rw=randwrite",
    "--bsrange=4k-64k",
    "--iodepth=16",
    "--offset=0",
    `--size=${16 * MiB}`,
    `--randseed=${seed}`,
    "--rate_iops=1500",
    "--verify=crc32c",
    "--verify_fatal=1",
    "--verify_state_save=0",
    "--output-format=terse",
  ]);
  await pollUntil("fio under way", async () => (await writeOps(d)) > before + 300);
  await remote.kill();
  const degraded = await d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_DEGRADED"), 30_000);
  assert.match(String(degraded.data.reason), /NBD|connection|unreachable/i);

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
  // The object stays held by the node while the job runs.
  await assert.rejects(d.qmp.execute("object-del", { id: "tls0" }), /object 'tls0' is in use/);

  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x78 46M 64k", "flush"]));
  await cancelInSync(d, "m0");
  await assertIdentical(d.image, targetImage);
});
