/**
 * TLS sessions on worker threads (nbd/server/tls-worker.ts, opt-in with DRIVETAP_TLS_WORKERS): real
 * clients are served through them (and without it on the main loop); a worker that crashes closes only
 * its own connections, says so, and loses no acknowledged write; a shutdown with TLS clients
 * connected answers what was admitted and closes the sessions cleanly.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as C from "../../src/nbd/protocol/constants.js";
import { HANDSHAKE_TIMEOUT_MS } from "../../src/nbd/server/limits.js";
import { memoryOf, readImage, serveTempImage, type RunningDaemon } from "../helpers/daemon.js";
import { RawNbd } from "../helpers/raw-nbd.js";
import { run } from "../helpers/run.js";
import { clientTls, makePskFile, makeX509Dir, type X509Dir } from "../helpers/tls-certs.js";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 16 * MiB;
/** What the crash test's worker throws at (DRIVETAP_TEST_TLS_WORKER_CRASH_MARKER). */
const CRASH_MARKER = "drivetap-test-crash-marker";
const WORKERS = { DRIVETAP_TLS_WORKERS: "2" };

let certsRoot: string | null = null;
let certs: X509Dir | null = null;

function x509(): X509Dir {
  if (certs === null) {
    certsRoot = mkdtempSync(join(tmpdir(), "drivetap-tls-worker-"));
    certs = makeX509Dir(join(certsRoot, "x509"));
  }
  return certs;
}

test.after(() => {
  if (certsRoot !== null) rmSync(certsRoot, { recursive: true, force: true });
});

async function tlsClient(d: RunningDaemon): Promise<RawNbd> {
  const c = await RawNbd.connect(d.socket);
  await c.handshake();
  await c.startTls(clientTls(x509().dir));
  await c.go("");
  return c;
}

function nbdinfoUri(d: RunningDaemon): string {
  return `nbds+unix:///?socket=${d.socket}&tls-certificates=${x509().dir}`;
}

test("DRIVETAP_TLS_WORKERS runs TLS sessions on worker threads; by default (or 0) they run on the main loop", async (t) => {
  for (const [workers, thread] of [
    ["auto", "worker"],
    ["2", "worker"],
    [undefined, "main"],
    ["0", "main"],
  ] as const) {
    const env: Record<string, string> = workers === undefined ? {} : { DRIVETAP_TLS_WORKERS: workers };
    const { daemon, image } = await serveTempImage(t, IMAGE_BYTES, {
      args: ["--tls-creds", x509().dir, "--verbose"],
      env,
    });
    const info = await run("nbdinfo", [nbdinfoUri(daemon)], { timeoutMs: 30_000 });
    assert.equal(info.code, 0, info.stderr);
    assert.match(info.stdout, /with TLS/);
    await daemon.waitForStderr(new RegExp(`"thread":"${thread}"[^\\n]*"msg":"TLS established"`));
    // A client's write and read through the session, and the write on disk.
    const c = await tlsClient(daemon);
    const data = randomBytes(256 * 1024);
    assert.equal(await c.write(MiB, data), 0);
    const back = await c.read(MiB, data.length);
    assert.equal(back.error, 0);
    assert.ok(back.data.equals(data), `${thread}: read back what was written`);
    await c.disconnect();
    assert.ok(readImage(image, MiB, data.length).equals(data), `${thread}: the write is on disk`);
    assert.ok(daemon.alive());
  }
});

