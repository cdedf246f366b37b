/**
 * TLS off the main event loop. After STARTTLS has been acknowledged, a connection's socket is handed
 * to one of a few worker threads, which runs the TLS handshake and record layer (encryption,
 * decryption, the socket's reads and writes); the connection goes on in plaintext over a socketpair
 * to that worker, read into slabs like any plain socket. The main loop then pays what a plaintext
 * connection costs per request, and the TLS work runs on other cores (nbdkit spreads TLS over threads
 * the same way).
 *
 * Node cannot move a net.Socket between threads, so the handover is by descriptor: the native addon
 * dups the client's socket (the main thread then destroys its own socket object, closing only its
 * descriptor) and makes the socketpair. Workers are opt-in (DRIVETAP_TLS_WORKERS=N or auto); without
 * them, or without the addon's calls, there is no pool and TLS runs on the main loop.
 *
 * A worker that dies (a bug: an uncaught exception) takes only its own connections: each is closed
 * at once, as if its client had hung up, and the death is logged with their count. Replies not yet
 * flushed are lost with the session, as on any broken connection; an acknowledged write was on the
 * node before its reply was sent. The next connection starts a new worker.
 */
import { closeSync } from "node:fs";
import type * as net from "node:net";
import { availableParallelism } from "node:os";
import { Worker } from "node:worker_threads";
import { native } from "../../block/drivers/native.js";
import type { Logger } from "../../core/log.js";
import { CLOSE_LINGER_MS } from "./limits.js";
import { startFdReading } from "./socket-reader.js";
import type { ConnectionMessage, FromWorker, TlsWorkerData } from "./tls-worker-thread.js";
import type { HandshakeResult, ServerTls } from "./tls-upgrade.js";

/** Worker threads at most, whatever the core count or DRIVETAP_TLS_WORKERS says. */
export const TLS_WORKERS_MAX = 8;
/**
 * At shutdown, how long the workers get to flush their last TLS records after every connection has
 * ended its side (a client that reads nothing is cut off by the worker's own CLOSE_LINGER_MS).
 */
export const TLS_WORKER_DRAIN_TIMEOUT_MS = CLOSE_LINGER_MS + 5_000;

interface Offloaded {
  /** The connection's plaintext end of the socketpair. */
  readonly socket: net.Socket;
  handshake: ((r: HandshakeResult) => void) | null;
}

interface WorkerSlot {
  readonly index: number;
  readonly worker: Worker;
  readonly connections: Map<number, Offloaded>;
  /** Set once it has exited or been told to stop: no new connections go to it. */
  gone: boolean;
}

/**
 * Workers to start: DRIVETAP_TLS_WORKERS (a count, or "auto" for one per core); unset or 0, none.
 * Off by default: on a 2-core machine shared with the client, the socketpair hop costs more CPU in
 * all than the main loop saves (docs/ARCHITECTURE.md, "Decision: TLS on worker threads, opt-in").
 */
export function tlsWorkerCount(): number {
  const asked = process.env.DRIVETAP_TLS_WORKERS;
  if (asked === undefined || asked === "") return 0;
  const n = asked === "auto" ? availableParallelism() : Number(asked);
  return Number.isInteger(n) && n > 0 ? Math.min(n, TLS_WORKERS_MAX) : 0;
}

interface SocketHandle {
  _handle?: { fd?: number } | null;
}

export class TlsWorkerPool {
  readonly #tls: ServerTls;
  readonly #log: Logger;
  readonly #size: number;
  readonly #slots: Array<WorkerSlot | null>;
  #nextId = 1;
  #closing = false;
  #drained: (() => void) | null = null;

  constructor(tls: ServerTls, log: Logger, size = tlsWorkerCount()) {
    this.#tls = tls;
    this.#log = log;
    this.#size = Math.min(size, TLS_WORKERS_MAX);
    this.#slots = new Array<WorkerSlot | null>(this.#size).fill(null);
  }

  /** Whether offload can work at all here (workers asked for, and the addon's descriptor calls). */
  get enabled(): boolean {
    return (
      this.#size > 0 &&
      typeof native?.dupCloexec === "function" &&
      typeof native.unixSocketPair === "function"
    );
  }

