/**
 * The NBD server's commands with QEMU 7.2's arguments (qapi/block-export.json): nbd-server-start
 * (addr is a SocketAddressLegacy), nbd-server-stop (removes every export), and the legacy
 * nbd-server-add / nbd-server-remove, whose export id is the export name. `--nbd-server` on the
 * command line takes NbdServerOptions (addr a flat SocketAddress) and runs the same start.
 */
import { GraphError, type BlockGraph } from "../../graph/block-graph.js";
import type { ListenAddress } from "../../nbd/server/server.js";
import { QmpError } from "../errors.js";
import { validateArgs, type ArgsSpec } from "../schema.js";
import { defineCommand, type QmpCommandDef } from "../server.js";
import { addNbdExport, removeExport } from "./exports.js";

const UINT32_MAX = 0xffff_ffff;

/** SocketAddress's members for unix and inet (InetSocketAddress, UnixSocketAddress). */
const UNIX_ADDRESS = {
  path: { type: "str" },
  abstract: { type: "bool", optional: true },
  tight: { type: "bool", optional: true },
} as const satisfies ArgsSpec;

const INET_ADDRESS = {
  host: { type: "str" },
  port: { type: "str" },
  numeric: { type: "bool", optional: true },
  to: { type: "int", min: 0, max: 65535, optional: true },
  ipv4: { type: "bool", optional: true },
  ipv6: { type: "bool", optional: true },
  "keep-alive": { type: "bool", optional: true },
  mptcp: { type: "bool", optional: true },
} as const satisfies ArgsSpec;

/** The members of nbd-server-start besides addr (and of NbdServerOptions). */
const SERVER_OPTIONS = {
  "tls-creds": { type: "str", optional: true },
  "tls-authz": { type: "str", optional: true },
  "max-connections": { type: "int", min: 0, max: UINT32_MAX, ctype: "uint32_t", optional: true },
} as const satisfies ArgsSpec;

/** The flat SocketAddress of NbdServerOptions, typed per member for the command line's keyval. */
export const FLAT_SOCKET_ADDRESS = {
  type: { type: "enum", values: ["unix", "inet", "vsock", "fd"] },
  ...UNIX_ADDRESS,
  ...INET_ADDRESS,
  path: { type: "str", optional: true },
  host: { type: "str", optional: true },
  port: { type: "str", optional: true },
  cid: { type: "str", optional: true },
  str: { type: "str", optional: true },
} as const satisfies ArgsSpec;

/** `--nbd-server`'s schema (QEMU's NbdServerOptions). */
export const NBD_SERVER_OPTIONS = {
  addr: { type: "object", fields: FLAT_SOCKET_ADDRESS },
  ...SERVER_OPTIONS,
} as const satisfies ArgsSpec;

/**
 * A SocketAddress (flat: type and its members side by side) as a listen address. `where` prefixes
 * member names in messages ("addr." or "addr.data.").
 */
function listenAddress(type: string, members: Record<string, unknown>, where: string): ListenAddress {
  if (type === "unix") {
    const a = validateArgs(UNIX_ADDRESS, members, where.replace(/\.$/, ""));
    if (a.abstract === true) throw new QmpError("GenericError", "drivetap cannot listen on abstract sockets");
    return { type: "unix", path: a.path as string };
  }
  if (type === "inet") {
    const a = validateArgs(INET_ADDRESS, members, where.replace(/\.$/, ""));
    const port = a.port as string;
    if (!/^\d{1,5}$/.test(port) || Number(port) > 65535) {
      throw new QmpError("GenericError", `Parameter '${where}port' expects a port number, not '${port}'`);
    }
    if (a.to !== undefined) {
      throw new QmpError("GenericError", `drivetap does not listen on a port range ('${where}to')`);
    }
    return { type: "inet", host: a.host as string, port: Number(port) };
  }
  throw new QmpError("GenericError", `drivetap cannot listen on a socket address of type '${type}'`);
}

/** Starts the server with validated options; both the QMP command and `--nbd-server` come here. */
async function startServer(
  graph: BlockGraph,
  listen: ListenAddress,
  opts: { "tls-creds"?: string; "tls-authz"?: string; "max-connections"?: number },
): Promise<void> {
  try {
    await graph.nbd.start({
      listen,
      tlsCreds: opts["tls-creds"],
      tlsAuthz: opts["tls-authz"],
      maxConnections: opts["max-connections"],
    });
  } catch (err) {
    if (err instanceof GraphError) throw new QmpError("GenericError", err.message);
    throw err;
  }
}

/** `--nbd-server` (not a QMP command: QSD runs the same start with NbdServerOptions). */
export function nbdServerOptionsCommand(graph: BlockGraph): QmpCommandDef {
  return defineCommand({
    name: "nbd-server",
    args: NBD_SERVER_OPTIONS,
    handler: async (args) => {
      const { type, ...members } = args.addr;
      const flat = Object.fromEntries(Object.entries(members).filter(([, v]) => v !== undefined));
      await startServer(graph, listenAddress(type, flat, "addr."), args);
    },
  });
}

export function nbdServerCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "nbd-server-start",
      args: {
        // SocketAddressLegacy: {type, data: {...}}; data's members depend on type.
        addr: {
          type: "object",
          fields: { type: { type: "enum", values: ["unix", "inet", "vsock", "fd"] }, data: { type: "any" } },
        },
        ...SERVER_OPTIONS,
      },
      handler: async (args) => {
        const data = args.addr.data;
        if (typeof data !== "object" || data === null || Array.isArray(data)) {
          throw new QmpError("GenericError", "Invalid parameter type for 'addr.data', expected: object");
        }
        const listen = listenAddress(args.addr.type, data as Record<string, unknown>, "addr.data.");
        await startServer(graph, listen, args);
      },
    }),
    defineCommand({
      name: "nbd-server-stop",
      args: {},
      handler: async () => {
        try {
          await graph.nbd.stop();
        } catch (err) {
          if (err instanceof GraphError) throw new QmpError("GenericError", err.message);
          throw err;
        }
      },
    }),
    defineCommand({
      // Legacy (deprecated in QEMU for block-export-add): the export's id is its name.
      name: "nbd-server-add",
      args: {
        device: { type: "str" },
        name: { type: "str", optional: true },
        description: { type: "str", optional: true },
        writable: { type: "bool", optional: true },
        bitmap: { type: "str", optional: true },
      },
      handler: (args) => {
        const name = args.name ?? args.device;
        addNbdExport(graph, {
          id: name,
          nodeName: args.device,
          name,
          description: args.description,
          writable: args.writable,
          bitmaps: args.bitmap === undefined ? undefined : [args.bitmap],
        });
      },
    }),
    defineCommand({
      name: "nbd-server-remove",
      args: { name: { type: "str" }, mode: { type: "enum", values: ["safe", "hard"], optional: true } },
      handler: (args) => removeExport(graph, args.name, args.mode ?? "safe"),
    }),
  ];
}
