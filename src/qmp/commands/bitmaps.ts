/**
 * Dirty bitmap commands, with QEMU's names, arguments and error texts: block-dirty-bitmap-add,
 * -remove, -clear, -enable, -disable and -merge. Each is a prepare step (every check, and for a
 * persistent add its file) and a synchronous commit, so `transaction` can run them all-or-nothing and
 * start them at the same point as backup jobs.
 */
import { createHash } from "node:crypto";
import * as fs from "node:fs";
import { Qcow2Driver } from "../../block/drivers/qcow2/qcow2.js";
import type { BlockGraph } from "../../graph/block-graph.js";
import { BITMAP_NAME_BYTES_MAX, BitmapFile } from "../../io/bitmap-file.js";
import { DirtyBitmap } from "../../io/dirty-bitmap.js";
import { NamedBitmap, type BitmapStore, type NodeBitmaps } from "../../io/named-bitmaps.js";
import { Qcow2BitmapStore } from "../../io/qcow2-bitmap-store.js";
import { QmpError } from "../errors.js";
import { validateArgs, type ArgsSpec } from "../schema.js";
import { defineCommand, type QmpCommandDef } from "../server.js";
import { requireNode, requireSizedNode } from "./block.js";

export const DEFAULT_GRANULARITY_BYTES = 64 * 1024;
export const GRANULARITY_BYTES_MIN = 512;
export const GRANULARITY_BYTES_MAX = 2 ** 31;

/** A checked action: commit applies it (synchronously; the promise is for durability), abort undoes prepare. */
export interface PreparedAction {
  commit(): Promise<void> | void;
  abort(): Promise<void>;
}

const NO_ABORT = async (): Promise<void> => {};

const addArgs = {
  node: { type: "str" },
  name: { type: "str" },
  granularity: { type: "int", min: 0, max: 0xffffffff, ctype: "uint32_t", optional: true },
  persistent: { type: "bool", optional: true },
  disabled: { type: "bool", optional: true },
} as const satisfies ArgsSpec;

const nameArgs = {
  node: { type: "str" },
  name: { type: "str" },
} as const satisfies ArgsSpec;

const mergeArgs = {
  node: { type: "str" },
  target: { type: "str" },
  bitmaps: { type: "array", items: { type: "any" } },
} as const satisfies ArgsSpec;

export const BITMAP_ACTIONS = {
  "block-dirty-bitmap-add": addArgs,
  "block-dirty-bitmap-remove": nameArgs,
  "block-dirty-bitmap-clear": nameArgs,
  "block-dirty-bitmap-enable": nameArgs,
  "block-dirty-bitmap-disable": nameArgs,
  "block-dirty-bitmap-merge": mergeArgs,
} as const;

export type BitmapActionType = keyof typeof BITMAP_ACTIONS;

export function isBitmapAction(type: string): type is BitmapActionType {
  return Object.hasOwn(BITMAP_ACTIONS, type);
}

/** QEMU's block_dirty_bitmap_lookup. */
export function lookupBitmap(graph: BlockGraph, node: string, name: string): NamedBitmap {
  requireNode(graph, node);
  const bm = graph.bitmaps.find(node, name);
  if (!bm) throw new QmpError("GenericError", `Dirty bitmap '${name}' not found`);
  return bm;
}

/**
 * QEMU's bdrv_dirty_bitmap_check: busy, then inconsistent (a qcow2 bitmap a crash left in use), which
 * only removal accepts. Our bitmaps are never read-only.
 */
export function checkNotBusy(bm: NamedBitmap, o: { allowInconsistent?: boolean } = {}): void {
  if (bm.busy) {
    throw new QmpError(
      "GenericError",
      `Bitmap '${bm.name}' is currently in use by another operation and cannot be used`,
    );
  }
  if (bm.inconsistent && o.allowInconsistent !== true) {
    throw new QmpError("GenericError", `Bitmap '${bm.name}' is inconsistent and cannot be used`);
  }
}

