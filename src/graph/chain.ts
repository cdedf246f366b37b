/**
 * Backing chains as the graph sees them, and changing them: what block-stream, block-commit and
 * blockdev-snapshot act on. A chain is the layers from a node down through each qcow2 backing. A layer
 * is a graph node (blockdev-add'ed, named `backing` of its parent) or a node-less driver that the
 * layer above opened from its header and owns.
 *
 * The replacement rule, QEMU's bdrv_replace_node for what drivetap has: the users of a node that move
 * to its replacement are its exports (open connections switch on their next request). Jobs and parent
 * nodes (raw over it, qcow2 overlays) do not move: a node they use is refused before anything changes.
 * A relink (a layer's backing changed) runs with the chain's root drained, because reads of the root
 * reach every layer's driver directly, not through the layers' nodes.
 */
import type { BlockDriver } from "../block/driver.js";
import { FileDriver, fileIdAt } from "../block/drivers/file.js";
import type { BackingName } from "../block/drivers/qcow2/backing-header.js";
import { BACKING_CHAIN_DEPTH_MAX } from "../block/drivers/qcow2/image.js";
import { Qcow2Driver } from "../block/drivers/qcow2/qcow2.js";
import { FilterDriver } from "../block/filters/filter.js";
import type { BlockNode } from "../io/block-node.js";
import { GraphError, type BlockGraph } from "./block-graph.js";

export interface ChainLayer {
  readonly driver: BlockDriver;
  /** The graph node whose driver this is; undefined for a layer opened from its parent's header. */
  readonly nodeName: string | undefined;
  /** The image file, for `base`/`top` file names and the backing name written into headers. */
  readonly filename: string | undefined;
  readonly format: "raw" | "qcow2";
}

/** The file a driver stack reads, if it is one image file. */
function driverFilename(d: BlockDriver): string | undefined {
  if (d instanceof FileDriver) return d.path;
  if (d instanceof Qcow2Driver) return driverFilename(d.file);
  if (d instanceof FilterDriver) return driverFilename(d.next);
  return undefined;
}

function layerOf(driver: BlockDriver, nodeName: string | undefined): ChainLayer {
  return {
    driver,
    nodeName,
    // The driver's own file, not info.filename: an nbd node's "filename" is a URI no header may name.
    filename: driverFilename(driver),
    format: driver instanceof Qcow2Driver ? "qcow2" : "raw",
  };
}

/** The chain of node `name`: the node itself first, then each backing down to the bottom. */
export function backingChain(graph: BlockGraph, name: string): ChainLayer[] {
  const node = graph.getNode(name);
  if (!node) throw new GraphError(`Cannot find node-name='${name}'`);
  const out = [layerOf(node.driver, name)];
  let d = node.driver;
  // The depth bound holds for every chain opened (image.ts), so this ends even on a bug.
  while (d instanceof Qcow2Driver && d.backing !== null && out.length <= BACKING_CHAIN_DEPTH_MAX + 1) {
    const below: BlockDriver = d.backing;
    out.push(layerOf(below, graph.nodes().find((n) => n.driver === below)?.name));
    d = below;
  }
  return out;
}

/** The index of the layer whose image is the file `filename` names (by device and inode), or -1. */
export function findFileInChain(chain: readonly ChainLayer[], filename: string): number {
  const id = fileIdAt(filename);
  if (id === undefined) return -1;
  return chain.findIndex((l) => l.filename !== undefined && fileIdAt(l.filename) === id);
}

/** What a header names for `layer` as its backing: its file and format (undefined: it has no file). */
export function backingNameOf(layer: ChainLayer, backingFile?: string): BackingName | undefined {
  const file = backingFile ?? layer.filename;
  return file === undefined ? undefined : { file, format: layer.format };
}

/**
 * Makes chain[baseIndex] (or nothing, for null) the backing of chain[aboveIndex], a writable qcow2
 * layer, and drops the layers between: with the root drained, the driver's backing and header change
 * (`name`: what the header names), the graph records the new backing node, and node-less dropped
 * layers are closed once their own backing is detached, so the base stays open.
 */
export async function relinkBacking(
  graph: BlockGraph,
  root: BlockNode,
  chain: readonly ChainLayer[],
  aboveIndex: number,
  baseIndex: number | null,
  name: BackingName | null,
): Promise<void> {
  const above = chain[aboveIndex].driver;
  if (!(above instanceof Qcow2Driver)) throw new GraphError("only a qcow2 image has a backing image");
  const base = baseIndex === null ? null : chain[baseIndex];
  const dropped = chain.slice(aboveIndex + 1, baseIndex ?? chain.length);
  const aboveNode = chain[aboveIndex].nodeName;
  await root.drained(async () => {
    // A node-less base was owned by the layer above it, which is dropped: `above` owns it now.
    await above.changeBacking(base?.driver ?? null, {
      owns: base !== null && base.nodeName === undefined,
      name,
    });
    if (aboveNode !== undefined) graph.setBackingNode(aboveNode, base?.nodeName);
    for (const layer of dropped) {
      if (layer.nodeName !== undefined) continue; // a node of its own: it stays in the graph, as in QEMU
      if (layer.driver instanceof Qcow2Driver) await layer.driver.changeBacking(null, { owns: false });
      await layer.driver.close();
    }
  });
}

/**
 * blockdev-snapshot's move: `overlay` (a qcow2 node without backing) gets `node` as its backing and
 * takes over its exports. The overlay is drained while it happens; requests the exports had already
 * sent to `node` end first (they belong before the snapshot), then `node` is flushed, and only then
 * do requests reach the overlay. So `node` does not change after the snapshot.
 */
export async function snapshotOnto(
  graph: BlockGraph,
  node: BlockNode,
  overlay: BlockNode,
  name: BackingName | undefined,
): Promise<void> {
  const driver = overlay.driver;
  if (!(driver instanceof Qcow2Driver)) throw new GraphError("The overlay does not support backing images");
  await overlay.drained(async () => {
    await driver.changeBacking(node.driver, { owns: false, name });
    graph.setBackingNode(overlay.name, node.name);
    graph.pivotExports(node.name, overlay.name);
    await node.drain();
    if (!node.readOnly) await node.flush();
  });
}
