/**
 * The NBD server: listens on a unix socket or TCP, holds the exports, and owns the connections. It
 * bounds the number of connections and shuts down cleanly (in-flight requests finish first).
 */
import * as net from "node:net";
import type { Logger } from "../../core/log.js";
import { listenUnix, type OwnedSocket } from "../../core/unix-socket.js";
import { NbdConnection, type ExportDirectory, type NbdExport } from "./connection.js";
import { CONNECTIONS_MAX } from "./limits.js";
import { startReading } from "./socket-reader.js";

export type ListenAddress =
  | { readonly type: "unix"; readonly path: string }
  | { readonly type: "inet"; readonly host: string; readonly port: number };

export class NbdServer implements ExportDirectory {
  readonly #exports = new Map<string, NbdExport>();
  readonly #connections = new Set<NbdConnection>();
  readonly #servers: net.Server[] = [];
  readonly #log: Logger;
  readonly #unixPaths: OwnedSocket[] = [];
  #nextConnectionId = 1;

  constructor(log: Logger) {
    this.#log = log;
  }

  addExport(e: NbdExport): void {
    if (this.#exports.has(e.name)) throw new Error(`export "${e.name}" already exists`);
    this.#exports.set(e.name, e);
  }

  removeExport(name: string): boolean {
    return this.#exports.delete(name);
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
    if (this.#connections.size >= CONNECTIONS_MAX) {
      this.#log.warn({ max: CONNECTIONS_MAX }, "connection refused: too many connections");
      accepted.destroy();
      return;
    }
    const id = this.#nextConnectionId++;
    const log = this.#log.child({ conn: id });
    log.debug({}, "connected");
    let connection: NbdConnection | null = null;
    const socket = startReading(accepted, (chunk) => connection!.onData(chunk));
    connection = new NbdConnection(id, socket, this, log, (closed) => {
      this.#connections.delete(closed);
      log.debug({}, "disconnected");
    });
    this.#connections.add(connection);
  }

  /** Stops accepting, lets every connection finish its in-flight requests, then closes them. */
  async close(): Promise<void> {
    const closing = this.#servers.map((s) => new Promise<void>((resolve) => s.close(() => resolve())));
    await Promise.all([...this.#connections].map((c) => c.shutdown()));
    await Promise.all(closing);
    for (const owned of this.#unixPaths) owned.release();
  }
}