/** Where a persistent bitmap of this node is stored: its qcow2 image, or a sidecar of this file. */
function persistentImage(graph: BlockGraph, nodeName: string): string | Qcow2Driver {
  const driver = graph.getNode(nodeName)?.driver;
  if (driver instanceof Qcow2Driver) return driver;
  let info = graph.nodeInfo(nodeName);
  // A raw node over a child node (serve's raw over its file node) keeps the bitmaps of the child's
  // image: writes to it reach the child's driver, so they are the image's writes.
  while (info?.driver === "raw" && info.child !== undefined) info = graph.nodeInfo(info.child);
  const why = (reason: string): QmpError =>
    new QmpError("GenericError", `Can't store persistent bitmaps to ${nodeName}: ${reason}`);
  const filename = info?.filename;
  if (filename === undefined || (info?.driver !== "file" && info?.driver !== "raw") || info.child) {
    throw why("only a node opened on an image file can have persistent bitmaps");
  }
  let isFile = false;
  try {
    isFile = fs.statSync(filename).isFile();
  } catch {
    // Not there: reported below.
  }
  if (!isFile) throw why(`'${filename}' is not a regular file`);
  const owner = graph.bitmaps.imageOwner(filename, nodeName);
  if (owner) throw why(`node '${owner}' holds the persistent bitmaps of '${filename}'`);
  return filename;
}

function prepareAdd(graph: BlockGraph, a: Record<string, unknown>): PreparedAction {
  const nodeName = a.node as string;
  const name = a.name as string;
  if (name === "") throw new QmpError("GenericError", "Bitmap name cannot be empty");
  const node = requireNode(graph, nodeName);
  // A bitmap takes the node's size now; an unsized journal has none yet.
  requireSizedNode(graph, nodeName);
  const granularity = (a.granularity as number | undefined) ?? DEFAULT_GRANULARITY_BYTES;
  if (granularity < GRANULARITY_BYTES_MIN || (granularity & (granularity - 1)) !== 0) {
    throw new QmpError("GenericError", "Granularity must be power of 2 and at least 512");
  }
  if (granularity > GRANULARITY_BYTES_MAX) {
    throw new QmpError("GenericError", `Granularity must be at most ${GRANULARITY_BYTES_MAX}`);
  }
  if (Buffer.byteLength(name, "utf8") > BITMAP_NAME_BYTES_MAX) {
    throw new QmpError("GenericError", `Bitmap name too long: ${name}`);
  }
  if (graph.bitmaps.find(nodeName, name))
    throw new QmpError("GenericError", `Bitmap already exists: ${name}`);
  const persistent = a.persistent === true;
  const enabled = a.disabled !== true;
  const where = persistent ? persistentImage(graph, nodeName) : undefined;
  const image = typeof where === "string" ? where : graph.nodeInfo(nodeName)?.filename;
  if (where instanceof Qcow2Driver) {
    try {
      where.bitmaps.checkCanStore(name, granularity);
    } catch (err) {
      throw new QmpError(
        "GenericError",
        `Can't make bitmap '${name}' persistent in '${nodeName}': ${(err as Error).message}`,
      );
    }
  }
  const bits = new DirtyBitmap(node.size(), granularity);
  let file: BitmapStore | null = null;
  if (where instanceof Qcow2Driver) {
    // Stored in the image at its close, as QEMU does; nothing is written now.
    file = new Qcow2BitmapStore(where.bitmaps, name, bits, enabled, false);
  } else if (where !== undefined) {
    try {
      file = BitmapFile.create(
        where,
        { name, granularity, sizeBytes: node.size(), recording: enabled },
        bits,
      );
    } catch (err) {
      throw new QmpError(
        "GenericError",
        `Can't store persistent bitmaps to ${nodeName}: ${(err as Error).message}`,
      );
    }
  }
  const nb: NodeBitmaps = graph.bitmaps.forNode(node, image);
  const bm = new NamedBitmap(name, bits, file, enabled);
  // Registered now (later actions of a transaction may name it), recording from commit on.
  bm.live = false;
  nb.add(bm);
  return {
    commit: () => {
      bm.live = true;
      if (bm.recording) nb.markInFlight(bm);
    },
    abort: async () => {
      nb.delete(bm);
      await file?.remove();
    },
  };
}

function prepareRemove(graph: BlockGraph, a: Record<string, unknown>): PreparedAction {
  const bm = lookupBitmap(graph, a.node as string, a.name as string);
  checkNotBusy(bm, { allowInconsistent: true });
  return {
    commit: async () => {
      graph.bitmaps.of(a.node as string)?.delete(bm);
      try {
        await bm.store?.remove();
      } catch (err) {
        throw new QmpError("GenericError", `Failed to remove bitmap '${bm.name}': ${(err as Error).message}`);
      }
    },
    abort: NO_ABORT,
  };
}

