/**
 * Backing-chain commands with QEMU's names and texts: blockdev-snapshot (an overlay on top of a node),
 * block-stream (pull the chain into a node) and block-commit (merge a layer down into its base). The
 * chain and the node replacement rule are graph/chain.ts; the jobs are jobs/block-stream.ts and
 * jobs/commit.ts.
 */
import { Qcow2Driver } from "../../block/drivers/qcow2/qcow2.js";
import type { BlockGraph } from "../../graph/block-graph.js";
import { backingNameOf, backingChain, snapshotOnto } from "../../graph/chain.js";
import type { BlockNode } from "../../io/block-node.js";
import { QmpError } from "../errors.js";
import { defineCommand, type QmpCommandDef } from "../server.js";

function findNode(graph: BlockGraph, name: string): BlockNode {
  const node = graph.getNode(name);
  if (!node) throw new QmpError("GenericError", `Cannot find device='${name}' nor node-name='${name}'`);
  return node;
}

/** A job's op blocker on a node, with QEMU's text. */
function refuseJobUser(graph: BlockGraph, name: string): void {
  const jobs = graph.jobUsesOf(name);
  if (jobs.length > 0) throw new QmpError("GenericError", `Node '${name}' is busy: ${jobs.join(", ")}`);
}

/**
 * The users that cannot move to a replacement (graph/chain.ts): a qcow2 overlay (QEMU's text) or
 * another parent. Exports move.
 */
function refuseUnmovableUsers(graph: BlockGraph, name: string): void {
  const parent = graph.nodes().find((n) => graph.nodeInfo(n.name)?.backing === name);
  if (parent) {
    throw new QmpError(
      "GenericError",
      `Node '${name}' is busy: node is used as backing hd of '${parent.name}'`,
    );
  }
  const others = graph.usersOf(name).filter((why) => !why.startsWith("export "));
  if (others.length > 0) throw new QmpError("GenericError", `Node '${name}' is busy: ${others.join(", ")}`);
}

/** QEMU's checks in its order (external_snapshot_prepare, then bdrv_append's), then the move. */
async function blockdevSnapshot(graph: BlockGraph, nodeName: string, overlayName: string): Promise<void> {
  const node = findNode(graph, nodeName);
  refuseJobUser(graph, nodeName);
  const overlay = findNode(graph, overlayName);
  // QEMU's test is for a BlockBackend parent: an export or a job (a backing parent is not one).
  const served = graph.exports().some((e) => e.nodeName === overlayName);
  if (served || graph.jobUsesOf(overlayName).length > 0) {
    throw new QmpError("GenericError", "The overlay is already in use");
  }
  const driver = overlay.driver;
  if (driver instanceof Qcow2Driver && driver.backing !== null) {
    throw new QmpError("GenericError", "The overlay already has a backing image");
  }
  if (!(driver instanceof Qcow2Driver)) {
    throw new QmpError("GenericError", "The overlay does not support backing images");
  }
  if (overlay === node) {
    throw new QmpError("GenericError", `Making '${nodeName}' a backing image of itself would create a loop`);
  }
  refuseUnmovableUsers(graph, nodeName);
  if (overlay.readOnly && graph.exports().some((e) => e.nodeName === nodeName && e.writable)) {
    throw new QmpError("GenericError", `Block node '${overlayName}' is read-only`);
  }
  // The overlay's header names the node's image when it has one (a memory or NBD node has none:
  // the link then lives only in the running graph, as it does for every blockdev-snapshot in QEMU).
  const name = overlay.readOnly ? undefined : backingNameOf(backingChain(graph, nodeName)[0]);
  await snapshotOnto(graph, node, overlay, name);
}

export function chainCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "blockdev-snapshot",
      args: { node: { type: "str" }, overlay: { type: "str" } },
      handler: async (a) => {
        await blockdevSnapshot(graph, a.node, a.overlay);
        return {};
      },
    }),
  ];
}
