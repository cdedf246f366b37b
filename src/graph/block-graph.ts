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

  /** Flushes and closes every node (daemon shutdown); throws the first flush error after closing all. */
  async closeAll(): Promise<void> {
    let firstError: unknown;
    for (const node of this.#nodes.values()) {
      try {
        if (!node.readOnly) await node.flush();
      } catch (err) {
        firstError ??= err;
      }
      await node.close();
    }
    this.#nodes.clear();
    // A failed final flush means data may not be durable: the daemon must not exit 0.
    if (firstError !== undefined) throw firstError;
  }
}