function prepareClear(graph: BlockGraph, a: Record<string, unknown>): PreparedAction {
  const nodeName = a.node as string;
  const bm = lookupBitmap(graph, nodeName, a.name as string);
  checkNotBusy(bm);
  return {
    commit: () => {
      bm.bits.clearAll();
      // Writes past the hook already keep their marks.
      if (bm.recording) graph.bitmaps.of(nodeName)?.markInFlight(bm);
      return bm.changed(0, bm.bits.clusterCount);
    },
    abort: NO_ABORT,
  };
}

function prepareEnable(graph: BlockGraph, a: Record<string, unknown>, enabled: boolean): PreparedAction {
  const bm = lookupBitmap(graph, a.node as string, a.name as string);
  checkNotBusy(bm);
  return { commit: () => bm.setEnabled(enabled), abort: NO_ABORT };
}

function prepareMerge(graph: BlockGraph, a: Record<string, unknown>): PreparedAction {
  const nodeName = a.node as string;
  const target = lookupBitmap(graph, nodeName, a.target as string);
  checkNotBusy(target);
  const sources: NamedBitmap[] = [];
  (a.bitmaps as unknown[]).forEach((src, i) => {
    let bm: NamedBitmap | undefined;
    if (typeof src === "string") {
      bm = graph.bitmaps.find(nodeName, src);
      if (!bm) throw new QmpError("GenericError", `Dirty bitmap '${src}' not found`);
    } else {
      const ext = validateArgs(nameArgs, src, `bitmaps[${i}]`);
      bm = lookupBitmap(graph, ext.node as string, ext.name as string);
    }
    if (bm.inconsistent) {
      throw new QmpError("GenericError", `Bitmap '${bm.name}' is inconsistent and cannot be used`);
    }
    if (bm.bits.sizeBytes !== target.bits.sizeBytes) {
      throw new QmpError(
        "GenericError",
        `Bitmaps are of different sizes (destination size is ${target.bits.sizeBytes}, source size is ${bm.bits.sizeBytes}) and can't be merged`,
      );
    }
    sources.push(bm);
  });
  return {
    commit: () => {
      let added = 0;
      for (const s of sources) added += target.bits.merge(s.bits);
      return added > 0 ? target.changed(0, target.bits.clusterCount) : undefined;
    },
    abort: NO_ABORT,
  };
}

/** Checks and prepares one bitmap action (arguments already validated against its schema). */
export function prepareBitmapAction(
  graph: BlockGraph,
  type: BitmapActionType,
  a: Record<string, unknown>,
): PreparedAction {
  switch (type) {
    case "block-dirty-bitmap-add":
      return prepareAdd(graph, a);
    case "block-dirty-bitmap-remove":
      return prepareRemove(graph, a);
    case "block-dirty-bitmap-clear":
      return prepareClear(graph, a);
    case "block-dirty-bitmap-enable":
      return prepareEnable(graph, a, true);
    case "block-dirty-bitmap-disable":
      return prepareEnable(graph, a, false);
    case "block-dirty-bitmap-merge":
      return prepareMerge(graph, a);
  }
}

/** The dirty-bitmaps member of a node's query-named-block-nodes entry (absent when it has none). */
export function dirtyBitmapsInfo(graph: BlockGraph, nodeName: string): Record<string, unknown> {
  const list = graph.bitmaps.of(nodeName)?.list() ?? [];
  return list.length > 0 ? { "dirty-bitmaps": list.map((b) => b.info()) } : {};
}

/**
 * QEMU's x-debug-block-dirty-bitmap-sha256: SHA-256 of the bits as QEMU lays them out (bit c is bit
 * c&7 of byte c>>3, padded with zeros to whole 64-bit words), so two servers' bitmaps can be compared.
 */
export function bitmapSha256(bits: DirtyBitmap): string {
  const padded = Buffer.alloc(Math.ceil(bits.bytes.length / 8) * 8);
  padded.set(bits.bytes);
  return createHash("sha256").update(padded).digest("hex");
}

export function bitmapCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    ...(Object.keys(BITMAP_ACTIONS) as BitmapActionType[]).map((type) =>
      defineCommand({
        name: type,
        args: BITMAP_ACTIONS[type] as ArgsSpec,
        handler: async (a) => {
          await prepareBitmapAction(graph, type, a).commit();
          return {};
        },
      }),
    ),
    defineCommand({
      name: "x-debug-block-dirty-bitmap-sha256",
      args: nameArgs,
      returns: { type: "object", fields: { sha256: { type: "str" } } },
      handler: async (a) => ({ sha256: bitmapSha256(lookupBitmap(graph, a.node, a.name).bits) }),
    }),
  ];
}
