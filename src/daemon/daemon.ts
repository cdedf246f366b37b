/**
 * Wiring: configuration -> driver -> BlockNode -> graph -> NBD export and listener. The CLI builds a
 * ServeConfig and calls Daemon.start; shutdown drains the server, flushes and closes the nodes.
 */
import { readFileSync } from "node:fs";
import type { BlockDriver } from "../block/driver.js";
import { FileDriver } from "../block/drivers/file.js";
import { MemoryDriver } from "../block/drivers/memory.js";
import { NullDriver } from "../block/drivers/null.js";
import { probedBackingMessage, type ImageFormat } from "../block/drivers/qcow2/image.js";
import type { Logger } from "../core/log.js";
import { BlockGraph } from "../graph/block-graph.js";
import { addFormatOverNode } from "../graph/node-factory.js";
import { BlockNode } from "../io/block-node.js";
import { isIP } from "node:net";
import { NbdServer, type ListenAddress } from "../nbd/server/server.js";
import type { ServerTlsConfig } from "../nbd/server/tls-upgrade.js";
import { registerCommands } from "../qmp/commands/index.js";
import { QMP_EVENTS } from "../qmp/events.js";
import { defineCommand, QmpServer } from "../qmp/server.js";

/** drivetap's own version, from its package.json (dist/src/daemon/ is three levels below it). */
export const DRIVETAP_PACKAGE_VERSION = (
  JSON.parse(readFileSync(new URL("../../../package.json", import.meta.url), "utf8")) as { version: string }
).version;
/**
 * What the greeting and query-version report: the QEMU release whose QMP (commands, replies, events,
 * error texts) drivetap matches, so that clients that check the version pick the right dialect, and
 * drivetap itself in `package`, where QEMU names its build.
 */
export const DRIVETAP_VERSION = {
  major: 7,
  minor: 2,
  micro: 0,
  package: `drivetap ${DRIVETAP_PACKAGE_VERSION}`,
};
/** Id of the export `drivetap serve` creates for its disk. */
export const SERVE_EXPORT_ID = "export0";

export interface ServeConfig {
  /** An image file (raw or qcow2); "null-co://" for the null driver; undefined for the built-in memory disk. */
  readonly image?: string;
  /** The image's format; omitted: probed by its magic (a raw guess is warned about, as QEMU does). */
  readonly format?: ImageFormat;
  /** Size of the built-in disk (memory or null driver). */
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  /** QEMU's force-share for the image: let every other user in (read-only serving only). */
  readonly forceShare?: boolean;
  readonly exportName: string;
  readonly nodeName: string;
  readonly description?: string;
  readonly listen: ListenAddress;
  readonly log: Logger;
  /** Force threadpool I/O in the file driver (benchmarks compare both). */
  readonly asyncIo?: boolean;
  /** The NBD server's budget for request and reply buffers (limits.ts has the default). */
  readonly bufferMemoryBytes?: number;
  /** TLS for the NBD server (every export, those added over QMP too); omitted: TLS off. */
  readonly tls?: ServerTlsConfig;
  /** Unix socket path for the QMP control socket. */
  readonly qmpPath?: string;
  /** Called when a QMP client sends `quit` (the CLI stops the daemon as for SIGTERM). */
  readonly onQuit?: () => void;
}

export const NULL_IMAGE = "null-co://";

/**
 * The name of the `file` node under a served image's format node. QEMU names the nodes it makes
 * itself `#blockNNN`; this one is derived from the format node's name so it stays the same across
 * restarts and can be named in QMP, and the `#` keeps it out of NODE_NAME_PATTERN, so no user node
 * takes it.
 */
export function imageFileNodeName(nodeName: string): string {
  return `#block-${nodeName}-file`;
}

/** The built-in disk's driver, or the image's file driver (its format is opened over it). */
function openDriver(config: ServeConfig): BlockDriver {
  if (config.image === undefined) return new MemoryDriver(config.sizeBytes);
  if (config.image === NULL_IMAGE) return new NullDriver(config.sizeBytes);
  // Takes the image locks: an image another drivetap, qemu-nbd or QEMU uses in a conflicting way is
  // refused here, before any socket is touched.
  return FileDriver.open(config.image, {
    readOnly: config.readOnly,
    asyncOnly: config.asyncIo,
    forceShare: config.forceShare,
  });
}

/** The URI a client connects to (`nbds` when the server offers TLS). */
export function nbdUri(address: ListenAddress, exportName: string, tls = false): string {
  const name = encodeURIComponent(exportName);
  const scheme = tls ? "nbds" : "nbd";
  if (address.type === "unix") return `${scheme}+unix:///${name}?socket=${address.path}`;
  const host = address.host.includes(":") ? `[${address.host}]` : address.host;
  return `${scheme}://${host}:${address.port}/${name}`;
}

/** Loopback addresses and names: a listener there is reachable from this host only. */
export function isLoopback(host: string): boolean {
  if (host === "localhost") return true;
  if (isIP(host) === 4) return host.startsWith("127.");
  const h = host.toLowerCase();
  return h === "::1" || h.startsWith("::ffff:127.");
}

/**
 * A QMP monitor over the graph on a unix socket: every command, `quit` (which calls onQuit after
 * answering), and the graph's events. Several monitors may serve one graph; each gets every event.
 */
