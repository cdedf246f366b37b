/**
 * The registry of block nodes that the daemon serves and that commands act on, by node name.
 * Later issues add exports and jobs here; QMP commands act on this graph, never on the daemon.
 */
import type { BlockNode } from "../io/block-node.js";

export class BlockGraph {
  readonly #nodes = new Map<string, BlockNode>();

  addNode(node: BlockNode): void {
    if (this.#nodes.has(node.name)) throw new Error(`duplicate node name "${node.name}"`);
    this.#nodes.set(node.name, node);
  }

  getNode(name: string): BlockNode | undefined {
    return this.#nodes.get(name);
  }

  nodes(): BlockNode[] {
    return [...this.#nodes.values()];
  }

  /** Flushes and closes every node (daemon shutdown). */
  async closeAll(): Promise<void> {
    for (const node of this.#nodes.values()) {
      if (!node.readOnly) await node.flush().catch(() => undefined);
      await node.close();
    }
    this.#nodes.clear();
  }
}
