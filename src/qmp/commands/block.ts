/** Node commands: blockdev-add, blockdev-del, query-named-block-nodes, query-block, x-error-inject. */
import { FileDriver } from "../../block/drivers/file.js";
import { ErrorInjectDriver } from "../../block/filters/error-inject.js";
import type { BlockGraph } from "../../graph/block-graph.js";
import { addNodeFromOptions, NodeOptionError } from "../../graph/node-factory.js";
import type { BlockNode } from "../../io/block-node.js";
import { QmpError } from "../errors.js";
import { defineCommand, type QmpCommandDef } from "../server.js";
import { dirtyBitmapsInfo } from "./bitmaps.js";

export function requireNode(graph: BlockGraph, name: string): BlockNode {
  const node = graph.getNode(name);
  if (!node) throw new QmpError("GenericError", `Cannot find device='${name}' nor node-name='${name}'`);
  return node;
}

/** Refuses a node that has no size yet (a journal waiting for its stream job), as a GenericError. */
export function requireSizedNode(graph: BlockGraph, name: string): void {
  try {
    graph.requireSized(name);
  } catch (err) {
    throw new QmpError("GenericError", (err as Error).message);
  }
}

/** QEMU's BlockDeviceInfo, with what drivetap knows. */
export function blockDeviceInfo(graph: BlockGraph, node: BlockNode): Record<string, unknown> {
  const info = graph.nodeInfo(node.name);
  const filename = info?.filename ?? `${info?.driver ?? node.driver.driverName}://`;
  return {
    "node-name": node.name,
    drv: info?.driver ?? node.driver.driverName,
    file: filename,
    ro: node.readOnly,
    encrypted: false,
    detect_zeroes: "off",
    backing_file_depth: 0,
    write_threshold: 0,
    bps: 0,
    bps_rd: 0,
    bps_wr: 0,
    iops: 0,
    iops_rd: 0,
    iops_wr: 0,
    cache: { "no-flush": false, direct: false, writeback: true },
    image: {
      filename,
      format: info?.driver === "file" ? "file" : (info?.driver ?? "raw"),
      "virtual-size": node.size(),
    },
    ...(node.driver.link ? { "x-connected": node.driver.link.connected } : {}),
    // QEMU's BlockDeviceInfo has no aio member; drivetap says which engine a file node's I/O uses.
    ...(node.driver instanceof FileDriver ? { "x-io-engine": node.driver.ioEngine } : {}),
    ...dirtyBitmapsInfo(graph, node.name),
    "x-users": graph.usersOf(node.name),
    "x-stats": { ...node.stats },
  };
}

/** The drivers blockdev-add opens (BlockdevDriver, as far as drivetap has them). */
export const BLOCKDEV_DRIVERS = [
  "file",
  "raw",
  "memory",
  "null-co",
  "error-inject",
  "journal",
  "nbd",
  "throttle",
  "qcow2",
] as const;

