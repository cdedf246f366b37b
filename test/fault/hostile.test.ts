/**
 * Hostile and unlucky clients against the real daemon, each attack on a fresh daemon that runs under
 * an address-space limit (so a leak fails the test, not the machine). Every attack checks that an
 * honest client connecting during it is served, and that the daemon's peak RSS stays within the
 * stated budget (docs/ARCHITECTURE.md, "Bounds"). The figures (peak RSS, the honest client's worst
 * latency, case counts) are printed as test diagnostics.
 */
import { describe, test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import * as net from "node:net";
import fc from "fast-check";
import * as C from "../../src/nbd/protocol/constants.js";
import {
  encodeClientFlags,
  encodeExportRequest,
  encodeOption,
  encodeRequest,
} from "../../src/nbd/protocol/codec.js";
import {
  CONNECTIONS_MAX,
  HANDSHAKES_MAX,
  HANDSHAKES_PER_ADDRESS_MAX,
  IDLE_EVICT_MIN_MS,
  PEER_STALL_TIMEOUT_MS,
  REQUEST_BYTES_MAX,
} from "../../src/nbd/server/limits.js";
import { QMP_CLIENTS_MAX, QMP_NEGOTIATION_TIMEOUT_MS } from "../../src/qmp/server.js";
import { CLI, memoryOf, serveTempImage, type RunningDaemon } from "../helpers/daemon.js";
import { RawNbd, assertRoundTrip, openExport } from "../helpers/raw-nbd.js";
import { RawQmp } from "../helpers/raw-qmp.js";
import { run } from "../helpers/run.js";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 256 * MiB;
/** The RSS the daemon must stay under with default settings (the bound; see ARCHITECTURE). */
const RSS_BUDGET_BYTES = 512 * MiB;
/** ulimit -v for the daemon: Node reserves about 1.1 GB of address space before doing anything. */
const ADDRESS_SPACE_BYTES = 2048 * MiB;
/** Honest probes write here; attacks stay below. */
const HONEST_BASE = IMAGE_BYTES - 16 * MiB;

let probeSlot = 0;
function probeOffset(): number {
  return HONEST_BASE + (probeSlot++ % 4096) * 4096;
}

async function hostileDaemon(t: TestContext, extraArgs: string[] = []): Promise<RunningDaemon> {
  const { daemon } = await serveTempImage(t, IMAGE_BYTES, {
    args: extraArgs,
    addressSpaceBytes: ADDRESS_SPACE_BYTES,
  });
  return daemon;
}

/** A fresh honest client: connect, handshake, GO, write + read back 4 KiB, disconnect. Returns ms. */
async function honestSession(socket: string | net.NetConnectOpts): Promise<number> {
  const start = performance.now();
  const { client } = await openExport(socket);
  try {
    await assertRoundTrip(client, probeOffset());
    await client.disconnect();
  } finally {
    client.destroy();
  }
  return performance.now() - start;
}

/** Runs honest sessions back to back until `stop` resolves; returns the latencies (at least one). */
async function honestDuring(socket: string | net.NetConnectOpts, stop: Promise<unknown>): Promise<number[]> {
  let stopped = false;
  void stop.finally(() => (stopped = true));
  const latencies: number[] = [];
  do latencies.push(await honestSession(socket));
  while (!stopped);
  return latencies;
}

function report(t: TestContext, daemon: RunningDaemon, what: string, latencies: number[] = []): void {
  const { peakBytes } = memoryOf(daemon);
  const worst = latencies.length > 0 ? Math.max(...latencies) : NaN;
  t.diagnostic(
    `${what}: peak RSS ${(peakBytes / MiB).toFixed(0)} MiB; honest sessions ${latencies.length}, ` +
      `worst ${worst.toFixed(1)} ms`,
  );
  assert.ok(
    peakBytes <= RSS_BUDGET_BYTES,
    `peak RSS ${(peakBytes / MiB).toFixed(0)} MiB is within ${RSS_BUDGET_BYTES / MiB} MiB`,
  );
  assert.ok(daemon.alive(), "the daemon is still running");
  assert.doesNotMatch(
    daemon.stderr(),
    /MaxListenersExceededWarning|"level":50/,
    "no warning or internal error",
  );
}

/** A raw client socket that has done the handshake and a GO (simple replies), reading nothing. */
async function attacker(socket: string): Promise<RawNbd> {
  const { client } = await openExport(socket);
  return client;
}

function readRequest(cookie: number, offset: number, length: number): Buffer {
  return encodeRequest({ flags: 0, type: C.NBD_CMD_READ, cookieHi: 0, cookieLo: cookie, offset, length });
}

/** Reads n simple read replies of `length` bytes each, in any order; returns the cookies seen. */
async function readReadReplies(
  c: RawNbd,
  n: number,
  length: number,
  timeoutMs = 60_000,
): Promise<Set<number>> {
  const cookies = new Set<number>();
  for (let i = 0; i < n; i++) {
    const r = await c.readSimpleReply(timeoutMs);
    assert.equal(r.error, 0, `read reply ${i} succeeded`);
    await c.readExact(length, timeoutMs);
    cookies.add(r.cookie);
  }
  return cookies;
}

describe("hostile clients", { timeout: 300_000 }, () => {
  test("a client that pipelines 35,000 small reads and reads the replies late gets every reply, the next request is answered and DISC closes", async (t) => {
    const daemon = await hostileDaemon(t);
    const c = await attacker(daemon.socket);
    t.after(() => c.destroy());
    const count = 35_000;
    const parts: Buffer[] = [];
    for (let i = 1; i <= count; i++) parts.push(readRequest(i, (i % 1024) * 1024, 1024));
    c.send(Buffer.concat(parts));
    // The client does not read for 2 s (the scenario: 32-64 MiB of replies would be queued).
    c.socket.pause();
    await new Promise((resolve) => setTimeout(resolve, 2_000));
    c.socket.resume();
    const cookies = await readReadReplies(c, count, 1024);
    assert.equal(cookies.size, count, "every request got its reply");
    const cookie = c.sendRequest({ type: C.NBD_CMD_READ, offset: 0, length: 4096 });
    const r = await c.readSimpleReply();
    assert.equal(r.cookie, cookie, "the next request is answered");
    await c.readExact(4096);
    await c.disconnect(); // DISC, then the server must close
    report(t, daemon, "35,000 late-read replies");
  });

  for (const burst of [24, 200]) {
    test(`one packet of ${burst} pipelined 32 MiB reads: admitted one by one within the budget, all answered`, async (t) => {
      const daemon = await hostileDaemon(t);
      const c = await attacker(daemon.socket);
      t.after(() => c.destroy());
      const parts: Buffer[] = [];
      for (let i = 1; i <= burst; i++)
        parts.push(readRequest(i, (i % 4) * REQUEST_BYTES_MAX, REQUEST_BYTES_MAX));
      const packet = Buffer.concat(parts);
      assert.ok(packet.length <= 28 * burst, "the whole burst is one small packet");
      c.socket.pause();
      c.send(packet);
      const latencies = await honestDuring(
        daemon.socket,
        new Promise((resolve) => setTimeout(resolve, 1_500)),
      );
      const before = memoryOf(daemon).peakBytes;
      c.socket.resume();
      const cookies = await readReadReplies(c, burst, REQUEST_BYTES_MAX);
      assert.equal(cookies.size, burst, "every read was answered");
      t.diagnostic(`peak RSS while the client did not read: ${(before / MiB).toFixed(0)} MiB`);
      report(t, daemon, `${burst} x 32 MiB reads in one packet`, latencies);
    });
  }

  test("many connections with unread 32 MiB replies share the budget; an honest client is still served", async (t) => {
    const daemon = await hostileDaemon(t);
    const attackers: RawNbd[] = [];
    t.after(() => attackers.forEach((a) => a.destroy()));
    for (let i = 0; i < 24; i++) {
      const a = await attacker(daemon.socket);
      a.socket.pause();
      const parts: Buffer[] = [];
      for (let k = 1; k <= 8; k++)
        parts.push(readRequest(k, ((i + k) % 6) * REQUEST_BYTES_MAX, REQUEST_BYTES_MAX));
      a.send(Buffer.concat(parts));
      attackers.push(a);
    }
    const latencies = await honestDuring(daemon.socket, new Promise((resolve) => setTimeout(resolve, 3_000)));
    report(t, daemon, "24 connections x 8 unread 32 MiB reads", latencies);
  });

  test("128 connections with unread replies and a daemon started with a small --max-buffer-memory", async (t) => {
    const daemon = await hostileDaemon(t, ["--max-buffer-memory", "96M"]);
    const attackers: RawNbd[] = [];
    t.after(() => attackers.forEach((a) => a.destroy()));
    for (let i = 0; i < CONNECTIONS_MAX - 1; i++) {
      const a = await attacker(daemon.socket);
      a.socket.pause();
      a.send(Buffer.concat([readRequest(1, 0, 4 * MiB), readRequest(2, 4 * MiB, 4 * MiB)]));
      attackers.push(a);
    }
    const latencies = await honestDuring(daemon.socket, new Promise((resolve) => setTimeout(resolve, 2_000)));
    const peak = memoryOf(daemon).peakBytes;
    assert.ok(peak <= 96 * MiB + 300 * MiB, `peak ${(peak / MiB).toFixed(0)} MiB follows the smaller budget`);
    report(t, daemon, "127 connections x 2 unread 4 MiB reads, 96 MiB budget", latencies);
  });

  test("clients stalled in the middle of 32 MiB write payloads hold no more than the budget; small I/O goes on", async (t) => {
    const daemon = await hostileDaemon(t);
    const attackers: RawNbd[] = [];
    t.after(() => attackers.forEach((a) => a.destroy()));
    for (let i = 0; i < 32; i++) {
      const a = await attacker(daemon.socket);
      const header = encodeRequest({
        flags: 0,
        type: C.NBD_CMD_WRITE,
        cookieHi: 0,
        cookieLo: 1,
        offset: 0,
        length: REQUEST_BYTES_MAX,
      });
      // Header and 1 MiB of the payload, then nothing.
      a.send(Buffer.concat([header, Buffer.alloc(MiB, 0x77)]));
      attackers.push(a);
    }
    const latencies = await honestDuring(daemon.socket, new Promise((resolve) => setTimeout(resolve, 2_000)));
    report(t, daemon, "32 stalled 32 MiB write payloads", latencies);
  });

  /**
   * Holds `count` handshakes that never send a byte, reconnecting each one as soon as the server cuts
   * it. Returns a stop function and the number of connections opened.
   */
  function handshakeFlood(
    target: net.NetConnectOpts,
    count: number,
  ): { stop: () => void; opened: () => number } {
    let stopping = false;
    const sockets = new Set<net.Socket>();
    let opened = 0;
    const open = (): void => {
      if (stopping) return;
      const s = net.createConnection(target);
      opened++;
      sockets.add(s);
      s.on("error", () => {});
      s.on("data", () => {}); // read the greeting, so the server's close is seen
      s.on("close", () => {
        sockets.delete(s);
        setImmediate(open);
      });
    };
    for (let i = 0; i < count; i++) open();
    return {
      stop: () => {
        stopping = true;
        for (const s of sockets) s.destroy();
      },
      opened: () => opened,
    };
  }

  test(`${HANDSHAKES_MAX} stalled handshakes, each reconnecting as it is cut, do not keep an honest client out`, async (t) => {
    const daemon = await hostileDaemon(t);
    const flood = handshakeFlood({ path: daemon.socket }, HANDSHAKES_MAX);
    t.after(flood.stop);
    const latencies = await honestDuring(daemon.socket, new Promise((resolve) => setTimeout(resolve, 3_000)));
    flood.stop();
    assert.ok(flood.opened() > HANDSHAKES_MAX, `the attacker reconnected (${flood.opened()} connections)`);
    t.diagnostic(`attacker opened ${flood.opened()} connections`);
    report(t, daemon, "stalled handshakes (unix socket)", latencies);
  });

  test(`TCP: a flood of ${4 * HANDSHAKES_MAX} reconnecting handshakes from one address takes only its ${HANDSHAKES_PER_ADDRESS_MAX} slots; a client from another address is served`, async (t) => {
    const { daemon } = await serveTempImage(t, IMAGE_BYTES, {
      args: ["--port", "0", "--bind", "127.0.0.1"],
      addressSpaceBytes: ADDRESS_SPACE_BYTES,
      tcp: true,
    });
    const port = Number(new URL(daemon.uri).port);
    const flood = handshakeFlood({ host: "127.0.0.1", port, localAddress: "127.0.0.1" }, 4 * HANDSHAKES_MAX);
    t.after(flood.stop);
    const honest: net.NetConnectOpts = { host: "127.0.0.1", port, localAddress: "127.0.0.2" };
    const latencies = await honestDuring(honest, new Promise((resolve) => setTimeout(resolve, 3_000)));
    flood.stop();
    assert.ok(
      flood.opened() > 4 * HANDSHAKES_MAX,
      `the attacker reconnected (${flood.opened()} connections)`,
    );
    t.diagnostic(`attacker opened ${flood.opened()} connections`);
    report(t, daemon, "TCP handshake flood from one address", latencies);
  });

  test(`${CONNECTIONS_MAX} idle sessions: a GO is refused while they are fresh, and evicts the idlest once it has been idle ${IDLE_EVICT_MIN_MS} ms`, async (t) => {
    const daemon = await hostileDaemon(t);
    const idle: RawNbd[] = [];
    t.after(() => idle.forEach((c) => c.destroy()));
    for (let i = 0; i < CONNECTIONS_MAX; i++) idle.push(await attacker(daemon.socket));
    const early = await RawNbd.connect(daemon.socket);
    t.after(() => early.destroy());
    await early.handshake();
    await assert.rejects(early.go(""), /GO refused/, "no slot is free and none is idle long enough");
    const firstOpened = Date.now();
    // The eviction bound is a time bound: wait it out, then an honest client gets in.
    await new Promise((resolve) => setTimeout(resolve, IDLE_EVICT_MIN_MS + 500 - (Date.now() - firstOpened)));
    const latency = await honestSession(daemon.socket);
    await idle[0].expectEof(); // the oldest idle session was the one evicted
    report(t, daemon, `${CONNECTIONS_MAX} idle sessions`, [latency]);
  });

  test(`QMP: ${QMP_CLIENTS_MAX} silent clients do not lock out drivetap qmp, a silent client is closed after ${QMP_NEGOTIATION_TIMEOUT_MS} ms, and a flooding client is dropped`, async (t) => {
    const qmpDir = mkdtempSync(join(tmpdir(), "drivetap-hostile-qmp-"));
    t.after(() => rmSync(qmpDir, { recursive: true, force: true }));
    const qmpPath = join(qmpDir, "qmp.sock");
    const d = await hostileDaemon(t, ["--qmp", qmpPath]);
    const silent: RawQmp[] = [];
    t.after(() => silent.forEach((s) => s.destroy()));
    const silentStart = Date.now();
    for (let i = 0; i < QMP_CLIENTS_MAX; i++) silent.push(await RawQmp.connect(qmpPath));
    const cli = await run(process.execPath, [CLI, "qmp", "query-version"], {
      env: { ...process.env, DRIVETAP_QMP: qmpPath },
    });
    assert.equal(cli.code, 0, `drivetap qmp works with ${QMP_CLIENTS_MAX} silent clients: ${cli.stderr}`);
    assert.match(cli.stdout, /qemu/);
    // A flood: many commands, replies never read. The client is dropped; others are unaffected.
    const flood = await RawQmp.ready(qmpPath);
    t.after(() => flood.destroy());
    flood.socket.pause();
    const line = JSON.stringify({ execute: "query-named-block-nodes" });
    let sent = 0;
    while (sent < 200_000 && !flood.socket.destroyed) {
      const chunk = line.repeat(1000);
      if (!flood.socket.write(chunk))
        await new Promise((r) => flood.socket.once("drain", r).once("close", r));
      sent += 1000;
    }
    const other = await RawQmp.ready(qmpPath);
    t.after(() => other.destroy());
    assert.ok(
      "return" in (await other.execute("query-version")),
      "another client is served during the flood",
    );
    // The silent ones still connected are closed once the negotiation bound has passed.
    const survivor = silent[silent.length - 1];
    await survivor.closed;
    const closedAfter = Date.now() - silentStart;
    assert.ok(
      closedAfter >= QMP_NEGOTIATION_TIMEOUT_MS - 500 && closedAfter < QMP_NEGOTIATION_TIMEOUT_MS + 5_000,
      `a silent client was closed after ${closedAfter} ms`,
    );
    report(t, d, "QMP silent clients and a flood");
  });

  test(`a client that stops reading its replies is listed by x-query-nbd-connections, then dropped after ${PEER_STALL_TIMEOUT_MS} ms and its budget returns`, async (t) => {
    const qmpDir = mkdtempSync(join(tmpdir(), "drivetap-hostile-qmp-"));
    t.after(() => rmSync(qmpDir, { recursive: true, force: true }));
    const qmpPath = join(qmpDir, "qmp.sock");
    const daemon = await hostileDaemon(t, ["--qmp", qmpPath, "--max-buffer-memory", "80M"]);
    // Alongside, on a daemon of its own: a writer that trickles its 32 MiB payload a byte a second.
    // The payload bound runs from the header, so the trickle does not extend it.
    const trickleDaemon = await hostileDaemon(t);
    const trickler = await attacker(trickleDaemon.socket);
    t.after(() => trickler.destroy());
    trickler.send(
      encodeRequest({
        flags: 0,
        type: C.NBD_CMD_WRITE,
        cookieHi: 0,
        cookieLo: 1,
        offset: 0,
        length: REQUEST_BYTES_MAX,
      }),
    );
    const trickleStartMs = Date.now();
    const drip = setInterval(() => trickler.send(Buffer.of(0x42)), 1_000);
    t.after(() => clearInterval(drip));
    const trickleEnded = trickler.whenClosed().then(() => Date.now() - trickleStartMs);
    const qmp = await RawQmp.ready(qmpPath);
    t.after(() => qmp.destroy());
    const stuck = await attacker(daemon.socket);
    t.after(() => stuck.destroy());
    stuck.socket.pause();
    const parts: Buffer[] = [];
    for (let i = 1; i <= 8; i++) parts.push(readRequest(i, (i % 7) * REQUEST_BYTES_MAX, REQUEST_BYTES_MAX));
    stuck.send(Buffer.concat(parts));
    const startMs = Date.now();
    type Conn = {
      id: number;
      "x-in-flight": Array<{ command: string; length: number }>;
      "x-unsent-bytes": number;
      "x-held-buffer-bytes": number;
    };
    const query = async (): Promise<Conn[]> =>
      (await qmp.execute("x-query-nbd-connections")).return as Conn[];
    // Wait (by polling the server's own view) until the server has taken what fits and stopped.
    let conns: Conn[] = [];
    for (;;) {
      conns = await query();
      if (conns.some((c) => c["x-unsent-bytes"] > 0)) break;
      await new Promise((resolve) => setImmediate(resolve));
    }
    const mine = conns.find((c) => c["x-unsent-bytes"] > 0)!;
    assert.ok(mine["x-in-flight"].length >= 1, "the unanswered reads are listed");
    assert.ok(mine["x-in-flight"].every((r) => r.command === "read" && r.length === REQUEST_BYTES_MAX));
    // Its unsent replies hold buffer bytes, and the server says so.
    assert.ok(mine["x-held-buffer-bytes"] >= REQUEST_BYTES_MAX, "the held reply buffers are reported");
    // Meanwhile small I/O goes on (the reserved share), and a second large reader waits its turn.
    const honest = await honestSession(daemon.socket);
    // The client is paused, so it cannot see the close: watch the server's own list instead.
    const deadline = startMs + PEER_STALL_TIMEOUT_MS + 10_000;
    while ((await query()).some((c) => c.id === mine.id)) {
      assert.ok(Date.now() < deadline, "the stalled connection is dropped within the bound");
      await new Promise((resolve) => setTimeout(resolve, 200));
    }
    const droppedAfter = Date.now() - startMs;
    assert.ok(
      droppedAfter >= PEER_STALL_TIMEOUT_MS - 1_000,
      `dropped after ${droppedAfter} ms, not before the bound`,
    );
    assert.match(daemon.stderr(), /client stopped reading replies; closing/);
    const trickleDroppedAfter = await trickleEnded;
    clearInterval(drip);
    assert.ok(
      trickleDroppedAfter >= PEER_STALL_TIMEOUT_MS - 1_000 &&
        trickleDroppedAfter < PEER_STALL_TIMEOUT_MS + 10_000,
      `the trickling writer was dropped after ${trickleDroppedAfter} ms`,
    );
    // The log is written asynchronously: wait for the line rather than read it at once.
    await trickleDaemon.waitForStderr(/client stopped in the middle of a write payload; closing/);
    // Its budget came back: a client can take the largest reads again.
    const { client } = await openExport(daemon.socket);
    t.after(() => client.destroy());
    const big = await client.read(0, REQUEST_BYTES_MAX);
    assert.equal(big.error, 0);
    t.diagnostic(`the stalled client was dropped after ${droppedAfter} ms`);
    report(t, daemon, "a client that stopped reading", [honest]);
  });

  test("fuzzed NBD sessions: every case ends, and an honest client round-trips between batches", async (t) => {
    const daemon = await hostileDaemon(t);
    const seed = Number(process.env.DRIVETAP_FUZZ_SEED ?? Date.now() % 2 ** 31);
    const cases = Number(process.env.DRIVETAP_FUZZ_CASES ?? 35_000);
    t.diagnostic(`fuzz seed ${seed} (DRIVETAP_FUZZ_SEED to repeat), ${cases} cases`);
    const sessions = fc.sample(sessionArb(), { seed, numRuns: cases });
    const latencies: number[] = [];
    const batch = 25;
    for (let i = 0; i < sessions.length; i += batch) {
      const cases = sessions.slice(i, i + batch);
      try {
        await Promise.all(cases.map((bytes) => fuzzCase(daemon.socket, bytes)));
        latencies.push(await honestSession(daemon.socket));
      } catch (err) {
        throw new Error(
          `fuzz batch at case ${i} (seed ${seed}) failed: ${(err as Error).message}; daemon alive: ` +
            `${daemon.alive()}; its log ends with: ${daemon.stderr().slice(-3000)}\ncases: ` +
            cases.map((b) => b.subarray(0, 512).toString("hex")).join("\n"),
        );
      }
    }
    t.diagnostic(`fuzz: ${sessions.length} cases`);
    report(t, daemon, `fuzz (${sessions.length} cases, seed ${seed})`, latencies);
  });
});

/** Sends one fuzz case, half-closes, and waits for the server to end the connection. */
function fuzzCase(socket: string, bytes: Buffer): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = net.createConnection(socket);
    const timer = setTimeout(() => {
      s.destroy();
      reject(new Error(`a fuzz case did not end within 20 s: ${bytes.subarray(0, 256).toString("hex")}`));
    }, 20_000);
    s.on("error", () => {});
    s.on("data", () => {});
    s.on("connect", () => s.end(bytes));
    s.on("close", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}

/**
 * A session: client flags, options (some valid, some mutated), maybe a GO, then requests with random
 * types, flags, offsets (including past 2^53) and lengths (including huge), some payloads, and
 * random garbage. Each piece may be cut short.
 */
function sessionArb(): fc.Arbitrary<Buffer> {
  const u32 = fc.integer({ min: 0, max: 0xffffffff });
  const length = fc.oneof(
    fc.constantFrom(0, 1, 512, 4096, 65536, REQUEST_BYTES_MAX, REQUEST_BYTES_MAX + 1, 0xffffffff),
    fc.integer({ min: 0, max: 1 << 20 }),
  );
  const offset = fc.oneof(
    fc.integer({ min: 0, max: IMAGE_BYTES - 16 * MiB - 65536 }),
    fc.constantFrom(IMAGE_BYTES, IMAGE_BYTES - 1, 2 ** 53, 2 ** 63, 2 ** 64 - 4096),
  );
  const request = fc
    .record({
      type: fc.oneof(fc.integer({ min: 0, max: 10 }), fc.integer({ min: 0, max: 0xffff })),
      flags: fc.oneof(fc.constantFrom(0, 1, 2, 4, 8, 16), fc.integer({ min: 0, max: 0xffff })),
      offset,
      length,
      payload: fc.integer({ min: 0, max: 8192 }),
    })
    .map((r) => {
      const header = Buffer.alloc(C.NBD_REQUEST_HEADER_BYTES);
      header.writeUInt32BE(C.NBD_REQUEST_MAGIC, 0);
      header.writeUInt16BE(r.flags, 4);
      header.writeUInt16BE(r.type, 6);
      header.writeUInt32BE(7, 12);
      header.writeBigUInt64BE(BigInt(Math.min(r.offset, 2 ** 64 - 1)), 16);
      header.writeUInt32BE(r.length >>> 0, 24);
      const payload =
        r.type === C.NBD_CMD_WRITE ? Buffer.alloc(Math.min(r.payload, r.length), 0x5a) : Buffer.alloc(0);
      return Buffer.concat([header, payload]);
    });
  const option = fc
    .record({
      option: fc.oneof(fc.integer({ min: 0, max: 12 }), u32),
      data: fc.uint8Array({ maxLength: 64 }),
    })
    .map((o) => encodeOption(o.option >>> 0, Buffer.from(o.data)));
  const garbage = fc.uint8Array({ minLength: 1, maxLength: 256 }).map((a) => Buffer.from(a));
  const flags = fc.oneof(
    fc.constant(encodeClientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES)),
    u32.map((f) => encodeClientFlags(f >>> 0)),
  );
  const structured = fc
    .boolean()
    .map((on) => (on ? encodeOption(C.NBD_OPT_STRUCTURED_REPLY) : Buffer.alloc(0)));
  const go = fc
    .boolean()
    .map((on) => (on ? encodeOption(C.NBD_OPT_GO, encodeExportRequest("", [])) : Buffer.alloc(0)));
  return fc
    .tuple(
      flags,
      fc.array(option, { maxLength: 3 }),
      structured,
      go,
      fc.array(fc.oneof({ weight: 8, arbitrary: request }, { weight: 1, arbitrary: garbage }), {
        maxLength: 12,
      }),
      fc.nat(),
    )
    .map(([f, opts, sr, g, reqs, cut]) => {
      const whole = Buffer.concat([f, ...opts, sr, g, ...reqs]);
      // One case in four is cut short somewhere.
      return cut % 4 === 0 ? whole.subarray(0, cut % (whole.length + 1)) : whole;
    });
}
