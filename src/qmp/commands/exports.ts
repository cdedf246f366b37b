/** NBD export commands: block-export-add, block-export-del, query-block-exports. */
import { GraphError, type BlockGraph } from "../../graph/block-graph.js";
import type { NamedBitmap } from "../../io/named-bitmaps.js";
import { QmpError } from "../errors.js";
import { validateArgs, type ArgsSpec } from "../schema.js";
import { defineCommand, type QmpCommandDef } from "../server.js";
import { checkNotBusy, lookupBitmap } from "./bitmaps.js";
import { requireNode } from "./block.js";

/** block-export-add's members (the command line's `--export` is typed by them too). */
export const blockExportAddArgs = {
  type: { type: "enum", values: ["nbd"] },
  id: { type: "str" },
  "node-name": { type: "str" },
  name: { type: "str", optional: true },
  description: { type: "str", optional: true },
  writable: { type: "bool", optional: true },
  writethrough: { type: "bool", optional: true },
  "fixed-iothread": { type: "bool", optional: true },
  iothread: { type: "str", optional: true },
  /** Names of the node's bitmaps, or {node, name} (QEMU's BlockDirtyBitmapOrStr). */
  bitmaps: { type: "array", items: { type: "any" }, optional: true },
  "allocation-depth": { type: "bool", optional: true },
} as const satisfies ArgsSpec;

/** What block-export-add (and the legacy nbd-server-add) asks for. */
export interface NbdExportRequest {
  readonly id: string;
  readonly nodeName: string;
  readonly name?: string;
  readonly description?: string;
  readonly writable?: boolean;
  /** Names of the node's bitmaps, or {node, name} (QEMU's BlockDirtyBitmapOrStr). */
  readonly bitmaps?: readonly unknown[];
}

/** Adds an NBD export with QEMU's checks and texts; the server must be running. */
export function addNbdExport(graph: BlockGraph, req: NbdExportRequest): void {
  const node = requireNode(graph, req.nodeName);
  if (!graph.nbdServer) throw new QmpError("GenericError", "NBD server not running");
  if (req.writable && node.readOnly) {
    throw new QmpError("GenericError", `Node '${node.name}' is read-only, cannot export writable`);
  }
  const bitmaps: NamedBitmap[] = [];
  (req.bitmaps ?? []).forEach((b, i) => {
    let bm: NamedBitmap | undefined;
    if (typeof b === "string") {
      bm = graph.bitmaps.find(node.name, b);
      if (!bm) throw new QmpError("GenericError", `Bitmap '${b}' is not found`);
    } else {
      const ref = validateArgs({ node: { type: "str" }, name: { type: "str" } }, b, `bitmaps[${i}]`);
      bm = lookupBitmap(graph, ref.node as string, ref.name as string);
      if (bm.bits.sizeBytes !== node.size()) {
        throw new QmpError("GenericError", `Bitmap '${bm.name}' does not cover node '${node.name}'`);
      }
    }
    checkNotBusy(bm);
    if (req.writable && bm.enabled) {
      throw new QmpError("GenericError", `Enabled bitmap '${bm.name}' incompatible with writable export`);
    }
    if (bitmaps.includes(bm)) return;
    bitmaps.push(bm);
  });
  try {
    graph.addExport({
      id: req.id,
      nodeName: node.name,
      name: req.name ?? node.name,
      writable: req.writable ?? false,
      description: req.description ?? "",
      bitmaps,
    });
  } catch (err) {
    if (err instanceof GraphError) throw new QmpError("GenericError", err.message);
    throw err;
  }
}

/**
 * Starts removing an export (block-export-del, nbd-server-remove): the reply does not wait for its
 * clients to close, BLOCK_EXPORT_DELETED says when it is gone.
 */
export function removeExport(graph: BlockGraph, id: string, mode: "safe" | "hard"): void {
  try {
    void graph.removeExport(id, mode);
  } catch (err) {
    if (err instanceof GraphError) throw new QmpError("GenericError", err.message);
    throw err;
  }
}

export function exportCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "block-export-add",
      args: blockExportAddArgs,
      handler: (args) => {
        addNbdExport(graph, {
          id: args.id,
          nodeName: args["node-name"],
          name: args.name,
          description: args.description,
          writable: args.writable,
          bitmaps: args.bitmaps,
        });
        return {};
      },
    }),
    defineCommand({
      name: "block-export-del",
      args: { id: { type: "str" }, mode: { type: "enum", values: ["safe", "hard"], optional: true } },
      handler: (args) => {
        removeExport(graph, args.id, args.mode ?? "safe");
        return {};
      },
    }),
    defineCommand({
      // drivetap's own: each NBD connection with the requests it has received and not yet answered
      // (their final reply not yet taken by the socket), for telling a server stall from a client's.
      name: "x-query-nbd-connections",
      args: {},
      handler: () =>
        (graph.nbdServer?.connections() ?? []).map((c) => ({
          id: c.id,
          export: c.export,
          "age-ms": c.ageMs,
          "x-in-flight": c.inFlight.map((r) => ({
            command: r.command.toLowerCase(),
            offset: r.offset,
            length: r.length,
            "age-ms": r.ageMs,
          })),
          "x-unsent-bytes": c.unsentBytes,
          "x-tls": c.tls,
          "x-waiting": c.admission.waiting ?? "none",
          "x-held-buffer-bytes": c.admission.heldBytes,
          "x-reading-paused": c.admission.paused,
        })),
    }),
    defineCommand({
      name: "query-block-exports",
      args: {},
      handler: () =>
        graph.exports().map((e) => ({
          type: "nbd",
          id: e.id,
          "node-name": e.nodeName,
          "shutting-down": graph.exportShuttingDown(e.id),
        })),
    }),
  ];
}
