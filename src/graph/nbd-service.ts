/**
 * The NBD server as a service of the graph: at most one runs at a time, started and stopped while
 * the daemon runs (QMP nbd-server-start / nbd-server-stop, `--nbd-server`, or `drivetap serve`
 * itself). Its TLS comes either from the caller (serve's flags) or from objects the graph holds
 * (`tls-creds`, `tls-authz`), which the running server claims so they cannot be deleted under it.
 * Stopping removes every export first, as QEMU does, so each one's BLOCK_EXPORT_DELETED is sent.
 */
import type { Logger } from "../core/log.js";
import { NbdServer, type ListenAddress } from "../nbd/server/server.js";
import type { ServerTlsConfig } from "../nbd/server/tls-upgrade.js";
import { GraphError, type BlockGraph } from "./block-graph.js";
import { ObjectError } from "./objects.js";

/** The user id under which the running server holds its TLS objects. */
const SERVER_USER = "nbd-server";

export interface NbdServiceOptions {
  readonly listen: ListenAddress;
  /** TLS configured directly (`drivetap serve --tls-*`); exclusive with tlsCreds. */
  readonly tls?: ServerTlsConfig;
  /** Id of a tls-creds-x509/-psk object with endpoint=server: TLS is then required. */
  readonly tlsCreds?: string;
  /** Id of an authz-simple/-list object that checks each TLS peer's identity. */
  readonly tlsAuthz?: string;
  /** QMP's max-connections (0: no limit beyond the server's own bounds). */
  readonly maxConnections?: number;
  /** The buffer budget (`--max-buffer-memory`). */
  readonly bufferMemoryBytes?: number;
}

export class NbdService {
  readonly #graph: BlockGraph;
  readonly #log: Logger;
  #server: NbdServer | null = null;
  #address: ListenAddress | null = null;
  /** Object ids the running server holds. */
  #held: string[] = [];
  /** Set while start or stop is under way, so a second one cannot interleave. */
  #busy = false;

  constructor(graph: BlockGraph, log: Logger) {
    this.#graph = graph;
    this.#log = log;
  }

  /** The running server, or null. */
  get server(): NbdServer | null {
    return this.#server;
  }

  /** Where the running server listens (the real port when 0 was asked), or null. */
  get address(): ListenAddress | null {
    return this.#address;
  }

  async start(options: NbdServiceOptions): Promise<ListenAddress> {
    if (this.#server !== null || this.#busy) throw new GraphError("NBD server already running");
    const tls = this.#tlsFromObjects(options) ?? options.tls;
    // Held from here, so an object-del while the listener binds cannot take them away.
    const held = [options.tlsCreds, options.tlsAuthz].filter((id): id is string => id !== undefined);
    for (const id of held) this.#graph.objects.claim(id, SERVER_USER, "the NBD server");
    this.#busy = true;
    try {
      // Builds the TLS context now: credentials that cannot be used fail the start, not a client.
      const server = new NbdServer(this.#log, {
        tls,
        bufferMemoryBytes: options.bufferMemoryBytes,
        maxConnections: options.maxConnections,
      });
      let address: ListenAddress;
      try {
        address = await server.listen(options.listen);
      } catch (err) {
        await server.close();
        throw err;
      }
      this.#held = held;
      this.#server = server;
      this.#address = address;
      return address;
    } catch (err) {
      for (const id of held) this.#graph.objects.release(id, SERVER_USER);
      throw err;
    } finally {
      this.#busy = false;
    }
  }

  /**
   * Removes every export (their connections finish in-flight requests and close), then closes the
   * listener and releases the TLS objects.
   */
  async stop(): Promise<void> {
    const server = this.#server;
    if (server === null || this.#busy) throw new GraphError("NBD server not running");
    this.#busy = true;
    try {
      await Promise.all(this.#graph.exports().map((e) => this.#graph.removeExport(e.id, "hard")));
      // Exports removed by an earlier block-export-del may still be closing their connections.
      await this.#graph.exportsSettled();
      await server.close();
    } finally {
      for (const id of this.#held) this.#graph.objects.release(id, SERVER_USER);
      this.#held = [];
      this.#server = null;
      this.#address = null;
      this.#busy = false;
    }
  }

  /** The TLS configuration QMP's tls-creds / tls-authz name, with QEMU's texts when they do not fit. */
  #tlsFromObjects(options: NbdServiceOptions): ServerTlsConfig | undefined {
    const { tlsCreds, tlsAuthz } = options;
    if (tlsCreds === undefined) {
      // QEMU accepts tls-authz without TLS and never checks anyone: refuse instead of pretending.
      if (tlsAuthz !== undefined)
        throw new GraphError("tls-authz needs tls-creds: without TLS no peer is checked");
      return undefined;
    }
    if (options.tls !== undefined) throw new GraphError("TLS given twice: both tls and tls-creds");
    try {
      const creds = this.#graph.objects.tlsCreds(tlsCreds, "server").creds;
      const authz = tlsAuthz === undefined ? null : this.#graph.objects.authz(tlsAuthz);
      // QEMU ignores tls-authz when an x509 object does not verify peers: nobody would be checked.
      if (authz !== null && creds.kind === "x509" && !creds.verifyPeer) {
        throw new GraphError(
          `tls-authz '${tlsAuthz}' needs client certificates: object '${tlsCreds}' has verify-peer=off`,
        );
      }
      // As in QEMU, a server with credentials requires TLS of every client.
      return { mode: "require", creds, authz };
    } catch (err) {
      if (err instanceof ObjectError) throw new GraphError(err.message);
      throw err;
    }
  }
}