/** blockdev-add's members (the command line's `--blockdev` is typed by them too). */
export const blockdevAddArgs = {
  driver: { type: "enum", values: BLOCKDEV_DRIVERS },
  "node-name": { type: "str" },
  filename: { type: "str", optional: true },
  file: { type: "any", optional: true },
  /** qcow2: a node name, inline options, or null (none); absent: the backing file its header names. */
  backing: { type: "any", optional: true },
  size: { type: "int", min: 0, optional: true },
  "read-only": { type: "bool", optional: true },
  "auto-read-only": { type: "bool", optional: true },
  /** file (and raw over an inline file): share every permission; read-only nodes only (QEMU's rule). */
  "force-share": { type: "bool", optional: true },
  discard: { type: "enum", values: ["ignore", "unmap"], optional: true },
  /**
   * file: QEMU's AIO backend, choosing the node's I/O engine (io-engine/index.ts, engineForAio):
   * io_uring the ring, threads a pool-backed engine, native (cache.direct=on only, as QEMU) the ring.
   */
  aio: { type: "enum", values: ["threads", "native", "io_uring"], optional: true },
  cache: { type: "any", optional: true },
  "detect-zeroes": { type: "enum", values: ["off", "on", "unmap"], optional: true },
  "read-zeroes": { type: "bool", optional: true },
  "fail-reads": { type: "bool", optional: true },
  "fail-writes": { type: "bool", optional: true },
  "fail-flush": { type: "bool", optional: true },
  /** journal: store each write's data (default) or only its SHA-256. */
  data: { type: "bool", optional: true },
  /** nbd: QEMU's SocketAddress ({type: unix, path} or {type: inet, host, port}), export name. */
  server: { type: "any", optional: true },
  export: { type: "str", optional: true },
  /** nbd: seconds a request waits for a lost connection to return (QEMU's name). */
  "reconnect-delay": { type: "number", optional: true },
  "open-timeout": { type: "number", optional: true },
  /** nbd: the id of a tls-creds-x509/-psk object (client endpoint); the connection runs STARTTLS. */
  "tls-creds": { type: "str", optional: true },
  /** nbd: the name the server's certificate must carry (default: the inet host; unix: not checked). */
  "tls-hostname": { type: "str", optional: true },
  /** nbd: seconds without a reply after which the link counts as dead (drivetap's). */
  "x-request-timeout": { type: "number", optional: true },
  /** throttle: the id of the throttle-group object whose limits the node shares. */
  "throttle-group": { type: "str", optional: true },
} as const;

/** The nodes query-block lists as devices: not internal (a job's target), not a parent's child. */
export function topLevelNodes(graph: BlockGraph): BlockNode[] {
  return graph
    .nodes()
    .filter((n) => !graph.isInternal(n.name) && !graph.usersOf(n.name).some((u) => u.startsWith("child of")));
}

export function blockCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "blockdev-add",
      args: blockdevAddArgs,
      handler: async (args) => {
        try {
          await addNodeFromOptions(graph, args as Record<string, unknown>);
        } catch (err) {
          if (err instanceof NodeOptionError) throw new QmpError("GenericError", err.message);
          throw err;
        }
        return {};
      },
    }),
    defineCommand({
      name: "blockdev-del",
      args: { "node-name": { type: "str" } },
      handler: async (args) => {
        const name = args["node-name"];
        if (!graph.getNode(name))
          throw new QmpError("GenericError", `Failed to find node with node-name='${name}'`);
        const users = graph.usersOf(name);
        if (users.length > 0)
          throw new QmpError("GenericError", `Node '${name}' is busy: ${users.join(", ")}`);
        await graph.removeNode(name);
        return {};
      },
    }),
    defineCommand({
      name: "query-named-block-nodes",
      args: { flat: { type: "bool", optional: true } },
      handler: () => graph.nodes().map((n) => blockDeviceInfo(graph, n)),
    }),
    defineCommand({
      name: "query-block",
      args: {},
      handler: () =>
        topLevelNodes(graph).map((n) => ({
          device: n.name,
          // Deprecated in QEMU but still required by 7.2's BlockInfo, which always says "unknown".
          type: "unknown",
          locked: false,
          removable: false,
          "io-status": "ok",
          inserted: blockDeviceInfo(graph, n),
        })),
    }),
    defineCommand({
      name: "x-error-inject",
      args: {
        "node-name": { type: "str" },
        "fail-reads": { type: "bool", optional: true },
        "fail-writes": { type: "bool", optional: true },
        "fail-flush": { type: "bool", optional: true },
        errno: { type: "enum", values: ["EIO", "ENOSPC", "EPERM"], optional: true },
      },
      handler: (args) => {
        const node = requireNode(graph, args["node-name"]);
        const driver = node.driver;
        if (!(driver instanceof ErrorInjectDriver)) {
          throw new QmpError("GenericError", `Node '${node.name}' is not an error-inject node`);
        }
        if (args["fail-reads"] !== undefined) driver.settings.failReads = args["fail-reads"];
        if (args["fail-writes"] !== undefined) driver.settings.failWrites = args["fail-writes"];
        if (args["fail-flush"] !== undefined) driver.settings.failFlush = args["fail-flush"];
        if (args.errno !== undefined) driver.settings.errno = args.errno;
        return { injected: driver.injected };
      },
    }),
  ];
}
