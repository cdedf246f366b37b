/**
 * drivetap's NBD client over TLS against real servers that require it: qemu-nbd with tls-creds-x509
 * (with and without verify-peer) and tls-creds-psk, nbdkit with --tls-certificates and --tls-psk,
 * on unix sockets and on TCP. The remote node is exported again by drivetap and driven by qemu-io,
 * so data really crosses the TLS link. Then every way it can go wrong, each with the message a user
 * needs: a server without TLS, a wrong CA, a hostname mismatch, an expired certificate, a missing or
 * foreign client certificate, a wrong PSK key or identity, and object-add/object-del refusals.
 * Certificates are made with openssl for each test file run.
 */
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import * as net from "node:net";
import { join } from "node:path";
import { after, before, test, type TestContext } from "node:test";
import { makeImage, readImage, unixUri } from "../helpers/daemon.js";
import {
  assertExit,
  assertQmpError,
  MiB,
  pollUntil,
  qemuIo,
  serveWithQmp,
  type QmpDaemon,
} from "../helpers/jobs.js";
import { nbdkitTlsArgs, startNbdkit, startQemuNbd, type ServerTls } from "../helpers/remote.js";
import { start } from "../helpers/run.js";
import { makeClientTlsFixture, type ClientTlsFixture } from "../helpers/tls-client-certs.js";

const TARGET_BYTES = 8 * MiB;
let f: ClientTlsFixture;

// One set for the whole file, removed when the file's tests are done.
const cleanups: Array<() => unknown> = [];
before(async () => {
  f = await makeClientTlsFixture({ after: (fn) => void cleanups.push(fn as () => unknown) });
});
after(() => {
  for (const fn of cleanups) fn();
});

async function addX509(
  d: QmpDaemon,
  id: string,
  dir: string,
  extra: Record<string, unknown> = {},
): Promise<void> {
  await d.qmp.execute("object-add", { "qom-type": "tls-creds-x509", id, dir, endpoint: "client", ...extra });
}

async function addPsk(d: QmpDaemon, id: string, dir: string, username = f.pskIdentity): Promise<void> {
  await d.qmp.execute("object-add", { "qom-type": "tls-creds-psk", id, dir, username, endpoint: "client" });
}

function nodeOptions(socket: string, creds: string | undefined, extra: Record<string, unknown> = {}) {
  return {
    driver: "nbd",
    "node-name": "remote",
    server: { type: "unix", path: socket },
    export: "",
    ...(creds ? { "tls-creds": creds } : {}),
    ...extra,
  };
}

async function nodeInfo(d: QmpDaemon, name = "remote"): Promise<Record<string, unknown> | undefined> {
  const nodes = (await d.qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
  return nodes.find((n) => n["node-name"] === name);
}

/** Exports the remote node through drivetap and writes, reads back and checks the remote image. */
async function roundTrip(d: QmpDaemon, image: string | null, pattern: number): Promise<void> {
  await d.qmp.execute("block-export-add", {
    type: "nbd",
    id: "e-remote",
    "node-name": "remote",
    name: "remote",
    writable: true,
  });
  const uri = unixUri(d.daemon.socket, "remote");
  const hex = `0x${pattern.toString(16)}`;
  assertExit(
    "qemu-io",
    await qemuIo(uri, [
      `write -P ${hex} 1M 1M`,
      "write -z 3M 64k",
      "flush",
      `read -P ${hex} 1M 1M`,
      "read -P 0 3M 64k",
    ]),
  );
  if (image)
    assert.ok(
      readImage(image, 1 * MiB, 1 * MiB).every((b) => b === pattern),
      "the remote image has the data",
    );
}

async function qemuNbdTarget(t: TestContext, d: QmpDaemon, tls: ServerTls | undefined, name = "target") {
  const image = join(d.dir, `${name}.img`);
  makeImage(image, TARGET_BYTES);
  const remote = await startQemuNbd(t, image, join(d.dir, `${name}.sock`), { tls });
  return { image, remote };
}

// ---- working links ---------------------------------------------------------------------------------

test("x509 to qemu-nbd: the node connects over TLS, data round-trips; without tls-creds it is refused", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const { image, remote } = await qemuNbdTarget(t, d, { kind: "x509", dir: f.serverDir });
  // The server accepts only TLS clients: a plaintext node fails with the reason.
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(remote.socket, undefined)),
    "GenericError",
    /Failed to connect to the NBD server: the NBD server requires TLS for export '' \(give tls-creds\)/,
  );
  await addX509(d, "tls0", f.clientCaOnlyDir);
  await d.qmp.execute("blockdev-add", nodeOptions(remote.socket, "tls0"));
  const info = await nodeInfo(d);
  assert.match(String(info?.file), /^nbds\+unix:/);
  await roundTrip(d, image, 0x5a);
});

