/**
 * block_resize on the graph: which nodes change size together, who may refuse it, and what follows
 * the new size. A node layered on a child node (raw over a node name) has its child's size, so the
 * whole chain of parents and children resizes at once. QEMU's permission rule decides who refuses:
 * a job on any of them holds the node without sharing "resize" (a backup or mirror must not have its
 * disk cut under it), while an NBD export shares it (QEMU 7.2's export does not; drivetap's new
 * connections just see the new size). Dirty bitmaps follow the new size, as QEMU's do.
 */
import { bitmapBytesFor, DIRTY_BITMAP_BYTES_MAX } from "../io/dirty-bitmap.js";
import type { BlockNode } from "../io/block-node.js";
import { GraphError, type BlockGraph } from "./block-graph.js";

/** The node and every node that shares its size: its children, its parents, theirs. */
function sizeChain(graph: BlockGraph, node: BlockNode): BlockNode[] {
  const chain = new Set<BlockNode>([node]);
  for (let changed = true; changed;) {
    changed = false;
    for (const other of graph.nodes()) {
      if (chain.has(other)) continue;
      const child = graph.nodeInfo(other.name)?.child;
      const isParent = child !== undefined && [...chain].some((n) => n.name === child);
      const isChild = [...chain].some((n) => graph.nodeInfo(n.name)?.child === other.name);
      if (isParent || isChild) {
        chain.add(other);
        changed = true;
      }
    }
  }
  return [...chain];
}

/** Checks that nothing refuses the resize; throws GraphError with the reason. */
function checkResizable(graph: BlockGraph, chain: readonly BlockNode[], sizeBytes: number): void {
  for (const n of chain) {
    const job = graph.jobUsesOf(n.name)[0];
    if (job !== undefined) {
      throw new GraphError(
        `Permission conflict on node '${n.name}': permissions 'resize' are both required by block_resize and unshared by ${job}`,
      );
    }
    // A range lock's owner (x-block-verify) reads the node while holding it: draining would wait on
    // writes queued behind the lock, and the owner's read on the drained section.
    if (n.rangeLockCount > 0) throw new GraphError(`Node '${n.name}' is busy: a range lock is held`);
    for (const bm of graph.bitmaps.of(n.name)?.list() ?? []) {
      if (bm.persistent) {
        throw new GraphError(
          `Cannot resize node '${n.name}': it has the persistent dirty bitmap '${bm.name}'`,
        );
      }
      const bytes = bitmapBytesFor(sizeBytes, bm.bits.granularity);
      if (bytes > DIRTY_BITMAP_BYTES_MAX) {
        throw new GraphError(
          `Cannot resize node '${n.name}': dirty bitmap '${bm.name}' would need ${bytes} bytes (at most ${DIRTY_BITMAP_BYTES_MAX})`,
        );
      }
    }
  }
}

export async function resizeNode(graph: BlockGraph, node: BlockNode, sizeBytes: number): Promise<void> {
  const chain = sizeChain(graph, node);
  checkResizable(graph, chain, sizeBytes);
  // The node resizes in its own drained section, inside those of the others that share its size.
  let work = (): Promise<void> => node.resize(sizeBytes);
  for (const other of chain) {
    if (other === node) continue;
    const inner = work;
    work = () => other.drained(inner);
  }
  await work();
  for (const n of chain) graph.bitmaps.of(n.name)?.resize(sizeBytes);
}
