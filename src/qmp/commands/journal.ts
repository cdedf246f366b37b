/** Journal commands: journal-mark adds a named point to a journal node (block/drivers/journal.ts). */
import { JournalDriver } from "../../block/drivers/journal.js";
import type { BlockGraph } from "../../graph/block-graph.js";
import { QmpError } from "../errors.js";
import { defineCommand, type QmpCommandDef } from "../server.js";
import { requireNode } from "./block.js";

export function journalCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "journal-mark",
      args: { "node-name": { type: "str" }, name: { type: "str" } },
      handler: async (args) => {
        const node = requireNode(graph, args["node-name"]);
        const driver = node.driver;
        if (!(driver instanceof JournalDriver))
          throw new QmpError("GenericError", `Node '${node.name}' is not a journal node`);
        // The mark lands after every entry appended so far: writes the guest has seen completed are
        // before it, since a stream job answers the guest only after the journal append.
        const seq = await driver.mark(args.name);
        return { seq };
      },
    }),
  ];
}