test("a TLS worker that crashes closes only its own connections, logs it, and loses no acknowledged write", async (t) => {
  const { daemon, image } = await serveTempImage(t, IMAGE_BYTES, {
    args: ["--tls-creds", x509().dir],
    env: { DRIVETAP_TLS_WORKERS: "2", DRIVETAP_TEST_TLS_WORKER_CRASH_MARKER: CRASH_MARKER },
  });
  // The first two sessions go to two workers (a new worker while one has fewer connections).
  const victim = await tlsClient(daemon);
  const bystander = await tlsClient(daemon);
  const acked = randomBytes(64 * 1024);
  assert.equal(await victim.write(0, acked), 0, "a write acknowledged before the crash");

  // A payload that makes the victim's worker throw while it relays it.
  const fatal = Buffer.alloc(4096, CRASH_MARKER);
  victim.sendRequest({ type: C.NBD_CMD_WRITE, offset: 2 * MiB, length: fatal.length, payload: fatal });
  const after = await victim.expectEof();
  assert.equal(after.length, 0, "no reply to the write the worker died relaying");
  await daemon.waitForStderr(/TLS worker \d stopped \([^)]*crash marker[^)]*\); closing its 1 connection"/);

  // The other worker's session goes on, the daemon too, and new sessions get a new worker.
  const more = randomBytes(8192);
  assert.equal(await bystander.write(4 * MiB, more), 0, "the other worker's connection still serves");
  const back = await bystander.read(0, acked.length);
  assert.ok(back.data.equals(acked), "the acknowledged write is there");
  const fresh = await tlsClient(daemon);
  assert.equal(await fresh.write(6 * MiB, more), 0, "a new session after the crash");
  await fresh.disconnect();
  await bystander.disconnect();
  assert.ok(daemon.alive(), "the daemon survived its worker");
  assert.equal(await daemon.stop(), 0);
  assert.ok(readImage(image, 0, acked.length).equals(acked), "the acknowledged write is on disk");
  assert.ok(readImage(image, 4 * MiB, more.length).equals(more));
});

test("shutdown with TLS sessions on workers: every admitted request is answered, then a clean close", async (t) => {
  const { daemon, image } = await serveTempImage(t, IMAGE_BYTES, {
    args: ["--tls-creds", x509().dir],
    env: WORKERS,
  });
  const clients = [await tlsClient(daemon), await tlsClient(daemon), await tlsClient(daemon)];
  const writes = clients.map((c, i) => {
    const data = randomBytes(128 * 1024);
    const cookie = c.sendRequest({
      type: C.NBD_CMD_WRITE,
      offset: i * MiB,
      length: data.length,
      payload: data,
    });
    return { c, data, offset: i * MiB, cookie };
  });
  // Each write has reached the daemon once its reply is back; then more are sent and the daemon is
  // told to stop while they are in flight.
  for (const w of writes) {
    const r = await w.c.readSimpleReply();
    assert.equal(r.cookie, w.cookie);
    assert.equal(r.error, 0);
  }
  const late = writes.map((w) => {
    const data = randomBytes(64 * 1024);
    const offset = w.offset + 512 * 1024;
    const cookie = w.c.sendRequest({ type: C.NBD_CMD_WRITE, offset, length: data.length, payload: data });
    return { c: w.c, data, offset, cookie };
  });
  const exit = daemon.stop();
  for (const w of late) {
    // A request the daemon admitted before it stopped reading gets its reply; one it never read gets
    // none. Either way the session then ends with a TLS close, not a reset.
    const replied = await w.c.readSimpleReply().then(
      (r) => r,
      () => null,
    );
    if (replied !== null) {
      assert.equal(replied.cookie, w.cookie);
      assert.equal(replied.error, 0);
      (w as { acked?: boolean }).acked = true;
    }
    await w.c.expectEof(15_000);
    assert.equal(w.c.socketError, null, "the session closed cleanly");
  }
  assert.equal(await exit, 0);
  for (const w of writes) assert.ok(readImage(image, w.offset, w.data.length).equals(w.data));
  for (const w of late) {
    if ((w as { acked?: boolean }).acked) assert.ok(readImage(image, w.offset, w.data.length).equals(w.data));
  }
});

test("hostile handshakes through a worker: garbage after STARTTLS and a stuck handshake close that connection only", async (t) => {
  const { daemon } = await serveTempImage(t, IMAGE_BYTES, {
    args: ["--tls-creds", x509().dir],
    env: WORKERS,
  });
  const garbage = await RawNbd.connect(daemon.socket);
  await garbage.handshake();
  await garbage.optionAck(C.NBD_OPT_STARTTLS);
  garbage.send(Buffer.from("GET / HTTP/1.1\r\nHost: x\r\n\r\n" + "x".repeat(2000)));
  await garbage.expectEof();
  await daemon.waitForStderr(/the client did not start a TLS handshake after STARTTLS/);

  // Half a ClientHello: the worker waits for the rest; the connection's handshake bound cuts it.
  const stuck = await RawNbd.connect(daemon.socket);
  await stuck.handshake();
  await stuck.optionAck(C.NBD_OPT_STARTTLS);
  stuck.send(Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00]));
  const honest = await tlsClient(daemon);
  assert.equal(await honest.write(0, Buffer.alloc(4096, 1)), 0, "an honest session meanwhile");
  await stuck.expectEof(HANDSHAKE_TIMEOUT_MS + 5_000);
  await daemon.waitForStderr(/handshake timed out/);
  assert.equal(await honest.write(4096, Buffer.alloc(4096, 2)), 0, "and after");
  await honest.disconnect();
  assert.ok(daemon.alive());
});

