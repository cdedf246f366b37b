/**
 * The NBD server: listens on a unix socket or TCP, holds the exports, and owns the connections. It
 * bounds handshakes and transmission connections separately (a full server evicts the oldest
 * unfinished handshake, or the connection idle longest, rather than lock everyone out), holds the
 * daemon-wide buffer budget the connections share, drops peers that stall, and shuts down cleanly
 * (in-flight requests finish first).
 */
import * as net from "node:net";
import { coarseNowMs } from "../../core/coarse-clock.js";
import type { Logger } from "../../core/log.js";
import { listenUnix, type OwnedSocket } from "../../core/unix-socket.js";
import { BufferBudget } from "./buffer-budget.js";
import { NbdConnection, type ConnectionHost, type InFlightRequest, type NbdExport } from "./connection.js";
import * as L from "./limits.js";
import { startReading } from "./socket-reader.js";
import { ServerTls, type ServerTlsConfig } from "./tls-upgrade.js";
import { TlsWorkerPool } from "./tls-worker.js";

export interface NbdServerOptions {
  /** The daemon-wide budget for request and reply buffers (`--max-buffer-memory`). */
  readonly bufferMemoryBytes?: number;
  /** TLS for every export of this server (NBD_OPT_STARTTLS); omitted: TLS off. */
  readonly tls?: ServerTlsConfig;
  /**
   * QMP's max-connections: connections (handshaking or transmitting) at once; 0 or omitted means
   * only the server's own bounds (CONNECTIONS_MAX, HANDSHAKES_MAX). A connection past it is closed at
   * accept: QEMU stops accepting instead, which leaves a client waiting without telling it why.
   */
  readonly maxConnections?: number;
}

/** One connection as `x-query-nbd-connections` shows it. */
export interface ConnectionInfo {
  readonly id: number;
  readonly export: string | null;
  readonly ageMs: number;
  readonly inFlight: ReadonlyArray<InFlightRequest & { readonly ageMs: number }>;
  readonly unsentBytes: number;
  /** Whether the connection went through STARTTLS. */
  readonly tls: boolean;
  /** What its reading waits for, the buffer bytes it holds, whether its socket is paused. */
  readonly admission: NbdConnection["admission"];
}

export type ListenAddress =
  | { readonly type: "unix"; readonly path: string }
  | { readonly type: "inet"; readonly host: string; readonly port: number };

export class NbdServer implements ConnectionHost {
  readonly #exports = new Map<string, NbdExport>();
  /** Every open connection; the two sets below split them by phase. */
  readonly #connections = new Set<NbdConnection>();
  /** Connections still in the handshake, oldest first (Set order is insertion order). */
  readonly #handshaking = new Set<NbdConnection>();
  readonly #transmitting = new Set<NbdConnection>();
  /** TCP handshakes by the peer's address. */
  readonly #handshakesByAddress = new Map<string, Set<NbdConnection>>();
  readonly #servers: net.Server[] = [];
  readonly #log: Logger;
  readonly #unixPaths: OwnedSocket[] = [];
  readonly budget: BufferBudget;
  /** TLS offered on every connection (exports added later over QMP included), or null. */
  readonly tls: ServerTls | null;
  /** The threads TLS sessions run on (started at the first STARTTLS), or null: TLS off, or on this loop. */
  readonly tlsWorkers: TlsWorkerPool | null;
  readonly #stallTimer: NodeJS.Timeout;
  readonly #maxConnections: number;
  #nextConnectionId = 1;

