/**
 * The QMP server: a unix socket speaking QEMU's Machine Protocol. It greets each client, holds it in
 * capabilities negotiation until `qmp_capabilities`, validates every command against its schema and
 * answers in the order the commands arrived (one command at a time per client, as QEMU does without
 * out-of-band execution). Events go to every negotiated client. Commands are registered by the layers
 * above; the server itself provides only `qmp_capabilities`, `query-version` and `query-commands`.
 */
import * as net from "node:net";
import { assert } from "../core/assert.js";
import { BlockError } from "../core/errors.js";
import type { Logger } from "../core/log.js";
import { MiB } from "../core/units.js";
import { listenUnix, type OwnedSocket } from "../core/unix-socket.js";
import { encodeQmp, QmpInputSplitter, type QmpInput } from "./codec.js";
import { QmpError, qmpErrorFrom } from "./errors.js";
import { validateArgs, type ArgsSpec, type FieldSpec, type InferArgs } from "./schema.js";

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
  readonly #commands = new Map<string, QmpCommandDef>();
  readonly #clients = new Set<QmpClient>();
  #server: net.Server | null = null;
  #socket: OwnedSocket | null = null;
  #nextClientId = 1;
  #closing: Promise<void> | null = null;

  constructor(options: QmpServerOptions) {
    this.#log = options.log;
    this.#version = options.version;
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
          capabilities: [],
        },
      }),
    );
  }

  #onInput(client: QmpClient, inputs: QmpInput[]): void {
    if (client.closed || this.#closing !== null) return;
    client.queue.push(...inputs);
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
    const id = Object.hasOwn(request, "id") ? { id: request.id } : {};
    let name: string | undefined;
    try {
      name = checkRequest(request);
      const def = this.#commands.get(name);
      if (def === undefined || (!client.negotiated && name !== "qmp_capabilities")) {
        throw new QmpError("CommandNotFound", `The command ${name} has not been found`);
      }
      const args = validateArgs(def.args, request.arguments);
      client.log.debug({ command: name }, "QMP command");
      const result = await def.handler(args, client);
      return encodeQmp({ return: result === undefined ? {} : result, ...id });
    } catch (err) {
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
          // We offer no capabilities, so any asked for is unavailable (QEMU's text).
          const asked = args.enable ?? [];
          if (asked.length > 0) throw new QmpError("GenericError", `Capability '${asked[0]}' not available`);
          client.capabilitiesAccepted = true;
        },
      }),
    );
    this.register(
      defineCommand({
        name: "query-version",
        args: {},
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
        handler: () => this.commandNames().map((name) => ({ name })),
      }),
    );
  }
}

/** Checks the request's members as QEMU does; returns the command name. */
function checkRequest(request: Record<string, unknown>): string {
  let name: string | undefined;
  for (const [key, value] of Object.entries(request)) {
    if (key === "execute") {
      if (typeof value !== "string")
        throw new QmpError("GenericError", "QMP input member 'execute' must be a string");
      name = value;
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
