/**
 * Server-side TLS against real clients: nbdinfo (libnbd's nbds:// URIs), qemu-img and qemu-io
 * (tls-creds-x509 / tls-creds-psk objects) and fio, with certificates and PSK files made at test time.
 * Then every way it goes wrong, each seen from both sides (the client fails, the daemon logs why and
 * goes on serving): plaintext against `require`, TLS against no TLS, wrong CA, expired and mismatched
 * certificates, unknown PSK identities and wrong keys, peers --tls-authz does not list. Last, hostile
 * handshakes on a raw socket: garbage after STARTTLS, STARTTLS twice, bytes sent before the ACK,
 * a TLS handshake that never finishes (cut at the handshake bound while honest clients are served),
 * and TLS handshakes filling one address's handshake slots.
 */
import { after, before, test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as C from "../../src/nbd/protocol/constants.js";
import { encodeExportRequest } from "../../src/nbd/protocol/codec.js";
import {
  CONNECTION_BUFFER_BYTES_MAX,
  HANDSHAKE_TIMEOUT_MS,
  HANDSHAKES_PER_ADDRESS_MAX,
  REQUEST_BYTES_MAX,
} from "../../src/nbd/server/limits.js";
import { SLABS_MAX } from "../../src/nbd/server/socket-reader.js";
import { QmpClient } from "../../src/qmp/client.js";
import { CLI, readImage, serveTempImage, type RunningDaemon } from "../helpers/daemon.js";
import { RawNbd } from "../helpers/raw-nbd.js";
import { assertNothingLeft, pasteIntoShell, readmeSection } from "../helpers/readme.js";
import { run, tempDir, type RunResult } from "../helpers/run.js";
import { clientTls, makePskFile, makeX509Dir, type X509Dir } from "../helpers/tls-certs.js";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 64 * MiB;

interface Creds {
  /** CA 1: server and client certificates (CN=client). */
  good: X509Dir;
  /** CA 1, client certificate CN=alice. */
  alice: X509Dir;
  /** CA 2, unrelated: its client does not trust CA 1's server, and CA 1 does not trust its client. */
  otherCa: X509Dir;
  /** CA 1's ca-cert.pem with CA 2's client certificate: trusts the server, is not trusted by it. */
  foreignClient: string;
  /** CA 1, the server certificate expired in 2020. */
  expiredServer: X509Dir;
  /** CA 1, the client certificate expired in 2020. */
  expiredClient: X509Dir;
  /** CA 1, no client certificate. */
  noClientCert: X509Dir;
  /** CA 1, server-key.pem of another key pair. */
  mismatchedServer: X509Dir;
  /** keys.psk with alice and bob; alice's key alone; bob's key alone; alice with a wrong key. */
  pskBoth: string;
  pskAlice: string;
  pskBob: string;
  pskAliceWrong: string;
  /** QEMU's tls-creds-psk takes a directory holding keys.psk. */
  pskAliceDir: string;
}

let creds: Creds;
let root: string;

after(() => rmSync(root, { recursive: true, force: true }));

before(() => {
  root = mkdtempSync(join(tmpdir(), "drivetap-tls-"));
  const good = makeX509Dir(join(root, "good"));
  const otherCa = makeX509Dir(join(root, "other-ca"));
  const foreignClient = join(root, "foreign-client");
  mkdirSync(foreignClient);
  copyFileSync(join(good.dir, "ca-cert.pem"), join(foreignClient, "ca-cert.pem"));
  for (const f of ["client-cert.pem", "client-key.pem"])
    copyFileSync(join(otherCa.dir, f), join(foreignClient, f));
  const aliceKey = randomBytes(32);
  const bobKey = randomBytes(32);
  const pskBoth = join(root, "both.psk");
  writeFileSync(pskBoth, `alice:${aliceKey.toString("hex")}\nbob:${bobKey.toString("hex")}\n`);
  const pskAliceDir = join(root, "psk-alice");
  mkdirSync(pskAliceDir);
  makePskFile(join(pskAliceDir, "keys.psk"), "alice", aliceKey);
  creds = {
    good,
    alice: makeX509Dir(join(root, "alice"), { ca: good.ca, clientSubject: "/O=drivetap test/CN=alice" }),
    otherCa,
    foreignClient,
    expiredServer: makeX509Dir(join(root, "expired-server"), { ca: good.ca, expired: "server" }),
    expiredClient: makeX509Dir(join(root, "expired-client"), { ca: good.ca, expired: "client" }),
    noClientCert: makeX509Dir(join(root, "no-client"), { ca: good.ca, noClientCert: true }),
    mismatchedServer: makeX509Dir(join(root, "mismatched"), { ca: good.ca, mismatchedKey: "server" }),
    pskBoth,
    pskAlice: join(pskAliceDir, "keys.psk"),
    pskBob: (() => {
      const f = join(root, "bob.psk");
      makePskFile(f, "bob", bobKey);
      return f;
    })(),
    pskAliceWrong: (() => {
      const f = join(root, "alice-wrong.psk");
      makePskFile(f, "alice");
      return f;
    })(),
    pskAliceDir,
  };
});

async function serve(t: TestContext, args: readonly string[], opts: { tcp?: boolean } = {}) {
  return serveTempImage(t, IMAGE_BYTES, { args, tcp: opts.tcp });
}

function nbdinfo(uri: string, extra: readonly string[] = []): Promise<RunResult> {
  return run("nbdinfo", [...extra, uri], { timeoutMs: 30_000 });
}

function x509Uri(d: RunningDaemon, dir: string, extra = ""): string {
  return `nbds+unix:///?socket=${d.socket}&tls-certificates=${dir}${extra}`;
}

function pskUri(d: RunningDaemon, user: string, file: string): string {
  return `nbds+unix://${user}@/?socket=${d.socket}&tls-psk-file=${file}`;
}

/** qemu-io over TLS on the daemon's unix socket (QEMU checks the certificate against tls-hostname). */
function qemuIo(d: RunningDaemon, object: string, commands: readonly string[]): Promise<RunResult> {
  const args = ["--object", object];
  for (const c of commands) args.push("-c", c);
  const tlsHostname = object.startsWith("tls-creds-x509") ? ",tls-hostname=localhost" : "";
  args.push(
    "--image-opts",
    `driver=nbd,server.type=unix,server.path=${d.socket},tls-creds=tls0${tlsHostname}`,
  );
  return run("qemu-io", args, { timeoutMs: 30_000 });
}

const x509Object = (dir: string): string => `tls-creds-x509,id=tls0,dir=${dir},endpoint=client`;
const pskObject = (dir: string, user: string): string =>
  `tls-creds-psk,id=tls0,dir=${dir},username=${user},endpoint=client`;

function assertFailed(r: RunResult, what: string, stderr?: RegExp): void {
  assert.notEqual(r.code, 0, `${what} must fail\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  if (stderr) assert.match(r.stderr, stderr, `${what}: the client says why`);
}

/** The daemon is alive and serves an honest TLS client after whatever the test did. */
async function assertStillServes(d: RunningDaemon, uri: string): Promise<void> {
  assert.ok(d.alive(), "the daemon is still running");
  const r = await nbdinfo(uri);
  assert.equal(r.code, 0, `an honest client is served afterwards: ${r.stderr}`);
  assert.match(r.stdout, /with TLS/);
}

/** A raw client through the greeting; the caller sends options. */
async function rawClient(d: RunningDaemon): Promise<RawNbd> {
  const c = await RawNbd.connect(d.socket);
  await c.handshake();
  return c;
}

// ---- real clients, x509 ---------------------------------------------------------------------------

test("x509: nbdinfo, qemu-io and qemu-img over nbds+unix, and a write reaches the disk", async (t) => {
  const { daemon, image } = await serve(t, ["--tls-creds", creds.good.dir]);
  assert.match(daemon.uri, /^nbds\+unix:\/\/\/\?socket=/, "the ready line gives an nbds URI");
  const info = await nbdinfo(x509Uri(daemon, creds.good.dir));
  assert.equal(info.code, 0, info.stderr);
  assert.match(info.stdout, /newstyle-fixed with TLS/);
  assert.match(info.stdout, new RegExp(`export-size: ${IMAGE_BYTES}`));

  const w = await qemuIo(daemon, x509Object(creds.good.dir), ["write -P 0x5c 1M 1M", "read -P 0x5c 1M 1M"]);
  assert.equal(w.code, 0, w.stderr);
  assert.doesNotMatch(w.stdout, /Pattern verification failed/);
  assert.ok(readImage(image, MiB, MiB).equals(Buffer.alloc(MiB, 0x5c)), "the TLS write is on the disk");

  const img = await run("qemu-img", [
    "info",
    "--output=json",
    "--object",
    x509Object(creds.good.dir),
    "--image-opts",
    `driver=nbd,server.type=unix,server.path=${daemon.socket},tls-creds=tls0,tls-hostname=localhost`,
  ]);
  assert.equal(img.code, 0, img.stderr);
  assert.equal(JSON.parse(img.stdout)["virtual-size"], IMAGE_BYTES);
});

test("x509 over TCP: nbds://127.0.0.1 with nbdinfo and qemu-img (server.type=inet)", async (t) => {
  const { daemon } = await serve(t, ["--tls-creds", creds.good.dir, "--port", "0"], { tcp: true });
  assert.match(daemon.uri, /^nbds:\/\//);
  const port = portOf(daemon);
  const info = await nbdinfo(`nbds://127.0.0.1:${port}/?tls-certificates=${creds.good.dir}`);
  assert.equal(info.code, 0, info.stderr);
  assert.match(info.stdout, /with TLS/);
  const img = await run("qemu-img", [
    "info",
    "--output=json",
    "--object",
    x509Object(creds.good.dir),
    "--image-opts",
    `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${port},tls-creds=tls0`,
  ]);
  assert.equal(img.code, 0, img.stderr);
  assert.equal(JSON.parse(img.stdout)["virtual-size"], IMAGE_BYTES);
  // No warning: TLS is required, and the address is loopback anyway.
  assert.doesNotMatch(daemon.stderr(), /non-loopback/);
});

test("--tls-verify-peer: a CA-signed client certificate is served; none, a foreign or an expired one are refused", async (t) => {
  const { daemon } = await serve(t, ["--tls-creds", creds.good.dir, "--tls-verify-peer"]);
  const ok = await nbdinfo(x509Uri(daemon, creds.good.dir));
  assert.equal(ok.code, 0, ok.stderr);
  const q = await qemuIo(daemon, x509Object(creds.good.dir), ["read 0 64k"]);
  assert.equal(q.code, 0, q.stderr);

  assertFailed(await nbdinfo(x509Uri(daemon, creds.noClientCert.dir)), "no client certificate");
  await daemon.waitForStderr(/presented no certificate/);

  // gnutls sends no certificate the server's CA list does not cover, so libnbd's foreign client
  // presents none; OpenSSL's client sends it anyway, and the server checks and refuses it.
  assertFailed(await nbdinfo(x509Uri(daemon, creds.foreignClient)), "libnbd, certificate from another CA");
  const foreign = await rawClient(daemon);
  await foreign.startTls(clientTls(creds.foreignClient)).catch(() => undefined);
  await foreign.expectEof();
  await daemon.waitForStderr(
    /client certificate 'CN=client,O=drivetap test' is not signed by the CA in .*good.ca-cert\.pem/,
  );

  assertFailed(await nbdinfo(x509Uri(daemon, creds.expiredClient.dir)), "an expired client certificate");
  await daemon.waitForStderr(
    /client certificate 'CN=client,O=drivetap test' expired on Jan {2}2 00:00:00 2020/,
  );
  await assertStillServes(daemon, x509Uri(daemon, creds.good.dir));
});

/** The TCP port of a daemon started with --port 0. */
function portOf(d: RunningDaemon): number {
  const m = /^nbds?:\/\/127\.0\.0\.1:(\d+)\/$/.exec(d.uri);
  assert.ok(m, `TCP URI: ${d.uri}`);
  return Number(m[1]);
}

// libnbd checks the server's certificate only when it has a host name to check it against, so these
// run over TCP (over a unix socket, libnbd 1.14 accepts any certificate).
test("the server's certificate over TCP: a client trusting another CA, or an expired certificate, fails on both sides", async (t) => {
  const { daemon } = await serve(t, ["--tls-creds", creds.good.dir, "--port", "0"], { tcp: true });
  const tcp = (dir: string, extra = ""): string =>
    `nbds://127.0.0.1:${portOf(daemon)}/?tls-certificates=${dir}${extra}`;
  assertFailed(
    await nbdinfo(tcp(creds.otherCa.dir)),
    "a client that trusts another CA",
    /certificate verification/i,
  );
  await daemon.waitForStderr(/refused the server's certificate/);
  const q = await run("qemu-io", [
    "--object",
    x509Object(creds.otherCa.dir),
    "-c",
    "read 0 4k",
    "--image-opts",
    `driver=nbd,server.type=inet,server.host=127.0.0.1,server.port=${portOf(daemon)},tls-creds=tls0`,
  ]);
  assertFailed(q, "qemu-io trusting another CA", /certificate/i);
  const ok = await nbdinfo(tcp(creds.good.dir));
  assert.equal(ok.code, 0, `an honest client is served afterwards: ${ok.stderr}`);

  const expired = await serve(t, ["--tls-creds", creds.expiredServer.dir, "--port", "0"], { tcp: true });
  const expiredUri = (): string =>
    `nbds://127.0.0.1:${portOf(expired.daemon)}/?tls-certificates=${creds.good.dir}`;
  assertFailed(
    await nbdinfo(expiredUri()),
    "a client of a server whose certificate expired",
    /verification|expired/i,
  );
  await expired.daemon.waitForStderr(/refused the server's certificate/);
  // The expired certificate differs from the good one (same CA, same names) in its dates only, and the
  // same client was served by the good one above.
});

test("bad credentials stop the start with a message naming the file", async (t) => {
  const dir = tempDir(t);
  const cases: Array<[string[], RegExp]> = [
    [["--tls-creds", creds.mismatchedServer.dir], /server-key\.pem is not the key of server-cert\.pem/],
    [["--tls-creds", join(dir, "nope")], /x509 credentials directory .*nope does not exist/],
    [
      ["--tls-creds", creds.noClientCert.dir, "--tls-psk", creds.pskAlice],
      /--tls-creds or --tls-psk, not both/,
    ],
    [["--tls", "on"], /--tls on needs credentials/],
    [["--tls", "maybe"], /expected off, on or require/],
    [["--tls-verify-peer"], /needs --tls-creds/],
    [["--tls-authz", "alice"], /--tls-authz needs TLS/],
    [["--tls-psk", join(dir, "none.psk")], /PSK file .* does not exist/],
    // With --tls on a plaintext client would never meet these checks.
    [
      ["--tls-creds", creds.noClientCert.dir, "--tls", "on", "--tls-authz", "CN=alice"],
      /--tls-authz needs --tls require/,
    ],
    [
      ["--tls-creds", creds.noClientCert.dir, "--tls", "on", "--tls-verify-peer"],
      /--tls-verify-peer needs --tls require/,
    ],
  ];
  for (const [args, message] of cases) {
    const r = await run(process.execPath, [CLI, "serve", "--socket", join(dir, "s.sock"), ...args], {
      timeoutMs: 30_000,
    });
    assert.equal(r.code, 1, `${args.join(" ")} exits 1: ${r.stdout}${r.stderr}`);
    assert.match(r.stderr, message, args.join(" "));
  }
});

// ---- PSK ------------------------------------------------------------------------------------------

test("PSK: nbdinfo and qemu-io as alice; an unknown identity and a wrong key fail on both sides", async (t) => {
  const { daemon, image } = await serve(t, ["--tls-psk", creds.pskBoth]);
  const info = await nbdinfo(pskUri(daemon, "alice", creds.pskAlice));
  assert.equal(info.code, 0, info.stderr);
  assert.match(info.stdout, /with TLS/);
  const w = await qemuIo(daemon, pskObject(creds.pskAliceDir, "alice"), [
    "write -P 0x3e 0 64k",
    "read -P 0x3e 0 64k",
  ]);
  assert.equal(w.code, 0, w.stderr);
  assert.ok(readImage(image, 0, 65536).equals(Buffer.alloc(65536, 0x3e)));

  const unknown = await serve(t, ["--tls-psk", creds.pskAlice]);
  assertFailed(await nbdinfo(pskUri(unknown.daemon, "bob", creds.pskBob)), "an unknown PSK identity");
  await unknown.daemon.waitForStderr(/unknown PSK identity 'bob'/);
  assertFailed(await nbdinfo(pskUri(unknown.daemon, "alice", creds.pskAliceWrong)), "alice with a wrong key");
  await unknown.daemon.waitForStderr(/the client's key for PSK identity 'alice' is not the one in/);
  // An x509 client cannot talk to a PSK server: no cipher suite in common.
  assertFailed(await nbdinfo(x509Uri(unknown.daemon, creds.good.dir)), "an x509 client of a PSK server");
  await unknown.daemon.waitForStderr(/no cipher suite in common/);
  const ok = await nbdinfo(pskUri(unknown.daemon, "alice", creds.pskAlice));
  assert.equal(ok.code, 0, `alice is still served: ${ok.stderr}`);
});

// ---- authorization --------------------------------------------------------------------------------

test("--tls-authz: listed certificate subjects and PSK identities are served, others get ERR_POLICY", async (t) => {
  assert.equal(creds.alice.clientDn, "CN=alice,O=drivetap test");
  const { daemon } = await serve(t, ["--tls-creds", creds.good.dir, "--tls-authz", creds.alice.clientDn]);
  const alice = await nbdinfo(x509Uri(daemon, creds.alice.dir));
  assert.equal(alice.code, 0, alice.stderr);
  const other = await nbdinfo(x509Uri(daemon, creds.good.dir));
  assertFailed(other, "a verified client whose subject is not listed");
  await daemon.waitForStderr(
    /TLS peer not authorized: certificate subject 'CN=client,O=drivetap test' is not in --tls-authz/,
  );

  // On the wire: the TLS session is up, and every option but ABORT is refused with the reason.
  const raw = await rawClient(daemon);
  await raw.startTls(clientTls(creds.good.dir));
  raw.sendOption(C.NBD_OPT_GO, encodeExportRequest("", []));
  const refused = await raw.readOptionReply();
  assert.equal(refused.type >>> 0, C.NBD_REP_ERR_POLICY);
  assert.match(
    refused.data.toString(),
    /certificate subject 'CN=client,O=drivetap test' is not in --tls-authz/,
  );
  raw.sendOption(C.NBD_OPT_LIST);
  assert.equal((await raw.readOptionReply()).type >>> 0, C.NBD_REP_ERR_POLICY, "LIST refused too");
  raw.sendOption(C.NBD_OPT_ABORT);
  assert.equal((await raw.readOptionReply()).type, C.NBD_REP_ACK);
  await raw.expectEof();

  // A DN with a comma of its own is one --tls-authz value.
  const acme = makeX509Dir(join(root, "acme"), { ca: creds.good.ca, clientSubject: "/O=Acme, Inc./CN=bob" });
  assert.equal(acme.clientDn, "CN=bob,O=Acme\\, Inc.");
  const two = await serve(t, [
    "--tls-creds",
    creds.good.dir,
    "--tls-authz",
    creds.alice.clientDn,
    "--tls-authz",
    acme.clientDn,
  ]);
  for (const dir of [creds.alice.dir, acme.dir]) {
    const r = await nbdinfo(x509Uri(two.daemon, dir));
    assert.equal(r.code, 0, `${dir}: ${r.stderr}`);
  }
  assertFailed(await nbdinfo(x509Uri(two.daemon, creds.good.dir)), "CN=client with two names listed");

  const psk = await serve(t, ["--tls-psk", creds.pskBoth, "--tls-authz", "alice"]);
  const a = await nbdinfo(pskUri(psk.daemon, "alice", creds.pskAlice));
  assert.equal(a.code, 0, a.stderr);
  assertFailed(
    await nbdinfo(pskUri(psk.daemon, "bob", creds.pskBob)),
    "bob, whose key is right but who is not listed",
  );
  await psk.daemon.waitForStderr(/PSK identity 'bob' is not in --tls-authz/);
});

// ---- modes ----------------------------------------------------------------------------------------

test("--tls require: plaintext options get ERR_TLS_REQD (ABORT excepted), EXPORT_NAME closes, clients say so", async (t) => {
  const { daemon } = await serve(t, ["--tls-creds", creds.good.dir]);
  const raw = await rawClient(daemon);
  for (const [option, data] of [
    [C.NBD_OPT_STRUCTURED_REPLY, undefined],
    [C.NBD_OPT_LIST, undefined],
    [C.NBD_OPT_INFO, encodeExportRequest("", [])],
    [C.NBD_OPT_GO, encodeExportRequest("", [])],
    [C.NBD_OPT_SET_META_CONTEXT, undefined],
    [0x1234, undefined],
  ] as const) {
    raw.sendOption(option, data);
    const r = await raw.readOptionReply();
    assert.equal(r.option, option);
    assert.equal(r.type >>> 0, C.NBD_REP_ERR_TLS_REQD, `option ${option} before STARTTLS`);
  }
  raw.sendOption(C.NBD_OPT_ABORT);
  assert.equal((await raw.readOptionReply()).type, C.NBD_REP_ACK, "ABORT is answered");
  await raw.expectEof();

  const byName = await rawClient(daemon);
  byName.sendOption(C.NBD_OPT_EXPORT_NAME, Buffer.alloc(0));
  assert.equal((await byName.expectEof()).length, 0, "EXPORT_NAME before STARTTLS: closed without a reply");

  const plain = await nbdinfo(`nbd+unix:///?socket=${daemon.socket}`);
  assertFailed(plain, "nbdinfo without TLS");
  const qemu = await run("qemu-io", ["-f", "raw", "-c", "read 0 4k", `nbd+unix:///?socket=${daemon.socket}`]);
  assertFailed(
    qemu,
    "qemu-io without TLS",
    /TLS negotiation required[\s\S]*server reported: this server requires TLS/,
  );
  await daemon.waitForStderr(/plaintext client refused: this server requires TLS/);
  await assertStillServes(daemon, x509Uri(daemon, creds.good.dir));
});

test("--tls on serves plaintext and TLS clients; TLS off answers STARTTLS with ERR_UNSUP", async (t) => {
  const on = await serve(t, ["--tls-creds", creds.good.dir, "--tls", "on"]);
  const plain = await nbdinfo(`nbd+unix:///?socket=${on.daemon.socket}`);
  assert.equal(plain.code, 0, plain.stderr);
  assert.match(plain.stdout, /without TLS/);
  const secure = await nbdinfo(x509Uri(on.daemon, creds.good.dir));
  assert.equal(secure.code, 0, secure.stderr);
  assert.match(secure.stdout, /with TLS/);

  const off = await serve(t, []);
  const raw = await rawClient(off.daemon);
  raw.sendOption(C.NBD_OPT_STARTTLS);
  const r = await raw.readOptionReply();
  assert.equal(r.type >>> 0, C.NBD_REP_ERR_UNSUP);
  assert.match(r.data.toString(), /TLS is not enabled/);
  // libnbd keeps the server's reason for its debug log and says "connection is closed"; QEMU says it.
  assertFailed(
    await nbdinfo(`nbds+unix:///?socket=${off.daemon.socket}&tls-certificates=${creds.good.dir}`),
    "a TLS client of a server without TLS",
  );
  const q = await qemuIo(off.daemon, x509Object(creds.good.dir), ["read 0 4k"]);
  assertFailed(q, "qemu-io with TLS against a server without TLS", /support STARTTLS/);
  // `--tls off` with credentials: TLS stays off.
  const offWithCreds = await serve(t, ["--tls-creds", creds.good.dir, "--tls", "off"]);
  assert.match(offWithCreds.daemon.uri, /^nbd\+unix:/);
  const p = await nbdinfo(`nbd+unix:///?socket=${offWithCreds.daemon.socket}`);
  assert.equal(p.code, 0, p.stderr);
});

test("TCP on a non-loopback address warns at start unless TLS is required", async (t) => {
  // The daemon logs asynchronously: a warning is awaited, and the absence of one is read after exit
  // (which flushes the log).
  const plain = await serve(t, ["--port", "0", "--bind", "0.0.0.0"], { tcp: true });
  await plain.daemon.waitForStderr(/non-loopback address without TLS/);
  const optional = await serve(
    t,
    ["--port", "0", "--bind", "0.0.0.0", "--tls-creds", creds.good.dir, "--tls", "on"],
    {
      tcp: true,
    },
  );
  await optional.daemon.waitForStderr(/non-loopback address with TLS optional/);
  const required = await serve(t, ["--port", "0", "--bind", "0.0.0.0", "--tls-creds", creds.good.dir], {
    tcp: true,
  });
  const loopback = await serve(t, ["--port", "0"], { tcp: true });
  for (const d of [required.daemon, loopback.daemon]) {
    assert.equal(await d.stop("SIGTERM"), 0, "the daemon exits cleanly");
    assert.doesNotMatch(d.stderr(), /non-loopback/);
  }
});

test("an export added over QMP (block-export-add) has the server's TLS setting", async (t) => {
  const dir = tempDir(t);
  const qmpPath = join(dir, "qmp.sock");
  const { daemon } = await serve(t, ["--tls-creds", creds.good.dir, "--qmp", qmpPath]);
  const qmp = await QmpClient.connect(qmpPath);
  t.after(() => qmp.close());
  await qmp.execute("block-export-add", { type: "nbd", id: "e2", "node-name": "disk0", name: "second" });
  const plain = await nbdinfo(`nbd+unix:///second?socket=${daemon.socket}`);
  assertFailed(plain, "the new export without TLS");
  const secure = await nbdinfo(
    `nbds+unix:///second?socket=${daemon.socket}&tls-certificates=${creds.good.dir}`,
  );
  assert.equal(secure.code, 0, secure.stderr);
  assert.match(secure.stdout, /export="second"/);
  const conns = (await qmp.execute("x-query-nbd-connections", {})) as unknown[];
  assert.ok(Array.isArray(conns));
});

// ---- hostile handshakes ---------------------------------------------------------------------------

test("a TLS 1.2 client that renegotiates past Node's limit loses its session; others are served", async (t) => {
  const { daemon } = await serve(t, ["--tls-creds", creds.good.dir]);
  const raw = await rawClient(daemon);
  const secure = await raw.startTls({ ...clientTls(creds.good.dir), maxVersion: "TLSv1.2" });
  // Node allows 3 renegotiations in 10 minutes; each one costs the server a full handshake.
  const renegotiate = (): Promise<Error | null> =>
    new Promise((resolve) => {
      if (secure.destroyed) return resolve(new Error("closed"));
      // A server that ends the session answers no renegotiation: the close settles it.
      secure.once("close", () => resolve(new Error("closed")));
      const ok = secure.renegotiate({}, (err) => resolve(err ?? null));
      if (!ok) resolve(new Error("renegotiate refused locally"));
    });
  let attempts = 0;
  while (!raw.ended && !secure.destroyed && attempts < 20) {
    attempts++;
    await renegotiate();
  }
  await raw.whenClosed();
  assert.ok(attempts <= 6, `the server ended the session after ${attempts} renegotiations`);
  const honest = await nbdinfo(x509Uri(daemon, creds.good.dir));
  assert.equal(honest.code, 0, `an honest client is served: ${honest.stderr}`);
});

test("STARTTLS twice gets ERR_INVALID over TLS; options negotiated before STARTTLS are forgotten", async (t) => {
  const { daemon } = await serve(t, ["--tls-creds", creds.good.dir, "--tls", "on"]);
  const raw = await rawClient(daemon);
  // Structured replies in clear (allowed with --tls on) must not survive the upgrade.
  await raw.structuredReplies();
  const secure = await raw.startTls(clientTls(creds.good.dir));
  assert.ok(secure.encrypted);
  raw.sendOption(C.NBD_OPT_STARTTLS);
  const again = await raw.readOptionReply();
  assert.equal(again.type >>> 0, C.NBD_REP_ERR_INVALID, "STARTTLS inside TLS");
  const go = await raw.go("");
  assert.equal(go.size, IMAGE_BYTES);
  assert.equal(go.transmissionFlags & C.NBD_FLAG_SEND_DF, 0, "no DF: structured replies were reset");
  const cookie = raw.sendRequest({ type: C.NBD_CMD_READ, offset: 0, length: 4096 });
  const reply = await raw.readSimpleReply();
  assert.equal(reply.cookie, cookie);
  assert.equal(reply.error, 0, "a simple reply: structured replies were negotiated in clear only");
  await raw.readExact(4096);
  // Structured replies negotiated inside TLS do hold.
  const again2 = await rawClient(daemon);
  await again2.startTls(clientTls(creds.good.dir));
  await again2.structuredReplies();
  const go2 = await again2.go("");
  assert.ok(go2.transmissionFlags & C.NBD_FLAG_SEND_DF);
  await raw.disconnect();
  await again2.disconnect();
});

test("garbage after STARTTLS, or bytes sent before its ACK: that connection closes, the daemon serves on", async (t) => {
  const { daemon } = await serve(t, ["--tls-creds", creds.good.dir]);
  const garbage = await rawClient(daemon);
  await garbage.optionAck(C.NBD_OPT_STARTTLS);
  garbage.send(Buffer.from("GET / HTTP/1.1\r\nHost: x\r\n\r\n" + "x".repeat(2000)));
  await garbage.expectEof();
  await daemon.waitForStderr(/the client did not start a TLS handshake after STARTTLS/);

  const random = await rawClient(daemon);
  await random.optionAck(C.NBD_OPT_STARTTLS);
  random.send(randomBytes(64 * 1024));
  await random.expectEof();

  // STARTTLS and a plaintext GO in one packet: the GO must never be taken as sent over TLS.
  const early = await rawClient(daemon);
  early.send(
    Buffer.concat([
      Buffer.from([0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, C.NBD_OPT_STARTTLS, 0, 0, 0, 0]),
      Buffer.from([0x49, 0x48, 0x41, 0x56, 0x45, 0x4f, 0x50, 0x54, 0, 0, 0, C.NBD_OPT_GO]),
      (() => {
        const req = encodeExportRequest("", []);
        const len = Buffer.alloc(4);
        len.writeUInt32BE(req.length);
        return Buffer.concat([len, req]);
      })(),
    ]),
  );
  assert.equal((await early.expectEof()).length, 0, "closed without an ACK or any reply");
  await daemon.waitForStderr(/client sent data after STARTTLS before the reply; closing/);
  await assertStillServes(daemon, x509Uri(daemon, creds.good.dir));
});

test("a TLS handshake that never finishes is cut at the handshake bound; honest TLS clients are served meanwhile", async (t) => {
  const { daemon } = await serve(t, ["--tls-creds", creds.good.dir]);
  const startedMs = Date.now();
  const stuck = await rawClient(daemon);
  await stuck.optionAck(C.NBD_OPT_STARTTLS);
  // Half a ClientHello: a record header promising more than is sent.
  stuck.send(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]));
  for (let i = 0; i < 3; i++) {
    const r = await nbdinfo(x509Uri(daemon, creds.good.dir));
    assert.equal(r.code, 0, r.stderr);
  }
  assert.equal(stuck.ended, false, "the stuck handshake is still open while others are served");
  await stuck.expectEof(HANDSHAKE_TIMEOUT_MS + 5_000);
  const elapsedMs = Date.now() - startedMs;
  assert.ok(elapsedMs >= HANDSHAKE_TIMEOUT_MS - 200, `cut after ${elapsedMs} ms, not before the bound`);
  await daemon.waitForStderr(/handshake timed out/);
  await assertStillServes(daemon, x509Uri(daemon, creds.good.dir));
});

test("TLS handshakes count against the per-address handshake bound: a stuck one makes room for an honest client", async (t) => {
  const { daemon } = await serve(t, ["--tls-creds", creds.good.dir, "--port", "0"], { tcp: true });
  const port = Number(/:(\d+)\/$/.exec(daemon.uri)![1]);
  const stuck: RawNbd[] = [];
  for (let i = 0; i < HANDSHAKES_PER_ADDRESS_MAX; i++) {
    const c = await RawNbd.connect({ host: "127.0.0.1", port });
    await c.handshake();
    await c.optionAck(C.NBD_OPT_STARTTLS);
    c.send(Buffer.from([0x16, 0x03, 0x01]));
    stuck.push(c);
  }
  t.after(() => stuck.forEach((c) => c.destroy()));
  const r = await nbdinfo(`nbds://127.0.0.1:${port}/?tls-certificates=${creds.good.dir}`);
  assert.equal(r.code, 0, `the honest client is served: ${r.stderr}`);
  await daemon.waitForStderr(/connection evicted/);
  const ended = stuck.filter((c) => c.ended).length;
  assert.ok(ended >= 1, `a stuck TLS handshake was evicted (${ended})`);
  assert.ok(ended < stuck.length, "not all of them: one victim per new connection");
});

// ---- fio ------------------------------------------------------------------------------------------

// fio's nbd engine refuses URI parameters that name local files (tls-certificates, tls-psk-file):
// libnbd's nbd_set_uri_allow_local_file is off there. So fio encrypts without checking the server.
test("fio over TLS (nbds+unix, randwrite 4k..256k QD16) verifies with crc32c", async (t) => {
  const { daemon } = await serve(t, ["--tls-creds", creds.good.dir]);
  const out = join(tempDir(t), "fio.json");
  const r = await run(
    "fio",
    [
      "--name=tls",
      "--ioengine=nbd",
      `--uri=nbds+unix:///?socket=${daemon.socket}&tls-verify-peer=false`,
      "--rw=randwrite",
      "--bsrange=4k-256k",
      `--size=${32 * MiB}`,
      "--iodepth=16",
      "--verify=crc32c",
      "--verify_fatal=1",
      "--verify_state_save=0",
      "--output-format=json",
      `--output=${out}`,
    ],
    { timeoutMs: 120_000 },
  );
  assert.equal(r.code, 0, `fio: ${r.stderr}`);
  const job = JSON.parse(readFileSync(out, "utf8")).jobs[0];
  assert.equal(job.error, 0);
  assert.ok(job.write.io_bytes >= 32 * MiB, `fio wrote ${job.write.io_bytes}`);
  assert.ok(job.read.io_bytes >= 32 * MiB, `fio read back and verified ${job.read.io_bytes}`);
  // Encrypted for real: a plaintext fio is refused by the same server.
  const plain = await run(
    "fio",
    [
      "--name=plain",
      "--ioengine=nbd",
      `--uri=nbd+unix:///?socket=${daemon.socket}`,
      "--rw=read",
      "--size=1M",
    ],
    { timeoutMs: 60_000 },
  );
  assert.notEqual(plain.code, 0, "plaintext fio is refused");
});

test("TLS reads into recycled slabs: a write across slabs, more clients than slabs, and a write that arrives while reading is paused all reach the disk intact", async (t) => {
  const bigBytes = REQUEST_BYTES_MAX;
  const smallBytes = MiB;
  const clients = SLABS_MAX + 4;
  const smallBase = 2 * bigBytes;
  const { daemon, image } = await serveTempImage(t, smallBase + clients * smallBytes, {
    args: ["--tls-creds", creds.good.dir],
  });
  const open = async (): Promise<RawNbd> => {
    const c = await rawClient(daemon);
    await c.startTls(clientTls(creds.good.dir));
    await c.go();
    return c;
  };
  // One write of the largest size: its payload spans many 16 KiB TLS records and several slabs.
  const big = await open();
  const first = randomBytes(bigBytes);
  assert.equal(await big.write(0, first), 0, "a 32 MiB write succeeds");

  // More TLS clients at once than there are slabs: some read into one-shot buffers.
  const many = await Promise.all(Array.from({ length: clients }, open));
  const smallData = many.map(() => randomBytes(smallBytes));
  const errors = await Promise.all(many.map((c, i) => c.write(smallBase + i * smallBytes, smallData[i])));
  assert.deepEqual(errors, new Array(clients).fill(0), "every small write succeeds");

  // The client stops reading replies, so they pile up unsent until the connection's buffer bound
  // holds the next request with the server's reading paused; a 32 MiB write sent behind them is
  // decrypted (in part) while paused, and must come out whole once the client reads again.
  const reads = Math.ceil(CONNECTION_BUFFER_BYTES_MAX / MiB) + 8;
  big.socket.pause();
  const readAt = new Map<number, number>();
  for (let i = 0; i < reads; i++) {
    const offset = (i % (bigBytes / MiB)) * MiB;
    readAt.set(big.sendRequest({ type: C.NBD_CMD_READ, offset, length: MiB }), offset);
  }
  const second = randomBytes(bigBytes);
  const writeCookie = big.sendRequest({
    type: C.NBD_CMD_WRITE,
    offset: bigBytes,
    length: bigBytes,
    payload: second,
  });
  big.socket.resume();
  let writeAnswered = false;
  for (let i = 0; i < reads + 1; i++) {
    const r = await big.readSimpleReply(60_000);
    assert.equal(r.error, 0, `request ${r.cookie} succeeds`);
    if (r.cookie === writeCookie) {
      writeAnswered = true;
      continue;
    }
    const offset = readAt.get(r.cookie);
    assert.ok(offset !== undefined, `reply cookie ${r.cookie} is a read's`);
    readAt.delete(r.cookie);
    const data = await big.readExact(MiB);
    assert.ok(
      data.equals(first.subarray(offset, offset + MiB)),
      `the read at ${offset} returns the first write`,
    );
  }
  assert.ok(writeAnswered && readAt.size === 0, "every request is answered once");

  assert.ok(readImage(image, 0, bigBytes).equals(first), "the first 32 MiB write is on the disk");
  assert.ok(
    readImage(image, bigBytes, bigBytes).equals(second),
    "the write sent while paused is on the disk",
  );
  for (let i = 0; i < clients; i++) {
    assert.ok(
      readImage(image, smallBase + i * smallBytes, smallBytes).equals(smallData[i]),
      `client ${i}'s write is on the disk`,
    );
  }
  await Promise.all([big, ...many].map((c) => c.disconnect()));
  assert.ok(daemon.alive());
});

// ---- the README -----------------------------------------------------------------------------------

test("the README's TLS example, pasted into a shell, serves over TLS and turns plaintext away", async (t) => {
  const script = readmeSection("## Serving over TLS");
  for (const must of [
    "openssl req -x509",
    "--tls-creds /tmp/tls",
    "tls-creds-x509",
    "nbds+unix://",
    "--tls-psk",
  ]) {
    assert.ok(script.includes(must), `the TLS example has ${JSON.stringify(must)}`);
  }
  const { dir, out, r } = await pasteIntoShell(t, script);
  assert.equal(r.code, 0, `the pasted example\n${out}\n${r.stderr}`);
  assert.match(out, /wrote 1048576\/1048576 bytes at offset 0/);
  assert.equal((out.match(/newstyle-fixed with TLS/g) ?? []).length, 2, `x509 and PSK reads:\n${out}`);
  assert.match(out, /^refused without TLS$/m);
  assert.ok(readImage(join(dir, "tls-disk.img"), 0, MiB).equals(Buffer.alloc(MiB, 0xab)));
  await assertNothingLeft(dir);
});
