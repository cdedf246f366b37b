import { test, describe, type TestContext } from "node:test";
import assert from "node:assert/strict";
import * as fs from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { BlockError } from "../../src/core/errors.js";
import { silentLogger, type Logger } from "../../src/core/log.js";
import { QmpError } from "../../src/qmp/errors.js";
import { QMP_INPUT_BYTES_MAX } from "../../src/qmp/codec.js";
import { defineCommand, QMP_CLIENTS_MAX, QMP_PENDING_COMMANDS_MAX, QmpServer } from "../../src/qmp/server.js";
import { RawQmp } from "../helpers/raw-qmp.js";

const VERSION = { major: 7, minor: 2, micro: 3, package: "drivetap-test" };

interface Deferred<T> {
  readonly promise: Promise<T>;
  resolve(value: T): void;
}

function deferred<T = void>(): Deferred<T> {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => (resolve = r));
  return { promise, resolve };
}

interface Fixture {
  readonly server: QmpServer;
  readonly path: string;
  /** test-slow waits on this gate; each call replaces it. */
  gate: Deferred<void>;
  /** Resolved when test-slow starts / finishes. */
  slowStarted: Deferred<number>;
  slowDone: Deferred<void>;
}

/** A logger that keeps debug messages, so a test can wait for the server to have seen something. */
class RecordingLogger implements Logger {
  readonly messages: string[] = [];
  #wake: (() => void) | null = null;
  debug(_obj: object, msg?: string): void {
    this.messages.push(msg ?? "");
    this.#wake?.();
  }
  info(): void {}
  warn(): void {}
  error(): void {}
  child(): Logger {
    return this;
  }
  async seen(msg: string): Promise<void> {
    const deadline = Date.now() + 5_000;
    while (!this.messages.includes(msg)) {
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new Error(`the server never logged "${msg}"`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, remaining);
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }
}

async function startServer(t: TestContext, log: Logger = silentLogger): Promise<Fixture> {
  const dir = fs.mkdtempSync(join(tmpdir(), "drivetap-qmp-"));
  const path = join(dir, "qmp.sock");
  const server = new QmpServer({ log, version: VERSION });
  const fx: Fixture = { server, path, gate: deferred(), slowStarted: deferred(), slowDone: deferred() };
  server.register(
    defineCommand({
      name: "test-echo",
      args: { value: { type: "any", optional: true } },
      handler: (args) => (args.value === undefined ? undefined : { value: args.value }),
    }),
  );
  server.register(
    defineCommand({
      name: "test-slow",
      args: { n: { type: "int" } },
      handler: async (args, session) => {
        fx.slowStarted.resolve(session.id);
        await fx.gate.promise;
        fx.slowDone.resolve();
        return { n: args.n };
      },
    }),
  );
  server.register(
    defineCommand({
      name: "test-lookup",
      args: { device: { type: "str" } },
      handler: (args) => {
        throw new QmpError("DeviceNotFound", `Device '${args.device}' not found`);
      },
    }),
  );
  server.register(
    defineCommand({
      name: "test-io",
      args: {},
      handler: async () => {
        throw new BlockError("EIO", "Input/output error on node disk0");
      },
    }),
  );
  server.register(
    defineCommand({
      name: "test-bug",
      args: {},
      handler: () => (undefined as unknown as { x: number }).x,
    }),
  );
  await server.listen(path);
  t.after(async () => {
    await server.close();
    fs.rmSync(dir, { recursive: true, force: true });
  });
  return fx;
}

/** Connects a client that the test closes at its end. */
async function connect(t: TestContext, fx: Fixture, negotiate = true): Promise<RawQmp> {
  const client = negotiate ? await RawQmp.ready(fx.path) : await RawQmp.connect(fx.path);
  t.after(() => client.destroy());
  return client;
}

/** Waits, turn by turn of the event loop, until `condition` holds; fails after a timeout. */
async function until(condition: () => boolean, timeoutMs = 5_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!condition()) {
    if (Date.now() > deadline)
      throw new Error(`condition not met within ${timeoutMs} ms: ${String(condition)}`);
    await new Promise((resolve) => setImmediate(resolve));
  }
}

