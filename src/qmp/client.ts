/**
 * A small QMP client: connects to a unix socket, negotiates capabilities, runs commands one at a time
 * and collects events. Used by the CLI (`drivetap qmp`, `backup`, `jobs`) and by tests.
 */
import * as net from "node:net";
import { QmpError, type QmpErrorClass } from "./errors.js";

export interface QmpEvent {
  readonly event: string;
  readonly data: Record<string, unknown>;
  readonly timestamp: { seconds: number; microseconds: number };
}

export const QMP_CLIENT_TIMEOUT_MS = 30_000;

export class QmpClient {
  readonly #socket: net.Socket;
  #buffer = "";
  #lines: string[] = [];
  #lineWaiter: (() => void) | null = null;
  #closed = false;
  readonly events: QmpEvent[] = [];
  #eventWaiters: Array<{ match: (e: QmpEvent) => boolean; resolve: (e: QmpEvent) => void }> = [];
  greeting: Record<string, unknown> | null = null;
  #busy: Promise<unknown> = Promise.resolve();
  #onClosed!: () => void;
  /** Resolves when the connection has closed (a server that quits closes it last, after its images). */
  readonly closed = new Promise<void>((resolve) => (this.#onClosed = resolve));

  private constructor(socket: net.Socket) {
    this.#socket = socket;
    socket.setEncoding("utf8");
    socket.on("data", (chunk: string) => {
      this.#buffer += chunk;
      let nl: number;
      while ((nl = this.#buffer.indexOf("\n")) >= 0) {
        const line = this.#buffer.slice(0, nl).trim();
        this.#buffer = this.#buffer.slice(nl + 1);
        if (line) this.#onLine(line);
      }
    });
    socket.on("close", () => {
      this.#closed = true;
      this.#onClosed();
      this.#lineWaiter?.();
    });
    socket.on("error", () => undefined);
  }

  /** Connects and negotiates (qmp_capabilities). */
  static async connect(path: string): Promise<QmpClient> {
    const socket = net.connect(path);
    await new Promise<void>((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("error", reject);
    });
    const client = new QmpClient(socket);
    client.greeting = JSON.parse(await client.#nextLine()) as Record<string, unknown>;
    await client.execute("qmp_capabilities");
    return client;
  }

  #onLine(line: string): void {
    let msg: Record<string, unknown>;
    try {
      msg = JSON.parse(line) as Record<string, unknown>;
    } catch {
      // Not a QMP peer (or a broken one): drop the connection; pending calls fail with "closed".
      this.#socket.destroy();
      return;
    }
    if (typeof msg.event === "string") {
      const e = msg as unknown as QmpEvent;
      this.events.push(e);
      const waiters = this.#eventWaiters;
      this.#eventWaiters = [];
      for (const w of waiters) {
        if (w.match(e)) w.resolve(e);
        else this.#eventWaiters.push(w);
      }
      return;
    }
    this.#lines.push(line);
    const w = this.#lineWaiter;
    this.#lineWaiter = null;
    w?.();
  }

  async #nextLine(): Promise<string> {
    const deadline = Date.now() + QMP_CLIENT_TIMEOUT_MS;
    while (this.#lines.length === 0) {
      if (this.#closed) throw new Error("QMP connection closed");
      if (Date.now() > deadline) throw new Error("QMP reply timed out");
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.max(1, deadline - Date.now()));
        this.#lineWaiter = () => {
          clearTimeout(t);
          resolve();
        };
      });
    }
    return this.#lines.shift()!;
  }

  /** Runs a command; resolves with its `return`, rejects with QmpError. */
  execute(command: string, args?: Record<string, unknown>): Promise<unknown> {
    const run = async (): Promise<unknown> => {
      const msg: Record<string, unknown> = { execute: command };
      if (args !== undefined) msg.arguments = args;
      this.#socket.write(JSON.stringify(msg) + "\n");
      const reply = JSON.parse(await this.#nextLine()) as Record<string, unknown>;
      if ("error" in reply) {
        const e = reply.error as { class: QmpErrorClass; desc: string };
        throw new QmpError(e.class, e.desc);
      }
      return reply.return;
    };
    const p = this.#busy.then(run, run);
    this.#busy = p.catch(() => undefined);
    return p;
  }

  /** Resolves with the first event (already received or future) that matches. */
  waitForEvent(match: (e: QmpEvent) => boolean, timeoutMs = QMP_CLIENT_TIMEOUT_MS): Promise<QmpEvent> {
    const seen = this.events.find(match);
    if (seen) return Promise.resolve(seen);
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.#eventWaiters = this.#eventWaiters.filter((w) => w.resolve !== done);
        reject(new Error("timed out waiting for a QMP event"));
      }, timeoutMs);
      const done = (e: QmpEvent): void => {
        clearTimeout(timer);
        resolve(e);
      };
      this.#eventWaiters.push({ match, resolve: done });
    });
  }

  close(): void {
    this.#socket.end();
    this.#socket.destroy();
  }
}
