/**
 * The NBD client block driver: a remote export (qemu-nbd, nbdkit, another drivetap) used as a node,
 * typically a job's target. It speaks through one NbdConnection at a time and survives the server:
 *
 * - When the connection drops (or a request goes unanswered for `requestTimeoutMs`, which is how a cut
 *   network link shows), it reconnects in the background with bounded exponential backoff, logging
 *   each change of state rather than each attempt.
 * - While disconnected, a request waits at most `reconnectDelayMs` (QEMU's reconnect-delay) for the
 *   link to return, then fails with ENOTCONN. Requests caught by the drop are re-sent on the new
 *   connection within the same deadline; NBD writes are idempotent and the request path above keeps
 *   overlapping writes ordered, so re-sending is safe.
 * - `link` lets jobs see the state, so they can record what the target misses and resync later.
 * - With `tls`, every connection (the first and each reconnect) runs STARTTLS with the same loaded
 *   credentials; a TLS failure on reconnect is logged with its reason and retried like any other.
 */
import { BlockError } from "../../core/errors.js";
import { silentLogger, type Logger } from "../../core/log.js";
import { GiB } from "../../core/units.js";
import {
  allData,
  type BlockDriver,
  type DriverCapabilities,
  type Extent,
  type RemoteLink,
  type WriteFlags,
  type ZeroFlags,
} from "../../block/driver.js";
import * as C from "../protocol/constants.js";
import { NbdConnection, type ClientTls, type ServerAddress } from "./connection.js";

export const RECONNECT_BACKOFF_MIN_MS = 50;
export const RECONNECT_BACKOFF_MAX_MS = 2000;
/** Write-zeroes, trim and block status are sent in pieces of at most this much. */
export const CLIENT_RANGE_BYTES_MAX = 1 * GiB;

export interface NbdDriverOptions {
  readonly server: ServerAddress;
  readonly exportName: string;
  /** How long a request waits for a lost connection to come back before failing (0: fail at once). */
  readonly reconnectDelayMs: number;
  /** A request without a reply for this long means the link is dead: drop it and reconnect. */
  readonly requestTimeoutMs: number;
  /** Connect plus handshake must finish within this. */
  readonly openTimeoutMs: number;
  /** TLS credentials and the name to check: every connection negotiates STARTTLS. */
  readonly tls?: ClientTls;
  readonly log?: Logger;
}

export type LinkState = "connected" | "reconnecting" | "closed";

export class NbdDriver implements BlockDriver {
  readonly driverName = "nbd";
  readonly capabilities: DriverCapabilities;
  readonly readOnly: boolean;
  readonly #options: NbdDriverOptions;
  readonly #log: Logger;
  readonly #size: number;
  readonly #requestBytesMax: number;
  readonly #flags: number;
  readonly #blockStatus: boolean;
  #conn: NbdConnection | null;
  #state: LinkState = "connected";
  readonly #listeners = new Set<(connected: boolean) => void>();
  #connectWaiters: Array<() => void> = [];
  #wakeBackoff: (() => void) | null = null;
  readonly #watchdog: NodeJS.Timeout;
  /** Counters for query output and tests. */
  readonly linkStats = { disconnects: 0, reconnects: 0, attempts: 0, retriedRequests: 0 };

