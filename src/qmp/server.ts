/**
 * The QMP server: a unix socket speaking QEMU's Machine Protocol. It greets each client, holds it in
 * capabilities negotiation until `qmp_capabilities`, validates every command against its schema and
 * answers in the order the commands arrived (one command at a time per client). A client that enables
 * QEMU's `oob` capability may also send `exec-oob`, answered at once, ahead of the in-band queue, as
 * QEMU's monitor does; only commands marked `allowOob` run that way (QEMU 7.2's storage daemon has none,
 * so neither has drivetap: the others get QEMU's "does not support OOB"). Events go to every negotiated
 * client. Commands are registered by the layers above; the server itself provides `qmp_capabilities`,
 * `query-version`, `query-commands` and `query-qmp-schema` (qmp/introspect.ts).
 */
import * as net from "node:net";
import { assert } from "../core/assert.js";
import { BlockError } from "../core/errors.js";
import type { Logger } from "../core/log.js";
import { MiB } from "../core/units.js";
import { listenUnix, type OwnedSocket } from "../core/unix-socket.js";
import { encodeQmp, QmpInputSplitter, type QmpInput } from "./codec.js";
import { QmpError, qmpErrorFrom } from "./errors.js";
import { introspect, type EventSpecs } from "./introspect.js";
import { validateArgs, type ArgsSpec, type FieldSpec, type InferArgs, type TypeSpec } from "./schema.js";

/**
 * Clients connected at once. A client past it evicts the oldest one still in capabilities
 * negotiation, else the one idle longest (QMP_IDLE_EVICT_MIN_MS at least), else it is refused: idle
 * or silent clients cannot keep a new one out.
 */
export const QMP_CLIENTS_MAX = 32;
/** A client that has not sent `qmp_capabilities` this long after connecting is closed. */
export const QMP_NEGOTIATION_TIMEOUT_MS = 10_000;
/** A negotiated client must have been idle this long to be evicted for a new one. */
export const QMP_IDLE_EVICT_MIN_MS = 5_000;
/** Per client: stop reading while this many parsed commands wait for their turn. */
export const QMP_PENDING_COMMANDS_MAX = 64;
/** Per client: unsent reply and event bytes past which the client (not reading) is dropped. */
export const QMP_OUTPUT_BYTES_MAX = 16 * MiB;
/** On close, a client has this long to take its last replies before its socket is destroyed. */
export const QMP_CLOSE_LINGER_MS = 1_000;

/** What a command handler knows about the client that sent it. */
export interface QmpSession {
  readonly id: number;
}

export interface QmpCommandDef {
  /** Spelled exactly as QEMU spells it (`block-job-cancel`). */
  readonly name: string;
  readonly args: Record<string, FieldSpec>;
  /** The shape of the `return` value, for query-qmp-schema; absent: `{}` (QEMU's empty object). */
  readonly returns?: TypeSpec;
  /**
   * May run out of band (`exec-oob`): answered as soon as it is read, so its handler must not wait
   * for anything (it must return a value, never a promise). QEMU's `allow-oob`.
   */
  readonly allowOob?: boolean;
  /** Gets validated arguments; its result (undefined answers `{}`) is the `return` value. */
  handler(args: Record<string, unknown>, session: QmpSession): unknown | Promise<unknown>;
}

/**
 * Declares a command whose handler gets its arguments typed from the schema. The narrowing is sound
 * because the server validates the arguments against `args` before it calls the handler.
 */
export function defineCommand<const S extends ArgsSpec>(def: {
  readonly name: string;
  readonly args: S;
  readonly returns?: TypeSpec;
  readonly allowOob?: boolean;
  handler(args: InferArgs<S>, session: QmpSession): unknown | Promise<unknown>;
}): QmpCommandDef {
  return def;
}

export interface QmpVersion {
  readonly major: number;
  readonly minor: number;
  readonly micro: number;
  readonly package: string;
}