  constructor(log: Logger, options: NbdServerOptions = {}) {
    this.#log = log;
    this.#maxConnections = options.maxConnections ?? 0;
    const bytes = options.bufferMemoryBytes ?? L.BUFFER_MEMORY_DEFAULT_BYTES;
    if (bytes < L.BUFFER_MEMORY_MIN_BYTES) {
      throw new Error(`buffer memory ${bytes} is below the minimum of ${L.BUFFER_MEMORY_MIN_BYTES} bytes`);
    }
    // Builds the secure context now: bad credentials fail the start, not the first client.
    this.tls = options.tls ? new ServerTls(options.tls) : null;
    const pool = this.tls === null ? null : new TlsWorkerPool(this.tls, log.child({ tls: "workers" }));
    this.tlsWorkers = pool?.enabled ? pool : null;
    // Only connections in transmission send requests, so only they need a reserved share.
    this.budget = new BufferBudget(bytes, L.CONNECTIONS_MAX, L.BUFFER_RESERVED_BYTES);
    this.#stallTimer = setInterval(() => {
      const now = coarseNowMs();
      for (const c of this.#transmitting) c.checkStalled(now);
    }, L.STALL_CHECK_INTERVAL_MS);
    this.#stallTimer.unref();
  }

  addExport(e: NbdExport): void {
    if (this.#exports.has(e.name)) throw new Error(`export "${e.name}" already exists`);
    this.#exports.set(e.name, e);
  }

  removeExport(name: string): boolean {
    return this.#exports.delete(name);
  }

  /** Connections serving export `e` that still take requests (not closing after DISC or EOF). */
  activeConnectionsOf(e: NbdExport): number {
    let n = 0;
    for (const c of this.#connections) if (c.servedExport === e && !c.closing) n++;
    return n;
  }

  /** Connections serving export `e`, closing ones included. */
  connectionsOf(e: NbdExport): number {
    let n = 0;
    for (const c of this.#connections) if (c.servedExport === e) n++;
    return n;
  }

  /** Ends every connection serving export `e`: in-flight requests finish, then each is closed. */
  async closeConnectionsOf(e: NbdExport): Promise<void> {
    await Promise.all([...this.#connections].filter((c) => c.servedExport === e).map((c) => c.shutdown()));
  }

  findExport(name: string): NbdExport | undefined {
    return this.#exports.get(name);
  }

  listExports(): readonly NbdExport[] {
    return [...this.#exports.values()];
  }

  get connectionCount(): number {
    return this.#connections.size;
  }

  /** Every connection with its requests received and not yet answered. */
  connections(): ConnectionInfo[] {
    const now = coarseNowMs();
    return [...this.#connections].map((c) => ({
      id: c.id,
      export: c.exportName,
      ageMs: now - c.acceptedMs,
      inFlight: c.inFlight().map((r) => ({ ...r, ageMs: now - r.startMs })),
      unsentBytes: c.unsentBytes,
      tls: c.encrypted,
      admission: c.admission,
    }));
  }

  enterTransmission(c: NbdConnection): boolean {
    if (this.#transmitting.size >= L.CONNECTIONS_MAX && !this.#evictIdlest()) {
      this.#log.warn({ max: L.CONNECTIONS_MAX }, "client refused: every connection is busy");
      return false;
    }
    this.#forgetHandshake(c);
    this.#transmitting.add(c);
    return true;
  }

  /** Evicts the connection idle longest, if one has been idle IDLE_EVICT_MIN_MS or more. */
  #evictIdlest(): boolean {
    const now = coarseNowMs();
    let best: NbdConnection | null = null;
    let bestIdle = L.IDLE_EVICT_MIN_MS - 1;
    for (const c of this.#transmitting) {
      const idle = c.idleMs(now);
      if (idle > bestIdle) {
        best = c;
        bestIdle = idle;
      }
    }
    if (best === null) return false;
    best.evict(`idle for ${bestIdle} ms while the server is full`);
    this.#transmitting.delete(best);
    return true;
  }

  /**
   * Makes room for a new handshake. The victim is the handshake that has sent nothing for the
   * longest time, preferring those that have sent nothing at all: an honest client answers the
   * greeting within a round trip and keeps sending, while a stalled or hostile one falls behind.
   */
  #evictHandshake(among: Iterable<NbdConnection>): void {
    let victim: NbdConnection | null = null;
    for (const c of among) {
      if (
        victim === null ||
        (c.receivedBytes === 0 && victim.receivedBytes > 0) ||
        ((c.receivedBytes === 0) === (victim.receivedBytes === 0) && c.lastInputMs < victim.lastInputMs)
      )
        victim = c;
    }
    this.#forgetHandshake(victim!);
    victim!.evict(`handshake not finished; ${L.HANDSHAKES_MAX} handshakes in progress`);
  }

  #forgetHandshake(c: NbdConnection): void {
    if (!this.#handshaking.delete(c) || c.peerAddress === undefined) return;
    const set = this.#handshakesByAddress.get(c.peerAddress)!;
    set.delete(c);
    if (set.size === 0) this.#handshakesByAddress.delete(c.peerAddress);
  }

  onClosed(c: NbdConnection): void {
    this.#connections.delete(c);
    this.#forgetHandshake(c);
    this.#transmitting.delete(c);
  }

  /** Starts listening; resolves with the bound address (the real port when 0 was asked). */
  async listen(address: ListenAddress): Promise<ListenAddress> {
    const server = net.createServer({ allowHalfOpen: true, noDelay: true, pauseOnConnect: true }, (socket) =>
      this.#accept(socket),
    );
    // A live server's socket is refused, a stale one replaced; at close only our own is removed.
    const owned = address.type === "unix" ? await listenUnix(server, address.path) : null;
    if (address.type === "inet") {
      await new Promise<void>((resolve, reject) => {
        server.once("error", reject);
        server.listen(address.port, address.host, () => resolve());
      });
    }
    server.on("error", (err) => this.#log.error({ err: err.message }, "listener error"));
    this.#servers.push(server);
    if (address.type === "unix") {
      this.#unixPaths.push(owned!);
      return address;
    }
    const bound = server.address() as net.AddressInfo;
    return { type: "inet", host: address.host, port: bound.port };
  }

  #accept(accepted: net.Socket): void {
    if (this.#maxConnections > 0 && this.#connections.size >= this.#maxConnections) {
      this.#log.warn({ max: this.#maxConnections }, "client refused: max-connections reached");
      accepted.destroy();
      return;
    }
    // TCP: one address gets at most HANDSHAKES_PER_ADDRESS_MAX of the handshake slots, so a flood
    // from one host churns only its own share. (Unix sockets have no address; their access control
    // is the socket file's mode.)
    const address = accepted.remoteAddress;
    const fromAddress = address === undefined ? undefined : this.#handshakesByAddress.get(address);
    if (fromAddress !== undefined && fromAddress.size >= L.HANDSHAKES_PER_ADDRESS_MAX) {
      this.#evictHandshake(fromAddress);
    } else if (this.#handshaking.size >= L.HANDSHAKES_MAX) {
      this.#evictHandshake(this.#handshaking);
    }
    const id = this.#nextConnectionId++;
    const log = this.#log.child({ conn: id });
    log.debug({}, "connected");
    let connection: NbdConnection | null = null;
    const socket = startReading(accepted, (chunk) => connection!.onData(chunk));
    // TCP only: a peer that vanished without a FIN is found by keepalive probes.
    if (socket.remoteAddress !== undefined) socket.setKeepAlive(true, L.PEER_STALL_TIMEOUT_MS);
    connection = new NbdConnection(id, socket, this, this.budget.open(), log, address);
    this.#connections.add(connection);
    this.#handshaking.add(connection);
    if (address !== undefined) {
      let set = this.#handshakesByAddress.get(address);
      if (!set) this.#handshakesByAddress.set(address, (set = new Set()));
      set.add(connection);
    }
  }

  /** Stops accepting, lets every connection finish its in-flight requests, then closes them. */
  async close(): Promise<void> {
    clearInterval(this.#stallTimer);
    const closing = this.#servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
    await Promise.all([...this.#connections].map((c) => c.shutdown()));
    // The workers flush what the connections have ended with before they stop.
    await this.tlsWorkers?.close();
    await Promise.all(closing);
    for (const owned of this.#unixPaths) owned.release();
  }
}