  /** Connections served by workers now. */
  get connectionCount(): number {
    let n = 0;
    for (const s of this.#slots) if (s !== null) n += s.connections.size;
    return n;
  }

  /**
   * Hands `raw` (STARTTLS acknowledged, its reading paused, nothing read past the ACK) to a worker.
   * Returns the plaintext socket the connection uses from now on (its chunks go to onChunk), and the
   * caller then destroys `raw`, which closes only this thread's descriptor; `done` gets the
   * handshake's result. Null when the socket cannot be handed over; then `raw` is untouched.
   */
  offload(
    raw: net.Socket,
    onChunk: (chunk: Buffer) => void,
    done: (r: HandshakeResult) => void,
  ): net.Socket | null {
    if (!this.enabled || this.#closing) return null;
    const fd = (raw as unknown as SocketHandle)._handle?.fd;
    // Bytes Node has already read into the stream would not reach the worker.
    if (typeof fd !== "number" || fd < 0 || raw.readableLength > 0) return null;
    const pair = native!.unixSocketPair!();
    if (typeof pair === "number") {
      this.#log.warn({ errno: -pair }, "socketpair failed; TLS for this connection runs on the main thread");
      return null;
    }
    const dup = native!.dupCloexec!(fd);
    if (dup < 0) {
      closeSync(pair[0]);
      closeSync(pair[1]);
      this.#log.warn({ errno: -dup }, "dup failed; TLS for this connection runs on the main thread");
      return null;
    }
    const slot = this.#pick();
    const id = this.#nextId++;
    const socket = startFdReading(pair[0], onChunk);
    const entry: Offloaded = { socket, handshake: done };
    // Kept until the worker says both its sockets are closed: its handshake report may come after
    // this end has closed (the worker closes the socketpair when a handshake fails), and the
    // connection still logs why.
    slot.connections.set(id, entry);
    const message: ConnectionMessage = { type: "connection", id, fd: dup, plainFd: pair[1] };
    slot.worker.postMessage(message);
    return socket;
  }

  /** The live worker with the fewest connections; a new one while fewer than the pool's size run. */
  #pick(): WorkerSlot {
    let best: WorkerSlot | null = null;
    let free = -1;
    for (let i = 0; i < this.#size; i++) {
      const s = this.#slots[i];
      if (s === null || s.gone) {
        if (free < 0) free = i;
        continue;
      }
      if (best === null || s.connections.size < best.connections.size) best = s;
    }
    if (free >= 0 && (best === null || best.connections.size > 0)) return this.#start(free);
    return best!;
  }

  #start(index: number): WorkerSlot {
    const data: TlsWorkerData = {
      mode: this.#tls.mode,
      creds: this.#tls.creds,
      crashMarker: process.env.DRIVETAP_TEST_TLS_WORKER_CRASH_MARKER || undefined,
    };
    const worker = new Worker(new URL("./tls-worker-thread.js", import.meta.url), { workerData: data });
    // The daemon's life is its server's: an idle worker must not keep the process alive.
    worker.unref();
    const slot: WorkerSlot = { index, worker, connections: new Map(), gone: false };
    this.#slots[index] = slot;
    worker.on("message", (m: FromWorker) => this.#onMessage(slot, m));
    worker.on("error", (err) => this.#onExit(slot, err.message));
    worker.on("exit", (code) => this.#onExit(slot, `exit code ${code}`));
    this.#log.debug({ worker: index }, "TLS worker started");
    return slot;
  }

  #onMessage(slot: WorkerSlot, m: FromWorker): void {
    const entry = slot.connections.get(m.id);
    if (entry === undefined) return;
    if (m.type === "handshake") {
      const done = entry.handshake;
      entry.handshake = null;
      done?.(m.result);
      return;
    }
    slot.connections.delete(m.id);
    this.#checkDrained();
  }

  /** A worker is gone: every connection it served is closed here, its count logged once. */
  #onExit(slot: WorkerSlot, why: string): void {
    if (slot.gone && slot.connections.size === 0) return;
    const wasExpected = slot.gone;
    slot.gone = true;
    if (this.#slots[slot.index] === slot) this.#slots[slot.index] = null;
    const n = slot.connections.size;
    if (!wasExpected || n > 0) {
      this.#log.error(
        { worker: slot.index, why, connections: n },
        `TLS worker ${slot.index} stopped (${why}); closing its ${n} connection${n === 1 ? "" : "s"}`,
      );
    }
    for (const entry of slot.connections.values()) {
      entry.handshake?.({ ok: false, reason: `the TLS worker thread stopped (${why})` });
      entry.handshake = null;
      entry.socket.destroy();
    }
    slot.connections.clear();
    this.#checkDrained();
  }

  #checkDrained(): void {
    if (this.#drained !== null && this.connectionCount === 0) this.#drained();
  }

  /**
   * For shutdown, after every connection has ended its side: waits (at most
   * TLS_WORKER_DRAIN_TIMEOUT_MS) for the workers to flush and close their sessions, then stops them.
   */
  async close(): Promise<void> {
    this.#closing = true;
    if (this.connectionCount > 0) {
      let timer: NodeJS.Timeout | undefined;
      await new Promise<void>((resolve) => {
        this.#drained = resolve;
        timer = setTimeout(resolve, TLS_WORKER_DRAIN_TIMEOUT_MS);
      });
      clearTimeout(timer);
      this.#drained = null;
    }
    const stopping: Promise<number>[] = [];
    for (const s of this.#slots) {
      if (s === null) continue;
      s.gone = true;
      stopping.push(s.worker.terminate());
    }
    await Promise.all(stopping);
  }
}