test("through a worker: PSK identities, --tls-verify-peer and --tls-authz decide as on the main loop", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "drivetap-tls-worker-psk-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const psk = join(dir, "keys.psk");
  makePskFile(psk, "alice");
  const other = join(dir, "other.psk");
  makePskFile(other, "alice");
  const { daemon: pskDaemon } = await serveTempImage(t, IMAGE_BYTES, {
    args: ["--tls-psk", psk],
    env: WORKERS,
  });
  const pskUri = (file: string): string =>
    `nbds+unix://alice@/?socket=${pskDaemon.socket}&tls-psk-file=${file}`;
  const ok = await run("nbdinfo", [pskUri(psk)], { timeoutMs: 30_000 });
  assert.equal(ok.code, 0, ok.stderr);
  const wrong = await run("nbdinfo", [pskUri(other)], { timeoutMs: 30_000 });
  assert.notEqual(wrong.code, 0, "a wrong key fails");
  await pskDaemon.waitForStderr(/the client's key for PSK identity 'alice' is not the one in/);

  const { daemon } = await serveTempImage(t, IMAGE_BYTES, {
    args: ["--tls-creds", x509().dir, "--tls-verify-peer", "--tls-authz", "CN=someone else"],
    env: WORKERS,
  });
  // The certificate verifies in the worker; authz, in the main thread, refuses its subject.
  const refused = await RawNbd.connect(daemon.socket);
  await refused.handshake();
  await refused.startTls(clientTls(x509().dir));
  refused.sendOption(C.NBD_OPT_LIST);
  const reply = await refused.readOptionReply();
  assert.equal(reply.type >>> 0, C.NBD_REP_ERR_POLICY >>> 0);
  await daemon.waitForStderr(/certificate subject 'CN=client,O=drivetap test' is not in --tls-authz/);
  refused.destroy();
});

test("through a worker, a TLS client that stops reading its replies stays within the buffer budget, and another session is served", async (t) => {
  const { daemon } = await serveTempImage(t, IMAGE_BYTES, {
    args: ["--tls-creds", x509().dir, "--max-buffer-memory", "80M"],
    env: { DRIVETAP_TLS_WORKERS: "1" },
  });
  const attacker = await tlsClient(daemon);
  t.after(() => attacker.destroy());
  attacker.socket.pause();
  // 512 MiB of replies asked for and none read: only the budget (80 MiB) and the worker's relay
  // bound (RELAY_PAUSE_BYTES) may hold them.
  const count = 128;
  const length = 4 * MiB;
  for (let i = 0; i < count; i++) {
    attacker.sendRequest({ type: C.NBD_CMD_READ, offset: (i % 4) * length, length });
  }
  // Meanwhile a second session on the same worker writes and reads.
  const honest = await tlsClient(daemon);
  const data = randomBytes(64 * 1024);
  for (let i = 0; i < 20; i++) {
    assert.equal(await honest.write(i * 64 * 1024, data), 0);
    const back = await honest.read(i * 64 * 1024, data.length);
    assert.ok(back.data.equals(data), `round trip ${i}`);
  }
  await honest.disconnect();
  const peak = memoryOf(daemon).peakBytes;
  t.diagnostic(`peak RSS with 512 MiB of replies unread: ${(peak / MiB).toFixed(0)} MiB`);
  assert.ok(peak < 400 * MiB, `peak RSS ${(peak / MiB).toFixed(0)} MiB`);
  // Reading again, the stalled client gets every reply.
  attacker.socket.resume();
  for (let i = 0; i < count; i++) {
    const r = await attacker.readSimpleReply(60_000);
    assert.equal(r.error, 0);
    await attacker.readExact(length, 60_000);
  }
  assert.ok(daemon.alive());
});