test("x509 with tls-hostname: a name the certificate carries connects, another is refused", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const { remote } = await qemuNbdTarget(t, d, { kind: "x509", dir: f.serverDir });
  await addX509(d, "tls0", f.clientCaOnlyDir);
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(remote.socket, "tls0", { "tls-hostname": "wrong.example" })),
    "GenericError",
    /TLS handshake with the NBD server failed: the server's certificate is not for 'wrong\.example' \(tls-hostname\)/,
  );
  await d.qmp.execute("blockdev-add", nodeOptions(remote.socket, "tls0", { "tls-hostname": "localhost" }));
  await roundTrip(d, null, 0x21);
});

test("x509 with verify-peer=on: drivetap's client certificate is required and accepted", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const { image, remote } = await qemuNbdTarget(t, d, { kind: "x509", dir: f.serverDir, verifyPeer: true });
  await addX509(d, "nocert", f.clientCaOnlyDir);
  await addX509(d, "foreign", f.foreignClientCertDir);
  await addX509(d, "tls0", f.clientDir);
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(remote.socket, "nocert")),
    "GenericError",
    new RegExp(
      `TLS handshake with the NBD server failed: (the server requires a client certificate|the server closed the connection: it may require a client certificate \\(${f.clientCaOnlyDir} has no client-cert.pem\\))`,
    ),
  );
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(remote.socket, "foreign")),
    "GenericError",
    new RegExp(
      `TLS handshake with the NBD server failed: (the server refused the client certificate|the server closed the connection: it may not accept the client certificate ${f.foreignClientCertDir}/client-cert.pem)`,
    ),
  );
  await d.qmp.execute("blockdev-add", nodeOptions(remote.socket, "tls0"));
  await roundTrip(d, image, 0x6b);
});

test("PSK to qemu-nbd: the identity's key connects; a wrong key or an unknown identity is refused", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const { image, remote } = await qemuNbdTarget(t, d, { kind: "psk", dir: f.pskDir });
  await addPsk(d, "wrongkey", f.wrongPskDir);
  await addPsk(d, "stranger", f.unknownIdentityPskDir, "mallory");
  await addPsk(d, "psk0", f.pskDir);
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(remote.socket, "wrongkey")),
    "GenericError",
    /TLS handshake with the NBD server failed: (the PSK key for 'drivetap' is not the server's key|the server closed the connection: it does not know PSK identity 'drivetap' or has another key for it)/,
  );
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(remote.socket, "stranger")),
    "GenericError",
    /TLS handshake with the NBD server failed: (the server does not know PSK identity 'mallory'|the server closed the connection: it does not know PSK identity 'mallory' or has another key for it)/,
  );
  await d.qmp.execute("blockdev-add", nodeOptions(remote.socket, "psk0"));
  await roundTrip(d, image, 0x3c);
});

test("nbdkit --tls=require: x509 (with --tls-verify-peer) and PSK both carry data", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const image = join(d.dir, "kit.img");
  makeImage(image, TARGET_BYTES);
  const x509 = await startNbdkit(t, join(d.dir, "kit-x509.sock"), [
    ...nbdkitTlsArgs({ kind: "x509", dir: f.serverDir, verifyPeer: true }),
    "file",
    image,
  ]);
  await addX509(d, "tls0", f.clientDir);
  await d.qmp.execute("blockdev-add", nodeOptions(x509.socket, "tls0"));
  await roundTrip(d, image, 0x4d);
  await d.qmp.execute("block-export-del", { id: "e-remote" });
  await d.qmp.execute("blockdev-del", { "node-name": "remote" });
  await x509.kill();

  const psk = await startNbdkit(t, join(d.dir, "kit-psk.sock"), [
    ...nbdkitTlsArgs({ kind: "psk", dir: f.pskDir }),
    "file",
    image,
  ]);
  await addPsk(d, "psk0", f.pskDir);
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(psk.socket, "tls0")),
    "GenericError",
    /Failed to connect to the NBD server: TLS handshake with the NBD server failed/,
  );
  await d.qmp.execute("blockdev-add", nodeOptions(psk.socket, "psk0"));
  await roundTrip(d, image, 0x4e);
});

/** A TCP port nothing listens on right now. */
function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
  });
}

function acceptsTcp(port: number): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.createConnection({ host: "127.0.0.1", port });
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