export interface QmpServerOptions {
  readonly log: Logger;
  readonly version: QmpVersion;
  /** The events the server's clients may receive, with their data, for query-qmp-schema. */
  readonly events?: EventSpecs;
}

class QmpClient implements QmpSession {
  readonly id: number;
  readonly socket: net.Socket;
  readonly log: Logger;
  readonly splitter = new QmpInputSplitter();
  readonly queue: QmpInput[] = [];
  /** The loop running this client's commands, while there are any. */
  running: Promise<void> | null = null;
  /** qmp_capabilities succeeded; becomes `negotiated` once its reply is written. */
  capabilitiesAccepted = false;
  negotiated = false;
  /** The client enabled the `oob` capability: `exec-oob` is accepted. */
  oob = false;
  inputEnded = false;
  closed = false;
  /** When the client last sent input or got a reply. */
  lastActiveMs = Date.now();
  negotiationTimer: NodeJS.Timeout | null = null;

  constructor(id: number, socket: net.Socket, log: Logger) {
    this.id = id;
    this.socket = socket;
    this.log = log;
  }
}

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

export class QmpServer {
  readonly #log: Logger;
  readonly #version: QmpVersion;
  readonly #events: EventSpecs;
  readonly #undeclaredEventsAllowed: boolean;
  readonly #commands = new Map<string, QmpCommandDef>();
  readonly #clients = new Set<QmpClient>();
  #server: net.Server | null = null;
  #socket: OwnedSocket | null = null;
  #nextClientId = 1;
  #closing: Promise<void> | null = null;

  constructor(options: QmpServerOptions) {
    this.#log = options.log;
    this.#version = options.version;
    this.#events = options.events ?? {};
    // A bare server (unit tests) declares no events and may emit any.
    this.#undeclaredEventsAllowed = Object.keys(this.#events).length === 0;
    this.#registerBuiltins();
  }

