/**
 * The body of a TLS worker thread (tls-worker.ts starts it). Each connection handed to it arrives as
 * two descriptors: the client's socket, on which this thread runs the TLS handshake and record layer
 * (ServerTls.upgrade, the same code the main thread runs without workers), and one end of a
 * socketpair whose other end the connection reads and writes in plaintext. Bytes are relayed both
 * ways (Direction, below) with backpressure, so a paused connection stops this thread reading the
 * client.
 *
 * Messages to the main thread: `handshake` (once per connection: its HandshakeResult, plain data)
 * and `closed` (both sockets are gone, its replies flushed or dropped). Authz stays in the main
 * thread: it may be a QMP object that changes while the daemon runs.
 */
import * as net from "node:net";
import { parentPort, workerData } from "node:worker_threads";
import type { TlsCredentials } from "../tls/credentials.js";
import { KiB, MiB } from "../../core/units.js";
import { CLOSE_LINGER_MS } from "./limits.js";
import { FreshReadSpace, startFdReading, startTlsReading } from "./socket-reader.js";
import { ServerTls, type HandshakeResult } from "./tls-upgrade.js";

/** What the pool sends: a connection to serve. */
export interface ConnectionMessage {
  readonly type: "connection";
  readonly id: number;
  /** The client's socket (a dup: the main thread has closed its own descriptor). */
  readonly fd: number;
  /** This thread's end of the plaintext socketpair. */
  readonly plainFd: number;
}

export type FromWorker =
  | {
      readonly type: "handshake";
      readonly id: number;
      readonly result: HandshakeResult;
    }
  | { readonly type: "closed"; readonly id: number };

export interface TlsWorkerData {
  readonly mode: "on" | "require";
  readonly creds: TlsCredentials;
  /**
   * For tests of a crashing worker: throw (as a bug would) when a client's decrypted bytes contain
   * this marker. Unset in production.
   */
  readonly crashMarker?: string;
}

/** Structured clone turns Buffers into Uint8Arrays; the credentials code expects Buffers. */
function reviveCredentials(c: TlsCredentials): TlsCredentials {
  const buf = (b: Uint8Array | undefined): Buffer | undefined =>
    b === undefined ? undefined : Buffer.from(b.buffer, b.byteOffset, b.byteLength);
  if (c.kind === "psk") {
    return { ...c, keys: new Map([...c.keys].map(([k, v]) => [k, buf(v)!])) };
  }
  return { ...c, ca: buf(c.ca)!, crl: buf(c.crl), cert: buf(c.cert), key: buf(c.key) };
}

/**
 * Each direction in plain chunks: TLS records are read into fresh buffers (FreshReadSpace: no
 * allocation and stream push per record), and writes are corked for the rest of the event-loop turn,
 * so a client's 32 pipelined requests (32 records) reach the connection as one chunk, as from a plain
 * socket, and a turn's replies leave as one TLS write. Past RELAY_PAUSE_BYTES unsent, the other side
 * is paused until 'drain'. (Not at the streams' 16 KiB high-water mark: one turn of 4 KiB replies at
 * QD32 is 131 KiB, and pausing there would stop and restart reading every turn.)
 */
class Direction {
  readonly #to: net.Socket;
  readonly #from: net.Socket;
  #corked = false;

  constructor(from: net.Socket, to: net.Socket) {
    this.#from = from;
    this.#to = to;
    to.on("drain", () => from.resume());
  }

  readonly #uncork = (): void => {
    this.#corked = false;
    this.#to.uncork();
  };

  readonly write = (chunk: Buffer): void => {
    if (!this.#corked) {
      this.#corked = true;
      this.#to.cork();
      setImmediate(this.#uncork);
    }
    // A false write always ends in 'drain', which resumes.
    if (!this.#to.write(chunk) && this.#to.writableLength >= RELAY_PAUSE_BYTES) this.#from.pause();
  };

  /** The source has ended: what is corked goes, then the end. */
  readonly end = (): void => {
    if (this.#corked) this.#uncork();
    this.#to.end();
  };
}

/**
 * Read space per direction (the client's requests and write payloads; the connection's replies),
 * fresh buffers of this size: what an idle connection holds in its worker, twice.
 */
export const RELAY_READ_BYTES = 64 * KiB;
/** Bytes one direction may have unsent before its source is paused. */
export const RELAY_PAUSE_BYTES = 2 * MiB;

function serve(tls: ServerTls, m: ConnectionMessage, crashMarker: Buffer | null): void {
  const post = (msg: FromWorker): void => parentPort!.postMessage(msg);
  // Paused as an accepted socket is: the TLS layer takes over its reading.
  const raw = new net.Socket({
    fd: m.fd,
    allowHalfOpen: true,
    readable: true,
    writable: true,
    pauseOnCreate: true,
  } as net.SocketConstructorOpts);
  let ok = false;
  const secure = tls.upgrade(raw, (result) => {
    post({ type: "handshake", id: m.id, result });
    if (result.ok) ok = true;
    else {
      secure.destroy();
      plain.destroy();
    }
  });
  let toConnection: Direction | null = null;
  let toClient: Direction | null = null;
  startTlsReading(
    secure,
    (chunk) => {
      if (crashMarker !== null && chunk.includes(crashMarker))
        throw new Error("test fault: crash marker seen");
      toConnection!.write(chunk);
    },
    () => new FreshReadSpace(RELAY_READ_BYTES),
  );
  const plain = startFdReading(
    m.plainFd,
    (chunk) => toClient!.write(chunk),
    () => new FreshReadSpace(RELAY_READ_BYTES),
  );
  toConnection = new Direction(secure, plain);
  toClient = new Direction(plain, secure);
  secure.on("end", toConnection.end);
  plain.on("end", toClient.end);
  // Errors end the connection through 'close'; the main thread logs the connection's end.
  secure.on("error", () => {});
  plain.on("error", () => {});
  let lingerTimer: NodeJS.Timeout | null = null;
  // The connection dropped its end: after a graceful end (its readable side ended, so the TLS
  // session has been ended after the last reply) the client gets CLOSE_LINGER_MS to take the rest;
  // an abrupt one (eviction, the handshake bound) cuts the client off now.
  plain.on("close", () => {
    if (!ok || !plain.readableEnded) return secure.destroy();
    if (!secure.destroyed) lingerTimer = setTimeout(() => secure.destroy(), CLOSE_LINGER_MS);
  });
  secure.on("close", () => {
    if (lingerTimer !== null) clearTimeout(lingerTimer);
    plain.destroy();
  });
  let closed = 0;
  const onClosed = (): void => {
    if (++closed === 2) post({ type: "closed", id: m.id });
  };
  secure.once("close", onClosed);
  plain.once("close", onClosed);
}

if (parentPort !== null) {
  const data = workerData as TlsWorkerData;
  const tls = new ServerTls({ mode: data.mode, creds: reviveCredentials(data.creds), authz: null });
  const crashMarker = data.crashMarker ? Buffer.from(data.crashMarker) : null;
  parentPort.on("message", (m: ConnectionMessage) => serve(tls, m, crashMarker));
}