export async function openMonitor(
  graph: BlockGraph,
  path: string,
  log: Logger,
  onQuit?: () => void,
): Promise<QmpServer> {
  const qmp = new QmpServer({
    log: log.child({ part: "qmp" }),
    version: DRIVETAP_VERSION,
    events: QMP_EVENTS,
  });
  registerCommands(qmp, graph);
  qmp.register(
    defineCommand({
      name: "quit",
      args: {},
      // Answer first, then stop as for SIGTERM (in-flight requests finish, jobs end, flush).
      handler: () => {
        if (onQuit) setImmediate(onQuit);
        return {};
      },
    }),
  );
  const unsubscribe = graph.events.on((event, data) => qmp.emitEvent(event, data));
  try {
    await qmp.listen(path);
  } catch (err) {
    unsubscribe();
    throw err;
  }
  return qmp;
}

export class Daemon {
  readonly graph: BlockGraph;
  /** The NBD server `serve` started (QMP's nbd-server-stop can stop it; see graph.nbd). */
  readonly nbd: NbdServer;
  readonly qmp: QmpServer | null;
  /** The served node: the raw node over `file` for an image, else the built-in disk's own node. */
  readonly node: BlockNode;
  /** The image's `file` node under `node` (null for the built-in disks). */
  readonly file: BlockNode | null;
  readonly address: ListenAddress;
  readonly uri: string;
  #closing: Promise<void> | null = null;

  private constructor(
    graph: BlockGraph,
    nbd: NbdServer,
    qmp: QmpServer | null,
    node: BlockNode,
    file: BlockNode | null,
    address: ListenAddress,
    uri: string,
  ) {
    this.file = file;
    this.graph = graph;
    this.nbd = nbd;
    this.qmp = qmp;
    this.node = node;
    this.address = address;
    this.uri = uri;
  }

  static async start(config: ServeConfig): Promise<Daemon> {
    const driver = openDriver(config);
    const graph = new BlockGraph(config.log.child({ part: "graph" }));
    let node: BlockNode;
    let file: BlockNode | null = null;
    if (driver instanceof FileDriver) {
      // QEMU's layout for an image: a `file` protocol node with a format node (raw or qcow2) over
      // it, which keeps the user's name (exports, jobs and bitmaps name it).
      file = new BlockNode(imageFileNodeName(config.nodeName), driver, { readOnly: config.readOnly });
      graph.addNode(file, { driver: "file", filename: config.image });
      const image = config.image!;
      try {
        node = await addFormatOverNode(
          graph,
          config.nodeName,
          file.name,
          config.readOnly,
          config.format,
          (path, format) => {
            if (path !== image) config.log.warn({ image: path, format }, probedBackingMessage(path, format));
            else if (format === "raw") {
              config.log.warn(
                { image: path },
                `Image format was not specified for '${path}' and probing guessed raw (use --format raw or qcow2)`,
              );
            }
          },
        );
      } catch (err) {
        await graph.closeAll();
        throw err;
      }
    } else {
      // The built-in disks are protocol nodes with no format on top, as QEMU's null-co is.
      node = new BlockNode(config.nodeName, driver, { readOnly: config.readOnly });
      graph.addNode(node, { driver: driver.driverName === "null" ? "null-co" : driver.driverName });
    }
    let qmp: QmpServer | null = null;
    try {
      const address = await graph.nbd.start({
        listen: config.listen,
        bufferMemoryBytes: config.bufferMemoryBytes,
        tls: config.tls,
      });
      const nbd = graph.nbd.server!;
      graph.addExport({
        id: SERVE_EXPORT_ID,
        nodeName: node.name,
        name: config.exportName,
        description: config.description ?? `drivetap ${driver.driverName} disk`,
        writable: !config.readOnly,
      });
      if (address.type === "inet" && !isLoopback(address.host) && nbd.tls?.required !== true) {
        config.log.warn(
          { host: address.host, port: address.port, tls: nbd.tls === null ? "off" : "on" },
          nbd.tls === null
            ? "serving TCP on a non-loopback address without TLS: anyone who can reach it can read and write the disk (--tls-creds or --tls-psk)"
            : "serving TCP on a non-loopback address with TLS optional (--tls on): plaintext clients can still read and write the disk",
        );
      }
      if (nbd.tls) config.log.info({ tls: nbd.tls.describe() }, "TLS");
      if (config.qmpPath) qmp = await openMonitor(graph, config.qmpPath, config.log, config.onQuit);
      config.log.info({ node: node.name, driver: driver.driverName, size: driver.size() }, "serving");
      const uri = nbdUri(address, config.exportName, nbd.tls !== null);
      return new Daemon(graph, nbd, qmp, node, file, address, uri);
    } catch (err) {
      await graph.closeAll();
      throw err;
    }
  }

  /**
   * Ends jobs, finishes in-flight requests, flushes, closes. The QMP socket closes last, so its
   * clients see every export's BLOCK_EXPORT_DELETED. Safe to call twice.
   */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      try {
        await this.graph.closeAll();
      } finally {
        await this.qmp?.close();
      }
    })();
    return this.#closing;
  }
}
