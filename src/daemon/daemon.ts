/**
 * Wiring: configuration -> driver -> BlockNode -> graph -> NBD export and listener. The CLI builds a
 * ServeConfig and calls Daemon.start; shutdown drains the server, flushes and closes the nodes.
 */
import type { BlockDriver } from "../block/driver.js";
import { FileDriver } from "../block/drivers/file.js";
import { MemoryDriver } from "../block/drivers/memory.js";
import { NullDriver } from "../block/drivers/null.js";
import type { Logger } from "../core/log.js";
import { BlockGraph } from "../graph/block-graph.js";
import { BlockNode } from "../io/block-node.js";
import { NbdServer, type ListenAddress } from "../nbd/server/server.js";

export interface ServeConfig {
  /** A raw image file; "null-co://" for the null driver; undefined for the built-in memory disk. */
  readonly image?: string;
  /** Size of the built-in disk (memory or null driver). */
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly exportName: string;
  readonly nodeName: string;
  readonly description?: string;
  readonly listen: ListenAddress;
  readonly log: Logger;
  /** Force threadpool I/O in the file driver (benchmarks compare both). */
  readonly asyncIo?: boolean;
}

export const NULL_IMAGE = "null-co://";

function openDriver(config: ServeConfig): BlockDriver {
  if (config.image === undefined) return new MemoryDriver(config.sizeBytes);
  if (config.image === NULL_IMAGE) return new NullDriver(config.sizeBytes);
  return FileDriver.open(config.image, { readOnly: config.readOnly, asyncOnly: config.asyncIo });
}

/** The URI a client connects to. */
export function nbdUri(address: ListenAddress, exportName: string): string {
  const name = encodeURIComponent(exportName);
  if (address.type === "unix") return `nbd+unix:///${name}?socket=${address.path}`;
  const host = address.host.includes(":") ? `[${address.host}]` : address.host;
  return `nbd://${host}:${address.port}/${name}`;
}

export class Daemon {
  readonly graph: BlockGraph;
  readonly nbd: NbdServer;
  readonly node: BlockNode;
  readonly address: ListenAddress;
  readonly uri: string;
  #closing: Promise<void> | null = null;

  private constructor(
    graph: BlockGraph,
    nbd: NbdServer,
    node: BlockNode,
    address: ListenAddress,
    uri: string,
  ) {
    this.graph = graph;
    this.nbd = nbd;
    this.node = node;
    this.address = address;
    this.uri = uri;
  }

  static async start(config: ServeConfig): Promise<Daemon> {
    const driver = openDriver(config);
    const node = new BlockNode(config.nodeName, driver, { readOnly: config.readOnly });
    const graph = new BlockGraph();
    graph.addNode(node);
    const nbd = new NbdServer(config.log.child({ part: "nbd" }));
    nbd.addExport({
      name: config.exportName,
      description: config.description ?? `drivetap ${driver.driverName} disk`,
      node,
      readOnly: config.readOnly,
    });
    try {
      const address = await nbd.listen(config.listen);
      config.log.info({ node: node.name, driver: driver.driverName, size: driver.size() }, "serving");
      return new Daemon(graph, nbd, node, address, nbdUri(address, config.exportName));
    } catch (err) {
      await graph.closeAll();
      throw err;
    }
  }

  /** Finishes in-flight requests, flushes, closes. Safe to call twice. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      await this.nbd.close();
      await this.graph.closeAll();
    })();
    return this.#closing;
  }
}