  private constructor(conn: NbdConnection, options: NbdDriverOptions) {
    this.#options = options;
    this.#log = options.log ?? silentLogger;
    this.#conn = conn;
    const info = conn.info;
    this.#size = info.size;
    this.#flags = info.transmissionFlags;
    this.#requestBytesMax = info.maximumRequestBytes;
    this.#blockStatus = info.allocationContext !== null;
    this.readOnly = (info.transmissionFlags & C.NBD_FLAG_READ_ONLY) !== 0;
    this.capabilities = {
      zeroes: this.#flags & C.NBD_FLAG_SEND_WRITE_ZEROES ? "native" : "emulate",
      fua: this.#flags & C.NBD_FLAG_SEND_FUA ? "native" : "emulate",
      discard: (this.#flags & C.NBD_FLAG_SEND_TRIM) !== 0,
      // NBD_CMD_TRIM is advisory: a server may keep the data (qemu-nbd does without --discard=unmap).
      discardZeroes: false,
      blockStatus: this.#blockStatus,
    };
    this.#watch(conn);
    const tickMs = Math.max(50, Math.min(1000, Math.floor(options.requestTimeoutMs / 4)));
    this.#watchdog = setInterval(() => this.#checkStalled(), tickMs);
    this.#watchdog.unref();
  }

  /** Connects; the first connection must succeed (as blockdev-add of an nbd node in QEMU). */
  static async open(options: NbdDriverOptions): Promise<NbdDriver> {
    const conn = await NbdConnection.open(
      options.server,
      options.exportName,
      options.openTimeoutMs,
      options.tls,
    );
    return new NbdDriver(conn, options);
  }

  get state(): LinkState {
    return this.#state;
  }

  readonly link: RemoteLink = ((driver: NbdDriver): RemoteLink => ({
    get connected(): boolean {
      return driver.#state === "connected";
    },
    watch: (listener) => {
      driver.#listeners.add(listener);
      return () => driver.#listeners.delete(listener);
    },
  }))(this);

  get connected(): boolean {
    return this.#state === "connected";
  }

  /** Whether the connections run over TLS. */
  get tls(): boolean {
    return this.#options.tls !== undefined;
  }

  // ---- connection life ---------------------------------------------------------------------------

  #watch(conn: NbdConnection): void {
    void conn.closed.then(() => {
      if (this.#conn !== conn) return;
      this.#conn = null;
      if (this.#state === "closed") return;
      this.#setState("reconnecting");
      this.linkStats.disconnects++;
      this.#log.warn({ server: describe(this.#options.server) }, "NBD target connection lost; reconnecting");
      void this.#reconnect();
    });
  }

  #setState(state: LinkState): void {
    if (this.#state === state) return;
    this.#state = state;
    if (state !== "closed") for (const l of [...this.#listeners]) l(state === "connected");
  }

  async #reconnect(): Promise<void> {
    let delayMs = RECONNECT_BACKOFF_MIN_MS;
    let failures = 0;
    while (this.#state === "reconnecting") {
      this.linkStats.attempts++;
      try {
        const conn = await NbdConnection.open(
          this.#options.server,
          this.#options.exportName,
          this.#options.openTimeoutMs,
          this.#options.tls,
        );
        if (this.#state !== "reconnecting") {
          conn.destroy("driver closed");
          return;
        }
        if (conn.info.size !== this.#size) {
          conn.destroy("size changed");
          throw new BlockError("EIO", `export size changed from ${this.#size} to ${conn.info.size}`);
        }
        this.#conn = conn;
        this.#watch(conn);
        this.linkStats.reconnects++;
        this.#log.info({ server: describe(this.#options.server), failures }, "NBD target reconnected");
        this.#setState("connected");
        for (const wake of this.#connectWaiters.splice(0)) wake();
        return;
      } catch (err) {
        failures++;
        if (failures === 1 || failures % 20 === 0) {
          this.#log.warn(
            {
              server: describe(this.#options.server),
              err: (err as Error).message,
              failures,
              nextTryMs: delayMs,
            },
            "NBD reconnect failed",
          );
        }
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, delayMs);
        this.#wakeBackoff = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.#wakeBackoff = null;
      delayMs = Math.min(delayMs * 2, RECONNECT_BACKOFF_MAX_MS);
    }
  }

  /** A request unanswered past the timeout: the peer or the path is gone. */
  #checkStalled(): void {
    const conn = this.#conn;
    if (!conn) return;
    const oldest = conn.oldestSentAtMs();
    if (oldest !== null && Date.now() - oldest > this.#options.requestTimeoutMs) {
      this.#log.warn({ timeoutMs: this.#options.requestTimeoutMs }, "NBD target stopped answering");
      conn.destroy(`no reply from the NBD server within ${this.#options.requestTimeoutMs} ms`);
    }
  }

  /** The live connection, waiting for a reconnect until `deadlineMs`. */
  async #connection(deadlineMs: number): Promise<NbdConnection> {
    for (;;) {
      if (this.#state === "closed") throw new BlockError("ESHUTDOWN", "NBD driver is closed");
      if (this.#conn && !this.#conn.isClosed) return this.#conn;
      const leftMs = deadlineMs - Date.now();
      if (leftMs <= 0) {
        throw new BlockError("ENOTCONN", `NBD target ${describe(this.#options.server)} is unreachable`);
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, leftMs);
        this.#connectWaiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  /** Runs one request, re-sending it on a new connection if the old one drops, until the deadline. */
  async #run<T>(send: (conn: NbdConnection) => Promise<T>): Promise<T> {
    const deadlineMs = Date.now() + this.#options.reconnectDelayMs;
    for (;;) {
      // The common case, a live connection, costs no extra promise.
      const live = this.#conn;
      const conn = live && !live.isClosed ? live : await this.#connection(deadlineMs);
      try {
        return await send(conn);
      } catch (err) {
        if (!(err instanceof BlockError) || err.code !== "ENOTCONN" || Date.now() >= deadlineMs) throw err;
        this.linkStats.retriedRequests++;
      }
    }
  }

  // ---- BlockDriver ---------------------------------------------------------------------------------

  size(): number {
    return this.#size;
  }

  async pread(offset: number, into: Buffer): Promise<void> {
    const max = this.#requestBytesMax;
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < into.length; at += max) {
      const piece = into.subarray(at, Math.min(at + max, into.length));
      parts.push(this.#run((c) => c.request(C.NBD_CMD_READ, 0, offset + at, piece.length, null, piece)));
    }
    await Promise.all(parts);
  }

  async pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    const f = flags.fua && this.capabilities.fua === "native" ? C.NBD_CMD_FLAG_FUA : 0;
    let length = 0;
    for (const b of data) length += b.length;
    if (length <= this.#requestBytesMax) {
      await this.#run((c) => c.request(C.NBD_CMD_WRITE, f, offset, length, data));
      return;
    }
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < length; at += this.#requestBytesMax) {
      const n = Math.min(this.#requestBytesMax, length - at);
      const piece = sliceIov(data, at, n);
      parts.push(this.#run((c) => c.request(C.NBD_CMD_WRITE, f, offset + at, n, piece)));
    }
    await Promise.all(parts);
  }

  async pwriteZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (flags.fastZero && !(this.#flags & C.NBD_FLAG_SEND_FAST_ZERO)) {
      throw new BlockError("ENOTSUP", "the NBD server cannot promise fast zeroes");
    }
    let f = flags.mayTrim ? 0 : C.NBD_CMD_FLAG_NO_HOLE;
    if (flags.fua && this.capabilities.fua === "native") f |= C.NBD_CMD_FLAG_FUA;
    if (flags.fastZero) f |= C.NBD_CMD_FLAG_FAST_ZERO;
    await this.#ranges(offset, length, (c, o, n) => c.request(C.NBD_CMD_WRITE_ZEROES, f, o, n));
  }

  async pdiscard(offset: number, length: number): Promise<void> {
    if (!this.capabilities.discard) return;
    await this.#ranges(offset, length, (c, o, n) => c.request(C.NBD_CMD_TRIM, 0, o, n));
  }

  async flush(): Promise<void> {
    if (!(this.#flags & C.NBD_FLAG_SEND_FLUSH)) return;
    await this.#run((c) => c.request(C.NBD_CMD_FLUSH, 0, 0, 0));
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    if (!this.#blockStatus) return allData(offset, length);
    const n = Math.min(length, CLIENT_RANGE_BYTES_MAX);
    const extents = await this.#run((c) => c.request(C.NBD_CMD_BLOCK_STATUS, 0, offset, n));
    if (!extents || extents.length === 0) return allData(offset, n);
    return extents;
  }

  async close(): Promise<void> {
    const conn = this.#conn;
    this.#setState("closed");
    clearInterval(this.#watchdog);
    this.#wakeBackoff?.();
    for (const wake of this.#connectWaiters.splice(0)) wake();
    this.#conn = null;
    if (conn && !conn.isClosed) await conn.disconnect();
  }

  async #ranges(
    offset: number,
    length: number,
    send: (conn: NbdConnection, offset: number, length: number) => Promise<unknown>,
  ): Promise<void> {
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < length; at += CLIENT_RANGE_BYTES_MAX) {
      const n = Math.min(CLIENT_RANGE_BYTES_MAX, length - at);
      parts.push(this.#run((c) => send(c, offset + at, n)));
    }
    await Promise.all(parts);
  }
}

function describe(a: ServerAddress): string {
  return a.type === "unix" ? `unix:${a.path}` : `${a.host}:${a.port}`;
}

/** The bytes [start, start + length) of a buffer list, as views. */
function sliceIov(data: readonly Buffer[], start: number, length: number): Buffer[] {
  const out: Buffer[] = [];
  let pos = 0;
  for (const b of data) {
    const end = pos + b.length;
    if (end > start && pos < start + length) {
      out.push(b.subarray(Math.max(0, start - pos), Math.min(b.length, start + length - pos)));
    }
    pos = end;
    if (pos >= start + length) break;
  }
  return out;
}