test("x509 over TCP to 127.0.0.1: the IP address is checked against the certificate by default", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const port = await freePort();
  const kit = start(
    "nbdkit",
    [
      "-f",
      "-i",
      "127.0.0.1",
      "-p",
      String(port),
      ...nbdkitTlsArgs({ kind: "x509", dir: f.serverDir }),
      "memory",
      `${TARGET_BYTES}`,
    ],
    { timeoutMs: 10 * 60_000 },
  );
  t.after(async () => {
    kit.proc.kill("SIGKILL");
    await kit.result.catch(() => undefined);
  });
  await pollUntil("nbdkit on TCP", () => acceptsTcp(port), 15_000);
  await addX509(d, "tls0", f.clientCaOnlyDir);
  const server = { type: "inet", host: "127.0.0.1", port: String(port) };
  await d.qmp.execute("blockdev-add", { ...nodeOptions("", "tls0"), server });
  await roundTrip(d, null, 0x11);
  // The same server named by an address the certificate does not carry.
  await assertQmpError(
    d.qmp.execute("blockdev-add", {
      ...nodeOptions("", "tls0"),
      "node-name": "r2",
      server,
      "tls-hostname": "127.0.0.2",
    }),
    "GenericError",
    /the server's certificate is not for '127\.0\.0\.2' \(tls-hostname\)/,
  );
});

// ---- what goes wrong, and says so ------------------------------------------------------------------

test("a server without TLS, a wrong CA and an expired certificate are refused with the reason", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const plain = await qemuNbdTarget(t, d, undefined, "plain");
  const good = await qemuNbdTarget(t, d, { kind: "x509", dir: f.serverDir }, "good");
  // qemu-nbd refuses to serve an expired certificate; nbdkit serves it.
  const expired = await startNbdkit(t, join(d.dir, "expired.sock"), [
    ...nbdkitTlsArgs({ kind: "x509", dir: f.expiredServerDir }),
    "memory",
    `${TARGET_BYTES}`,
  ]);
  await addX509(d, "tls0", f.clientCaOnlyDir);
  await addX509(d, "wrongca", f.wrongCaClientDir);
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(plain.remote.socket, "tls0")),
    "GenericError",
    "Failed to connect to the NBD server: server does not support TLS (it refused NBD_OPT_STARTTLS: TLS not configured)",
  );
  const plainKit = await startNbdkit(t, join(d.dir, "plain-kit.sock"), ["memory", `${TARGET_BYTES}`]);
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(plainKit.socket, "tls0")),
    "GenericError",
    /^Failed to connect to the NBD server: server does not support TLS \(it refused NBD_OPT_STARTTLS/,
  );
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(good.remote.socket, "wrongca")),
    "GenericError",
    new RegExp(
      `TLS handshake with the NBD server failed: the server's certificate is not signed by the CA in ${f.wrongCaClientDir}/ca-cert.pem`,
    ),
  );
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(expired.socket, "tls0")),
    "GenericError",
    /TLS handshake with the NBD server failed: the server's certificate has expired/,
  );
  // Nothing was added, and no object is held by a node that does not exist.
  assert.equal(await nodeInfo(d), undefined);
  await d.qmp.execute("object-del", { id: "wrongca" });
});