  /** Adds a command; a name registered twice is a bug. */
  register(def: QmpCommandDef): void {
    assert(!this.#commands.has(def.name), `QMP command ${def.name} registered twice`);
    this.#commands.set(def.name, def);
  }

  commandNames(): string[] {
    return [...this.#commands.keys()];
  }

  get clientCount(): number {
    return this.#clients.size;
  }

  /**
   * Listens on a unix socket (core/unix-socket.ts: a live server's path is refused, a stale socket
   * replaced) and makes it owner-only (0600) before it appears at `path`. The socket exists under a
   * temporary name with the default mode for a moment, so put it in a directory only the daemon's
   * user can enter when other local users must be kept out entirely.
   */
  async listen(path: string): Promise<void> {
    assert(this.#server === null && this.#closing === null, "QmpServer.listen called twice or after close");
    const server = net.createServer({ allowHalfOpen: true }, (socket) => this.#accept(socket));
    // A live server's socket is refused, a stale one replaced; at close only our own is removed.
    this.#socket = await listenUnix(server, path, { mode: 0o600 });
    server.on("error", (err) => this.#log.error({ err: err.message }, "QMP listener error"));
    this.#server = server;
    this.#log.debug({ path }, "QMP listening");
  }

  /** Sends an event to every client past capabilities negotiation, stamped with the wall clock. */
  emitEvent(event: string, data: Record<string, unknown>): void {
    // query-qmp-schema lists the declared events: one emitted but not declared is a bug.
    assert(
      this.#undeclaredEventsAllowed || Object.hasOwn(this.#events, event),
      `QMP event ${event} is not declared in the schema`,
    );
    const nowMs = Date.now();
    const line = encodeQmp({
      event,
      data,
      timestamp: { seconds: Math.floor(nowMs / 1000), microseconds: (nowMs % 1000) * 1000 },
    });
    for (const client of this.#clients) {
      if (client.negotiated) this.#send(client, line);
    }
  }

  /**
   * Stops accepting clients, drops commands not yet started, lets each command already running finish
   * and answer, then hangs up on every client and removes the socket file.
   */
  close(): Promise<void> {
    this.#closing ??= this.#closeNow();
    return this.#closing;
  }

  async #closeNow(): Promise<void> {
    const server = this.#server;
    const listenerClosed = server
      ? new Promise<void>((resolve) => server.close(() => resolve()))
      : Promise.resolve();
    for (const client of this.#clients) client.queue.length = 0;
    await Promise.all([...this.#clients].map((c) => c.running));
    for (const client of this.#clients) hangUp(client);
    await listenerClosed;
    this.#socket?.release();
  }

  /** Makes room for one more client if the server is full; false if every client is busy. */
  #makeRoom(): boolean {
    if (this.#clients.size < QMP_CLIENTS_MAX) return true;
    let victim: QmpClient | null = null;
    for (const c of this.#clients) {
      if (!c.negotiated && !c.closed) {
        victim = c; // the oldest one still negotiating (Set order is connection order)
        break;
      }
    }
    if (victim === null) {
      const now = Date.now();
      let idlest = QMP_IDLE_EVICT_MIN_MS - 1;
      for (const c of this.#clients) {
        const idle = c.running === null && c.queue.length === 0 ? now - c.lastActiveMs : -1;
        if (idle > idlest) {
          victim = c;
          idlest = idle;
        }
      }
    }
    if (victim === null) return false;
    victim.log.warn({ max: QMP_CLIENTS_MAX }, "QMP client evicted to make room for a new one");
    this.#drop(victim);
    return true;
  }

  /** Forgets a client at once (its socket is destroyed). */
  #drop(client: QmpClient): void {
    client.closed = true;
    client.queue.length = 0;
    this.#clients.delete(client);
    if (client.negotiationTimer) clearTimeout(client.negotiationTimer);
    client.socket.destroy();
  }

  #accept(socket: net.Socket): void {
    if (this.#closing !== null || !this.#makeRoom()) {
      this.#log.warn({ max: QMP_CLIENTS_MAX }, "QMP client refused: too many busy clients or closing");
      socket.destroy();
      return;
    }
    const id = this.#nextClientId++;
    const client = new QmpClient(id, socket, this.#log.child({ qmpClient: id }));
    this.#clients.add(client);
    client.log.debug({}, "QMP client connected");
    client.negotiationTimer = setTimeout(() => {
      if (client.negotiated || client.capabilitiesAccepted) return;
      client.log.warn({}, "QMP client closed: no qmp_capabilities within the time bound");
      this.#drop(client);
    }, QMP_NEGOTIATION_TIMEOUT_MS);
    client.negotiationTimer.unref();
    socket.on("data", (chunk: Buffer) => {
      client.lastActiveMs = Date.now();
      this.#onInput(client, client.splitter.push(chunk));
    });
    socket.on("end", () => {
      client.log.debug({}, "QMP client ended its input");
      client.inputEnded = true;
      this.#onInput(client, client.splitter.end());
    });
    socket.on("error", (err) => client.log.debug({ err: err.message }, "QMP client socket error"));
    socket.on("close", () => {
      client.closed = true;
      client.queue.length = 0;
      this.#clients.delete(client);
      if (client.negotiationTimer) clearTimeout(client.negotiationTimer);
      client.log.debug({}, "QMP client disconnected");
    });
    const v = this.#version;
    this.#send(
      client,
      encodeQmp({
        QMP: {
          version: { qemu: { micro: v.micro, minor: v.minor, major: v.major }, package: v.package },
          capabilities: ["oob"],
        },
      }),
    );
  }

  #onInput(client: QmpClient, inputs: QmpInput[]): void {
    if (client.closed || this.#closing !== null) return;
    for (const input of inputs) {
      // QEMU's test (qmp_is_oob): exec-oob and no execute. Out of band means now, not after the
      // in-band commands before it; with oob off it goes in band and is refused there.
      if (client.oob && input.ok && isObject(input.value) && isOobRequest(input.value)) {
        this.#send(client, this.#dispatchOob(client, input.value));
      } else {
        client.queue.push(input);
      }
    }
    if (client.queue.length >= QMP_PENDING_COMMANDS_MAX) client.socket.pause();
    if (client.running === null) {
      if (client.queue.length > 0) client.running = this.#runQueue(client);
      else if (client.inputEnded) client.socket.end();
    }
  }

  /** Runs one client's commands one after another, each answered before the next starts. */
  async #runQueue(client: QmpClient): Promise<void> {
    while (client.queue.length > 0 && !client.closed) {
      const input = client.queue.shift()!;
      if (client.queue.length < QMP_PENDING_COMMANDS_MAX && client.socket.isPaused()) client.socket.resume();
      const line = await this.#dispatch(client, input);
      this.#send(client, line);
      client.lastActiveMs = Date.now();
      if (client.capabilitiesAccepted) client.negotiated = true;
    }
    client.running = null;
    if (client.inputEnded && !client.closed && this.#closing === null) client.socket.end();
  }

  /** Answers one input with the encoded reply; never throws. */
  async #dispatch(client: QmpClient, input: QmpInput): Promise<string> {
    if (!input.ok) return encodeQmp({ error: { class: "GenericError", desc: input.desc } });
    const request = input.value;
    if (!isObject(request)) {
      return encodeQmp({ error: { class: "GenericError", desc: "QMP input must be a JSON object" } });
    }
    let name: string | undefined;
    try {
      // An exec-oob request in band was read before the client enabled oob: refused as then.
      name = checkRequest(request, client.oob && !isOobRequest(request));
      const def = this.#lookup(client, name);
      const args = validateArgs(def.args, request.arguments);
      client.log.debug({ command: name }, "QMP command");
      return returnReply(await def.handler(args, client), request);
    } catch (err) {
      return this.#errorReply(client, name, err, request);
    }
  }

  /** Runs an `exec-oob` request at once; never throws. */
  #dispatchOob(client: QmpClient, request: Record<string, unknown>): string {
    let name: string | undefined;
    try {
      name = checkRequest(request, true);
      const def = this.#lookup(client, name);
      if (!def.allowOob) throw new QmpError("GenericError", `The command ${name} does not support OOB`);
      const args = validateArgs(def.args, request.arguments);
      client.log.debug({ command: name }, "QMP out-of-band command");
      const result = def.handler(args, client);
      assert(!(result instanceof Promise), `OOB command ${name} returned a promise`);
      return returnReply(result, request);
    } catch (err) {
      return this.#errorReply(client, name, err, request);
    }
  }

  /** The command a client may run by that name; CommandNotFound otherwise (QEMU's text). */
  #lookup(client: QmpClient, name: string): QmpCommandDef {
    const def = this.#commands.get(name);
    if (def === undefined || (!client.negotiated && name !== "qmp_capabilities")) {
      throw new QmpError("CommandNotFound", `The command ${name} has not been found`);
    }
    return def;
  }

  #errorReply(
    client: QmpClient,
    name: string | undefined,
    err: unknown,
    request: Record<string, unknown>,
  ): string {
    const id = Object.hasOwn(request, "id") ? { id: request.id } : {};
    let error = qmpErrorFrom(err);
    if (!(err instanceof QmpError) && !(err instanceof BlockError)) {
      client.log.error(
        { command: name, err: err instanceof Error ? err.stack : String(err) },
        "QMP command failed",
      );
    }
    if (!client.negotiated && error.errorClass === "CommandNotFound") {
      // As QEMU: in negotiation mode every unknown command points at qmp_capabilities.
      error = new QmpError("CommandNotFound", "Expecting capabilities negotiation with 'qmp_capabilities'");
    }
    return encodeQmp({ error: { class: error.errorClass, desc: error.message }, ...id });
  }

  #send(client: QmpClient, line: string): void {
    const socket = client.socket;
    if (client.closed || socket.destroyed || !socket.writable) return;
    socket.write(line + "\r\n");
    if (socket.writableLength > QMP_OUTPUT_BYTES_MAX) {
      client.log.warn({ bytes: socket.writableLength }, "QMP client dropped: not reading its replies");
      socket.destroy();
    }
  }

  #registerBuiltins(): void {
    this.register(
      defineCommand({
        name: "qmp_capabilities",
        args: { enable: { type: "array", items: { type: "enum", values: ["oob"] }, optional: true } },
        handler: (args, session) => {
          const client = session as QmpClient;
          if (client.negotiated) {
            throw new QmpError(
              "CommandNotFound",
              "Capabilities negotiation is already complete, command ignored",
            );
          }
          // The schema admits only "oob", the one capability the greeting offers.
          if ((args.enable ?? []).includes("oob")) client.oob = true;
          client.capabilitiesAccepted = true;
        },
      }),
    );
    this.register(
      defineCommand({
        name: "query-version",
        args: {},
        returns: {
          type: "object",
          fields: {
            qemu: {
              type: "object",
              fields: { major: { type: "int" }, minor: { type: "int" }, micro: { type: "int" } },
            },
            package: { type: "str" },
          },
        },
        handler: () => {
          const v = this.#version;
          return { qemu: { micro: v.micro, minor: v.minor, major: v.major }, package: v.package };
        },
      }),
    );
    this.register(
      defineCommand({
        name: "query-commands",
        args: {},
        returns: { type: "array", items: { type: "object", fields: { name: { type: "str" } } } },
        handler: () => this.commandNames().map((name) => ({ name })),
      }),
    );
    this.register(
      defineCommand({
        name: "query-qmp-schema",
        args: {},
        returns: { type: "array", items: { type: "any" } },
        handler: () => introspect([...this.#commands.values()], this.#events),
      }),
    );
  }
}

function isOobRequest(request: Record<string, unknown>): boolean {
  return Object.hasOwn(request, "exec-oob") && !Object.hasOwn(request, "execute");
}

function returnReply(result: unknown, request: Record<string, unknown>): string {
  const id = Object.hasOwn(request, "id") ? { id: request.id } : {};
  return encodeQmp({ return: result === undefined ? {} : result, ...id });
}

/**
 * Checks the request's members in their order, as QEMU does; returns the command name. `exec-oob` is
 * a member only for a client that enabled the oob capability; it and `execute` exclude each other.
 */
function checkRequest(request: Record<string, unknown>, allowOob: boolean): string {
  let name: string | undefined;
  let nameKey = "";
  for (const [key, value] of Object.entries(request)) {
    if (key === "execute" || (key === "exec-oob" && allowOob)) {
      if (typeof value !== "string")
        throw new QmpError("GenericError", `QMP input member '${key}' must be a string`);
      if (name !== undefined)
        throw new QmpError("GenericError", `QMP input member '${key}' clashes with '${nameKey}'`);
      name = value;
      nameKey = key;
    } else if (key === "arguments") {
      if (!isObject(value))
        throw new QmpError("GenericError", "QMP input member 'arguments' must be an object");
    } else if (key !== "id") {
      throw new QmpError("GenericError", `QMP input member '${key}' is unexpected`);
    }
  }
  if (name === undefined) throw new QmpError("GenericError", "QMP input lacks member 'execute'");
  return name;
}

/** Ends the client's side after its pending output is flushed; destroys it if that takes too long. */
function hangUp(client: QmpClient): void {
  const socket = client.socket;
  if (socket.destroyed) return;
  const timer = setTimeout(() => socket.destroy(), QMP_CLOSE_LINGER_MS);
  timer.unref();
  socket.once("close", () => clearTimeout(timer));
  socket.end(() => socket.destroy());
}
