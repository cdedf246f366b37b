/** block_resize (QEMU 7.2's name; it has no block-resize): `device` or `node-name`, and `size`. */
import { BlockError } from "../../core/errors.js";
import { GraphError, type BlockGraph } from "../../graph/block-graph.js";
import { resizeNode } from "../../graph/resize.js";
import { QmpError } from "../errors.js";
import { defineCommand, type QmpCommandDef } from "../server.js";

export function resizeCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "block_resize",
      args: {
        device: { type: "str", optional: true },
        "node-name": { type: "str", optional: true },
        size: { type: "int" },
      },
      handler: async (a) => {
        // QEMU looks the device up first, then the node name. drivetap's devices are its top nodes,
        // which have node names, so both name a node.
        const node =
          (a.device !== undefined ? graph.getNode(a.device) : undefined) ??
          (a["node-name"] !== undefined ? graph.getNode(a["node-name"]) : undefined);
        if (!node) {
          throw new QmpError(
            "GenericError",
            `Cannot find device='${a.device ?? ""}' nor node-name='${a["node-name"] ?? ""}'`,
          );
        }
        if (a.size < 0) throw new QmpError("GenericError", "Parameter 'size' expects a >0 size");
        try {
          await resizeNode(graph, node, a.size);
        } catch (err) {
          if (err instanceof GraphError || err instanceof BlockError)
            throw new QmpError("GenericError", err.message);
          throw err;
        }
        return {};
      },
    }),
  ];
}
