/**
 * Tap commands: a live feed of a node's writes (io/write-tap.ts) served as JSON lines on a unix socket.
 * - x-tap-add {"node-name", "path", "ring-records"?}: listens on PATH (mode 0600); every reader that
 *   connects gets one line per write, write-zeroes, discard and flush the node completes from then on,
 *   and {"dropped":N} where its ring overflowed.
 * - x-tap-remove {"path"}: stops the tap, disconnects its readers and removes the socket.
 * - query-x-taps: each tap's node, path, records so far, and per reader: sent, queued, dropped, and the
 *   bytes buffered in its socket (what a stalled reader costs the daemon).
 * QMP owns the listening sockets, as it owns its own; the tap itself knows only the node.
 */
import * as fs from "node:fs";
import * as net from "node:net";
import type { BlockGraph } from "../../graph/block-graph.js";
import {
  TAP_READERS_MAX,
  TAP_RING_RECORDS_DEFAULT,
  TAP_RING_RECORDS_MAX,
  WriteTap,
} from "../../io/write-tap.js";
import { QmpError } from "../errors.js";
import { defineCommand, type QmpCommandDef } from "../server.js";
import { requireNode } from "./block.js";

/** Taps one daemon serves at once. */
export const TAPS_MAX = 64;

interface ServedTap {
  readonly tap: WriteTap;
  readonly server: net.Server;
  readonly sockets: Set<net.Socket>;
  readonly path: string;
  readonly user: string;
}

function listen(server: net.Server, path: string): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    server.listen(path, () => {
      server.off("error", reject);
      resolve();
    });
  });
}

async function removeTap(graph: BlockGraph, taps: Map<string, ServedTap>, t: ServedTap): Promise<void> {
  taps.delete(t.path);
  t.tap.close();
  graph.release(t.tap.node.name, t.user);
  for (const s of t.sockets) s.destroy();
  await new Promise<void>((resolve) => t.server.close(() => resolve()));
  fs.rmSync(t.path, { force: true });
}

export function tapCommands(graph: BlockGraph): QmpCommandDef[] {
  const taps = new Map<string, ServedTap>();
  return [
    defineCommand({
      name: "x-tap-add",
      args: {
        "node-name": { type: "str" },
        path: { type: "str" },
        "ring-records": { type: "int", min: 1, max: TAP_RING_RECORDS_MAX, optional: true },
      },
      handler: async (args) => {
        const node = requireNode(graph, args["node-name"]);
        if (taps.has(args.path))
          throw new QmpError("GenericError", `A tap already listens on '${args.path}'`);
        if (taps.size >= TAPS_MAX) throw new QmpError("GenericError", `At most ${TAPS_MAX} taps`);
        const user = `tap ${args.path}`;
        try {
          graph.claim(node.name, user, `write tap on ${args.path}`);
        } catch (err) {
          throw new QmpError("GenericError", (err as Error).message);
        }
        const sockets = new Set<net.Socket>();
        const tap = new WriteTap(node, args["ring-records"] ?? TAP_RING_RECORDS_DEFAULT);
        const server = net.createServer((socket) => {
          if (sockets.size >= TAP_READERS_MAX) {
            socket.destroy();
            return;
          }
          sockets.add(socket);
          const { remove } = tap.addReader(socket);
          socket.on("error", () => undefined);
          socket.on("close", () => {
            remove();
            sockets.delete(socket);
          });
          // Readers send nothing; whatever they do send is discarded.
          socket.resume();
        });
        try {
          await listen(server, args.path);
          fs.chmodSync(args.path, 0o600);
        } catch (err) {
          tap.close();
          server.close();
          graph.release(node.name, user);
          throw new QmpError("GenericError", `Cannot listen on '${args.path}': ${(err as Error).message}`);
        }
        taps.set(args.path, { tap, server, sockets, path: args.path, user });
        return {};
      },
    }),
    defineCommand({
      name: "x-tap-remove",
      args: { path: { type: "str" } },
      handler: async (args) => {
        const t = taps.get(args.path);
        if (!t) throw new QmpError("GenericError", `No tap listens on '${args.path}'`);
        await removeTap(graph, taps, t);
        return {};
      },
    }),
    defineCommand({
      name: "query-x-taps",
      args: {},
      handler: () =>
        [...taps.values()].map((t) => ({
          "node-name": t.tap.node.name,
          path: t.path,
          records: t.tap.seq,
          "ring-records": t.tap.ringRecords,
          readers: [...t.tap.readers()].map((r) => ({
            sent: r.sent,
            queued: r.queued,
            dropped: r.dropped,
            "buffered-bytes": r.sinkBufferedBytes,
          })),
        })),
    }),
  ];
}
