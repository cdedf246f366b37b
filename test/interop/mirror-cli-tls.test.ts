/**
 * `drivetap mirror` to TLS targets: an nbds+unix:// URI with --tls-creds (x509) and with --tls-psk
 * creates the credentials object and the node, returns at READY, and the job keeps the target in
 * sync; an nbds URI without credentials, and credentials with a plain nbd URI, fail with the reason
 * and leave nothing behind.
 */
import assert from "node:assert/strict";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { CLI, makeImage } from "../helpers/daemon.js";
import { assertExit, blockJob, MiB, qemuIo, seededBytes, serveWithQmp, testSeed } from "../helpers/jobs.js";
import { assertIdentical, cancelInSync, startQemuNbd } from "../helpers/remote.js";
import { run } from "../helpers/run.js";
import { makeClientTlsFixture, type ClientTlsFixture } from "../helpers/tls-client-certs.js";

const DISK_BYTES = 16 * MiB;
let f: ClientTlsFixture;
const cleanups: Array<() => unknown> = [];
before(async () => {
  f = await makeClientTlsFixture({ after: (fn) => void cleanups.push(fn as () => unknown) });
});
after(() => {
  for (const fn of cleanups) fn();
});

function mirror(qmpPath: string, args: readonly string[]) {
  return run(process.execPath, [CLI, "mirror", "--socket", qmpPath, ...args]);
}

test("drivetap mirror --target nbds+unix://... --tls-creds DIR mirrors over TLS", async (t) => {
  const seed = testSeed(t);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK_BYTES) });
  const image = join(d.dir, "remote.img");
  makeImage(image, DISK_BYTES);
  const remote = await startQemuNbd(t, image, join(d.dir, "remote.sock"), {
    tls: { kind: "x509", dir: f.serverDir, verifyPeer: true },
  });
  const r = await mirror(d.qmpPath, [
    "--target",
    `nbds+unix:///?socket=${remote.socket}`,
    "--tls-creds",
    f.clientDir,
  ]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  assert.match(r.stdout, /mirror disk0 ready/);
  assert.equal((await blockJob(d.qmp, "disk0")).status, "ready");
  const nodes = (await d.qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
  assert.match(String(nodes.find((n) => n["node-name"] === "disk0-target")?.file), /^nbds\+unix:/);
  assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x66 1M 64k", "flush"]));
  await cancelInSync(d, "disk0");
  await assertIdentical(d.image, image);
});

test("drivetap mirror --tls-psk FILE --tls-username U mirrors to a PSK qemu-nbd", async (t) => {
  const seed = testSeed(t);
  const d = await serveWithQmp(t, { content: seededBytes(seed, DISK_BYTES) });
  const image = join(d.dir, "remote.img");
  makeImage(image, DISK_BYTES);
  const remote = await startQemuNbd(t, image, join(d.dir, "remote.sock"), {
    tls: { kind: "psk", dir: f.pskDir },
  });
  const r = await mirror(d.qmpPath, [
    "--target",
    `nbds+unix:///?socket=${remote.socket}`,
    "--tls-psk",
    f.pskFile,
    "--tls-username",
    f.pskIdentity,
    "--job-id",
    "p0",
  ]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  await cancelInSync(d, "p0");
  await assertIdentical(d.image, image);
});

test("drivetap mirror: nbds without credentials, credentials without nbds, a refused handshake: exit 1", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: DISK_BYTES });
  const image = join(d.dir, "remote.img");
  makeImage(image, DISK_BYTES);
  const remote = await startQemuNbd(t, image, join(d.dir, "remote.sock"), {
    tls: { kind: "x509", dir: f.serverDir },
  });
  const uri = `nbds+unix:///?socket=${remote.socket}`;

  let r = await mirror(d.qmpPath, ["--target", uri]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /asks for TLS: give --tls-creds DIR or --tls-psk FILE/);

  r = await mirror(d.qmpPath, [
    "--target",
    `nbd+unix:///?socket=${remote.socket}`,
    "--tls-creds",
    f.clientDir,
  ]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /TLS options need an nbds:\/\/ or nbds\+unix:\/\/ target/);

  r = await mirror(d.qmpPath, ["--target", uri, "--tls-creds", f.wrongCaClientDir]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /the server's certificate is not signed by the CA in/);
  // The failed attempt removed its credentials object: the same job id can try again.
  r = await mirror(d.qmpPath, ["--target", uri, "--tls-creds", f.clientCaOnlyDir]);
  assert.equal(r.code, 0, r.stdout + r.stderr);
  await cancelInSync(d, "disk0");
  await assertIdentical(d.image, image);
});