const error = (cls: string, desc: string, id?: unknown): Record<string, unknown> =>
  id === undefined ? { error: { class: cls, desc } } : { error: { class: cls, desc }, id };

describe("QmpServer", { timeout: 60_000 }, () => {
  test("greets with QEMU's banner, in QEMU's wire style", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx, false);
    assert.deepEqual(client.messages[0], {
      QMP: {
        version: { qemu: { micro: 3, minor: 2, major: 7 }, package: "drivetap-test" },
        capabilities: ["oob"],
      },
    });
    assert.equal(
      client.raw,
      '{"QMP": {"version": {"qemu": {"micro": 3, "minor": 2, "major": 7}, "package": "drivetap-test"}, ' +
        '"capabilities": ["oob"]}}\r\n',
    );
  });

  test("the socket file is owner-only", async (t) => {
    const fx = await startServer(t);
    const st = fs.statSync(fx.path);
    assert.ok(st.isSocket());
    assert.equal(st.mode & 0o777, 0o600);
  });

  test("listen replaces a stale socket file", async (t) => {
    const dir = fs.mkdtempSync(join(tmpdir(), "drivetap-qmp-"));
    t.after(() => fs.rmSync(dir, { recursive: true, force: true }));
    const path = join(dir, "qmp.sock");
    // A socket file left behind by a process that died: its listener closed without unlinking it (libuv
    // unlinks on close, so the file is moved aside meanwhile).
    const stale = net.createServer();
    await new Promise<void>((resolve) => stale.listen(path, resolve));
    fs.renameSync(path, path + ".keep");
    await new Promise<void>((resolve) => stale.close(() => resolve()));
    fs.renameSync(path + ".keep", path);
    assert.ok(fs.statSync(path).isSocket());

    const server = new QmpServer({ log: silentLogger, version: VERSION });
    await server.listen(path);
    t.after(() => server.close());
    const client = await RawQmp.ready(path);
    t.after(() => client.destroy());
    assert.deepEqual(await client.execute("query-version"), {
      return: { qemu: { micro: 3, minor: 2, major: 7 }, package: "drivetap-test" },
    });
  });

  test("before qmp_capabilities every command points at negotiation", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx, false);
    client.take((m) => "QMP" in m);
    const expecting = "Expecting capabilities negotiation with 'qmp_capabilities'";
    assert.deepEqual(
      await client.execute("query-version", undefined, 1),
      error("CommandNotFound", expecting, 1),
    );
    assert.deepEqual(await client.execute("no-such-command"), error("CommandNotFound", expecting));
    // Malformed requests still get their own errors.
    assert.deepEqual(
      await client.execute("qmp_capabilities", { bogus: 1 }),
      error("GenericError", "Parameter 'bogus' is unexpected"),
    );
    client.send({ arguments: {} });
    assert.deepEqual(await client.reply(), error("GenericError", "QMP input lacks member 'execute'"));
    // oob is the one capability offered: asking for another fails and leaves the client in negotiation.
    assert.deepEqual(
      await client.execute("qmp_capabilities", { enable: ["foo"] }),
      // QEMU 7.2's text: a list element has no name, so its visitor says 'null'.
      error("GenericError", "Parameter 'null' does not accept value 'foo'"),
    );
    assert.deepEqual(await client.execute("query-version"), error("CommandNotFound", expecting));
    assert.deepEqual(await client.execute("qmp_capabilities", { enable: [] }), { return: {} });
    const version = await client.execute("query-version");
    assert.deepEqual(version.return, { qemu: { micro: 3, minor: 2, major: 7 }, package: "drivetap-test" });
  });

  test("a second qmp_capabilities is refused", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx);
    assert.deepEqual(
      await client.execute("qmp_capabilities", undefined, "again"),
      error("CommandNotFound", "Capabilities negotiation is already complete, command ignored", "again"),
    );
  });

  test("query-commands lists built-in and registered commands", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx);
    const reply = await client.execute("query-commands");
    const names = (reply.return as { name: string }[]).map((c) => c.name).sort();
    assert.deepEqual(names, [
      "qmp_capabilities",
      "query-commands",
      "query-qmp-schema",
      "query-version",
      "test-bug",
      "test-echo",
      "test-io",
      "test-lookup",
      "test-slow",
    ]);
    assert.deepEqual(fx.server.commandNames().sort(), names);
    assert.throws(() => fx.server.register({ name: "test-echo", args: {}, handler: () => 0 }), /twice/);
  });

  test("id is echoed verbatim on returns and errors, whatever its type", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx);
    for (const id of [7, 0, -1.5, "abc", "", { a: [1, { b: null }] }, [1, 2], null, true]) {
      assert.deepEqual(await client.execute("test-echo", { value: 1 }, id), { return: { value: 1 }, id });
      assert.deepEqual(await client.execute("nope", undefined, id), {
        ...error("CommandNotFound", "The command nope has not been found"),
        id,
      });
    }
    // Without an id, replies carry none; a handler returning undefined answers {}.
    const reply = await client.execute("test-echo");
    assert.deepEqual(reply, { return: {} });
    assert.equal(Object.hasOwn(reply, "id"), false);
  });

  test("error classes and texts", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx);
    assert.deepEqual(
      await client.execute("test-lookup", { device: "d9" }, 1),
      error("DeviceNotFound", "Device 'd9' not found", 1),
    );
    assert.deepEqual(
      await client.execute("test-io", {}, 2),
      error("GenericError", "Input/output error on node disk0", 2),
    );
    const bug = await client.execute("test-bug", undefined, 3);
    assert.equal((bug.error as { class: string }).class, "GenericError");
    assert.match((bug.error as { desc: string }).desc, /undefined/);
    assert.deepEqual(
      await client.execute("test-lookup", {}, 4),
      error("GenericError", "Parameter 'device' is missing", 4),
    );
    assert.deepEqual(
      await client.execute("test-slow", { n: "1" }),
      error("GenericError", "Invalid parameter type for 'n', expected: integer"),
    );
    assert.deepEqual(
      await client.execute("nope"),
      error("CommandNotFound", "The command nope has not been found"),
    );
  });

  test("request shape errors", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx);
    const cases: [string, Record<string, unknown>][] = [
      ["[1, 2]", error("GenericError", "QMP input must be a JSON object")],
      ['"query-version"', error("GenericError", "QMP input must be a JSON object")],
      ['{"id": 5}', error("GenericError", "QMP input lacks member 'execute'", 5)],
      ['{"execute": 5, "id": 6}', error("GenericError", "QMP input member 'execute' must be a string", 6)],
      [
        '{"execute": "test-echo", "arguments": [1], "id": 7}',
        error("GenericError", "QMP input member 'arguments' must be an object", 7),
      ],
      [
        '{"execute": "test-echo", "foo": 1, "id": 8}',
        error("GenericError", "QMP input member 'foo' is unexpected", 8),
      ],
      ['{"exec-oob": "test-echo"}', error("GenericError", "QMP input member 'exec-oob' is unexpected")],
    ];
    for (const [input, expected] of cases) {
      client.write(input + "\n");
      assert.deepEqual(await client.reply(), expected, input);
    }
  });

  test("malformed JSON is answered and the connection keeps working", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx);
    client.write('{"execute": "test-echo", "arguments": {"value": }}\n{"execute": "test-echo", "id": 2}\n');
    const parseError = await client.reply();
    assert.equal((parseError.error as { class: string }).class, "GenericError");
    assert.match((parseError.error as { desc: string }).desc, /^JSON parse error, /);
    assert.equal(Object.hasOwn(parseError, "id"), false);
    assert.deepEqual(await client.reply(), { return: {}, id: 2 });
  });

  test("two objects in one write are both answered, in order", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx);
    client.write('{"execute":"test-echo","arguments":{"value":"a"},"id":1}{"execute":"test-echo","id":2}');
    assert.deepEqual(await client.reply(), { return: { value: "a" }, id: 1 });
    assert.deepEqual(await client.reply(), { return: {}, id: 2 });
  });

  test("an object split across many writes", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx);
    const text = JSON.stringify({ execute: "test-echo", arguments: { value: '}{ é😀 "' }, id: "split" });
    const bytes = Buffer.from(text);
    for (let i = 0; i < bytes.length; i += 3) client.write(bytes.subarray(i, i + 3));
    assert.deepEqual(await client.reply(), { return: { value: '}{ é😀 "' }, id: "split" });
  });

  test("an oversize input is refused and the client resynchronises", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx);
    const big = JSON.stringify({
      execute: "test-echo",
      arguments: { value: "}".repeat(QMP_INPUT_BYTES_MAX) },
      id: 1,
    });
    client.write(big);
    client.send({ execute: "test-echo", id: 2 });
    assert.deepEqual(await client.reply(), error("GenericError", "JSON input too long"));
    assert.deepEqual(await client.reply(), { return: {}, id: 2 });
    // Just under the limit is accepted.
    const value = "x".repeat(QMP_INPUT_BYTES_MAX - 100);
    client.send({ execute: "test-echo", arguments: { value }, id: 3 });
    assert.deepEqual(await client.reply(), { return: { value }, id: 3 });
  });

  test("replies keep the order of requests even when a command is async", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx);
    client.write('{"execute":"test-slow","arguments":{"n":1},"id":1}{"execute":"test-echo","id":2}');
    await fx.slowStarted.promise;
    // If commands ran concurrently, test-echo's reply would be here before the gate opens.
    const roundTrip = await RawQmp.ready(fx.path);
    t.after(() => roundTrip.destroy());
    assert.deepEqual(await roundTrip.execute("test-echo", undefined, "other"), { return: {}, id: "other" });
    assert.deepEqual(client.messages, []);
    fx.gate.resolve();
    assert.deepEqual(await client.reply(), { return: { n: 1 }, id: 1 });
    assert.deepEqual(await client.reply(), { return: {}, id: 2 });
  });

  test("many pipelined commands behind a slow one are all answered, in order", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx);
    // Far more than the per-client queue bound: the server stops reading, then must resume.
    const count = 20 * QMP_PENDING_COMMANDS_MAX;
    let text = '{"execute": "test-slow", "arguments": {"n": 0}, "id": 0}';
    for (let i = 1; i <= count; i++)
      text += JSON.stringify({ execute: "test-echo", arguments: { value: i }, id: i });
    client.write(text);
    await fx.slowStarted.promise;
    fx.gate.resolve();
    assert.deepEqual(await client.reply(), { return: { n: 0 }, id: 0 });
    for (let i = 1; i <= count; i++) assert.deepEqual(await client.reply(), { return: { value: i }, id: i });
  });

  test("events reach every negotiated client, with wall-clock timestamps", async (t) => {
    const fx = await startServer(t);
    const a = await connect(t, fx);
    const b = await connect(t, fx);
    const silent = await connect(t, fx, false);
    silent.take((m) => "QMP" in m);
    assert.equal(fx.server.clientCount, 3);

    const beforeUs = Date.now() * 1000;
    fx.server.emitEvent("JOB_STATUS_CHANGE", { id: "job0", status: "running" });
    const afterUs = Date.now() * 1000;
    for (const client of [a, b]) {
      const ev = await client.event("JOB_STATUS_CHANGE");
      assert.deepEqual(Object.keys(ev), ["event", "data", "timestamp"]);
      assert.deepEqual(ev.data, { id: "job0", status: "running" });
      const ts = ev.timestamp as { seconds: number; microseconds: number };
      assert.ok(Number.isInteger(ts.seconds) && Number.isInteger(ts.microseconds));
      assert.ok(ts.microseconds >= 0 && ts.microseconds < 1_000_000);
      const us = ts.seconds * 1_000_000 + ts.microseconds;
      assert.ok(us >= beforeUs && us <= afterUs, `${us} within [${beforeUs}, ${afterUs}]`);
    }

    // The event was written before this reply; had it gone to the unnegotiated client, it would be first.
    assert.deepEqual(await silent.execute("qmp_capabilities"), { return: {} });
    assert.deepEqual(silent.messages, []);
    fx.server.emitEvent("BLOCK_JOB_READY", { device: "job0" });
    assert.equal((await silent.event("BLOCK_JOB_READY")).event, "BLOCK_JOB_READY");
    assert.equal((await a.event("BLOCK_JOB_READY")).event, "BLOCK_JOB_READY");
  });

  test("a client hanging up mid-command leaves the server serving others", async (t) => {
    const fx = await startServer(t);
    const leaving = await connect(t, fx);
    leaving.send({ execute: "test-slow", arguments: { n: 5 }, id: 1 });
    leaving.send({ execute: "test-echo", id: 2 });
    await fx.slowStarted.promise;
    leaving.destroy();
    await leaving.closed;

    const other = await connect(t, fx);
    assert.deepEqual(await other.execute("test-echo", { value: "during" }), { return: { value: "during" } });
    fx.gate.resolve();
    await fx.slowDone.promise;
    // The reply to the departed client has been dropped; the server still answers and events still flow.
    assert.deepEqual(await other.execute("test-echo", { value: "after" }), { return: { value: "after" } });
    fx.server.emitEvent("TEST", {});
    await other.event("TEST");
    await until(() => fx.server.clientCount === 1);
  });

  test("a client that half-closes still gets its replies, then the server ends", async (t) => {
    const log = new RecordingLogger();
    const fx = await startServer(t, log);
    const client = await connect(t, fx);
    client.send({ execute: "test-slow", arguments: { n: 9 }, id: 1 });
    await fx.slowStarted.promise;
    client.socket.end('{"execute": "test-echo", "id": 2}');
    // The end of input arrives while a command runs and another waits: both must still be answered.
    await log.seen("QMP client ended its input");
    fx.gate.resolve();
    assert.deepEqual(await client.reply(), { return: { n: 9 }, id: 1 });
    assert.deepEqual(await client.reply(), { return: {}, id: 2 });
    await client.waitClosed();
  });

  test(`${QMP_CLIENTS_MAX} silent clients cannot keep a new one out: the oldest still negotiating goes`, async (t) => {
    const fx = await startServer(t);
    const clients = await Promise.all(Array.from({ length: QMP_CLIENTS_MAX }, () => connect(t, fx, false)));
    assert.equal(fx.server.clientCount, QMP_CLIENTS_MAX);
    const late = await connect(t, fx);
    assert.deepEqual(await late.execute("test-echo"), { return: {} });
    await clients[0].waitClosed();
    assert.equal(fx.server.clientCount, QMP_CLIENTS_MAX, "one was evicted for the new one");
  });

  test(`past ${QMP_CLIENTS_MAX} clients that are all negotiated and recently active, a new one is hung up on`, async (t) => {
    const fx = await startServer(t);
    const clients = await Promise.all(Array.from({ length: QMP_CLIENTS_MAX }, () => connect(t, fx)));
    assert.equal(fx.server.clientCount, QMP_CLIENTS_MAX);
    const extra = net.createConnection(fx.path);
    t.after(() => extra.destroy());
    extra.on("error", () => {});
    const outcome = await new Promise<string>((resolve) => {
      const timer = setTimeout(() => resolve("neither greeting nor hang-up"), 5_000);
      extra.on("data", () => resolve("greeted"));
      extra.on("close", () => {
        clearTimeout(timer);
        resolve("closed");
      });
    });
    assert.equal(outcome, "closed", "a client past the limit is hung up on, with no greeting");
    // A slot freed is a slot usable again.
    clients[0].destroy();
    await until(() => fx.server.clientCount === QMP_CLIENTS_MAX - 1);
    const late = await connect(t, fx);
    assert.deepEqual(await late.execute("test-echo"), { return: {} });
  });

  test("close hangs up on clients, lets a running command answer, and removes the socket", async (t) => {
    const fx = await startServer(t);
    const client = await connect(t, fx);
    client.send({ execute: "test-slow", arguments: { n: 3 }, id: 1 });
    client.send({ execute: "test-echo", id: 2 });
    await fx.slowStarted.promise;
    const closed = fx.server.close();
    fx.gate.resolve();
    await closed;
    assert.deepEqual(await client.reply(), { return: { n: 3 }, id: 1 });
    await client.waitClosed();
    assert.deepEqual(client.messages, [], "the queued command was dropped, not run");
    assert.equal(fs.existsSync(fx.path), false);
    assert.equal(fx.server.clientCount, 0);
  });
});