test("object-add and object-del: QEMU's errors, missing files named, objects in use kept", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const add = (args: Record<string, unknown>) => d.qmp.execute("object-add", args);
  await assertQmpError(
    add({ "qom-type": "no-such-type", id: "x" }),
    "GenericError",
    "Parameter 'qom-type' does not accept value 'no-such-type'",
  );
  await assertQmpError(
    add({ "qom-type": "iothread", id: "s0" }),
    "GenericError",
    "drivetap cannot create objects of type 'iothread' (only tls-creds-x509, tls-creds-psk, authz-simple, authz-list, throttle-group, secret)",
  );
  await assertQmpError(
    add({ "qom-type": "tls-creds-x509", id: "t" }),
    "GenericError",
    "Missing 'dir' property value",
  );
  await assertQmpError(
    add({ "qom-type": "tls-creds-x509", id: "t", dir: join(f.root, "nowhere") }),
    "GenericError",
    `tls-creds-x509 't': x509 credentials directory ${join(f.root, "nowhere")} does not exist`,
  );
  await assertQmpError(
    add({ "qom-type": "tls-creds-x509", id: "t", dir: f.clientCaOnlyDir, endpoint: "server" }),
    "GenericError",
    `tls-creds-x509 't': cannot read ${f.clientCaOnlyDir}/server-cert.pem: no such file`,
  );
  await assertQmpError(
    add({ "qom-type": "tls-creds-psk", id: "p", dir: f.clientCaOnlyDir, username: "u" }),
    "GenericError",
    new RegExp(`tls-creds-psk 'p': cannot read PSK file ${f.clientCaOnlyDir}/keys.psk`),
  );
  await assertQmpError(
    add({ "qom-type": "tls-creds-psk", id: "p", dir: f.pskDir, username: "nobody" }),
    "GenericError",
    `tls-creds-psk 'p': PSK file ${f.pskFile} has no key for username 'nobody'`,
  );
  await assertQmpError(
    add({ "qom-type": "tls-creds-x509", id: "t", dir: f.mismatchedKeyDir }),
    "GenericError",
    new RegExp(
      `the key in ${f.mismatchedKeyDir}/client-cert.pem and client-key.pem does not match the certificate`,
    ),
  );
  await assertQmpError(
    add({ "qom-type": "tls-creds-x509", id: "t", dir: f.clientDir, username: "u" }),
    "GenericError",
    "Parameter 'username' is unexpected",
  );
  await assertQmpError(
    add({ "qom-type": "tls-creds-x509", id: "1bad", dir: f.clientDir }),
    "GenericError",
    "Parameter 'id' expects an identifier",
  );
  await assertQmpError(d.qmp.execute("object-del", { id: "t" }), "GenericError", "object 't' not found");

  await add({ "qom-type": "tls-creds-x509", id: "tls0", dir: f.clientCaOnlyDir, endpoint: "client" });
  await add({ "qom-type": "tls-creds-x509", id: "srv", dir: f.serverDir, endpoint: "server" });
  await assertQmpError(
    add({ "qom-type": "tls-creds-psk", id: "tls0", dir: f.pskDir, username: f.pskIdentity }),
    "GenericError",
    "attempt to add duplicate property 'tls0' to object (type 'container')",
  );

  const { remote } = await qemuNbdTarget(t, d, { kind: "x509", dir: f.serverDir });
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(remote.socket, "nope")),
    "GenericError",
    "No TLS credentials with id 'nope'",
  );
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(remote.socket, "srv")),
    "GenericError",
    "Expected TLS credentials for a client endpoint",
  );
  await assertQmpError(
    d.qmp.execute("blockdev-add", nodeOptions(remote.socket, undefined, { "tls-hostname": "localhost" })),
    "GenericError",
    "tls-hostname can only be used with tls-creds",
  );
  await d.qmp.execute("blockdev-add", nodeOptions(remote.socket, "tls0"));
  await assertQmpError(
    d.qmp.execute("object-del", { id: "tls0" }),
    "GenericError",
    "object 'tls0' is in use, can not be deleted: used by node remote",
  );
  await d.qmp.execute("blockdev-del", { "node-name": "remote" });
  await d.qmp.execute("object-del", { id: "tls0" });
  await d.qmp.execute("object-del", { id: "srv" });
  // The id is free again.
  await add({ "qom-type": "tls-creds-x509", id: "tls0", dir: f.clientCaOnlyDir });
});

test("the node reconnects over TLS after a kill; a reconnect refused by TLS is logged with its reason", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const image = join(d.dir, "target.img");
  makeImage(image, TARGET_BYTES);
  const socket = join(d.dir, "target.sock");
  let remote = await startQemuNbd(t, image, socket, { tls: { kind: "x509", dir: f.serverDir } });
  await addX509(d, "tls0", f.clientCaOnlyDir);
  await d.qmp.execute("blockdev-add", nodeOptions(socket, "tls0", { "reconnect-delay": 30 }));
  await roundTrip(d, image, 0x71);
  const uri = unixUri(d.daemon.socket, "remote");

  // The server comes back with a certificate from another CA: the node keeps trying and says why.
  await remote.kill();
  await pollUntil("disconnected", async () => (await nodeInfo(d))?.["x-connected"] === false);
  rmSync(socket, { force: true });
  remote = await startQemuNbd(t, image, socket, { tls: { kind: "x509", dir: f.foreignServerDir } });
  await d.daemon.waitForStderr(
    (s) => /NBD reconnect failed/.test(s) && /the server's certificate is not signed by the CA in/.test(s),
    30_000,
  );
  assert.equal((await nodeInfo(d))?.["x-connected"], false, "a certificate from another CA is not accepted");

  // Back with the right certificate: a write waiting within reconnect-delay goes through over TLS.
  await remote.kill();
  const writer = qemuIo(uri, ["write -P 0x72 2M 64k", "flush"]);
  remote = await startQemuNbd(t, image, socket, { tls: { kind: "x509", dir: f.serverDir } });
  assertExit("qemu-io after reconnect", await writer);
  assert.equal((await nodeInfo(d))?.["x-connected"], true);
  assert.ok(readImage(image, 2 * MiB, 64 * 1024).every((b) => b === 0x72));
});
