/**
 * query-blockstats: QEMU's BlockStats for each device (query-block's list) or, with `query-nodes`,
 * for every node, filled from the node's counters (NodeStats) and accounting (BlockAccounting).
 * Every QEMU member is present with QEMU's type; QEMU's merged counts are 0 (nothing is merged) and
 * its timed_stats is empty (no intervals are configured). Write-zeroes count as writes, as QEMU's
 * devices account them; they are also given apart in drivetap's `x-` members. A node layered on a
 * child node has the child's stats as `parent` (QEMU's name for the stats of the `file` child).
 */
import type { BlockGraph } from "../../graph/block-graph.js";
import type { BlockNode } from "../../io/block-node.js";
import { defineCommand, type QmpCommandDef } from "../server.js";
import { topLevelNodes } from "./block.js";

/** QEMU's BlockDeviceStats of a node. */
function deviceStats(node: BlockNode): Record<string, unknown> {
  const st = node.stats;
  const acct = node.acct;
  const idle = acct.idleTimeNs();
  return {
    rd_bytes: st.readBytes,
    wr_bytes: st.writeBytes + st.zeroBytes,
    unmap_bytes: st.discardBytes,
    rd_operations: st.readOps,
    wr_operations: st.writeOps + st.zeroOps,
    flush_operations: st.flushOps,
    unmap_operations: st.discardOps,
    rd_total_time_ns: acct.read.totalTimeNs,
    wr_total_time_ns: acct.write.totalTimeNs,
    flush_total_time_ns: acct.flush.totalTimeNs,
    unmap_total_time_ns: acct.discard.totalTimeNs,
    wr_highest_offset: acct.writeHighestOffset,
    rd_merged: 0,
    wr_merged: 0,
    unmap_merged: 0,
    ...(idle !== undefined ? { idle_time_ns: idle } : {}),
    failed_rd_operations: acct.read.failed,
    failed_wr_operations: acct.write.failed,
    failed_flush_operations: acct.flush.failed,
    failed_unmap_operations: acct.discard.failed,
    invalid_rd_operations: acct.read.invalid,
    invalid_wr_operations: acct.write.invalid,
    invalid_flush_operations: acct.flush.invalid,
    invalid_unmap_operations: acct.discard.invalid,
    // Both are counted, always.
    account_invalid: true,
    account_failed: true,
    timed_stats: [],
    "x-zero-operations": st.zeroOps,
    "x-zero-bytes": st.zeroBytes,
    "x-block-status-operations": st.blockStatusOps,
  };
}

/** QEMU's BlockStats of a node; `device` is set in device mode. */
function blockStats(graph: BlockGraph, node: BlockNode, device: boolean): Record<string, unknown> {
  const info = graph.nodeInfo(node.name);
  const child = info?.child !== undefined ? graph.getNode(info.child) : undefined;
  return {
    ...(device ? { device: node.name } : {}),
    "node-name": node.name,
    stats: deviceStats(node),
    // QEMU's BlockStatsSpecificFile, for nodes of the file driver.
    ...(info?.driver === "file"
      ? {
          "driver-specific": {
            driver: "file",
            "discard-nb-ok": node.stats.discardOps,
            "discard-nb-failed": node.acct.discard.failed,
            "discard-bytes-ok": node.stats.discardBytes,
          },
        }
      : {}),
    ...(child ? { parent: blockStats(graph, child, false) } : {}),
  };
}

export function blockstatsCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "query-blockstats",
      args: { "query-nodes": { type: "bool", optional: true } },
      handler: (a) =>
        a["query-nodes"]
          ? graph.nodes().map((n) => blockStats(graph, n, false))
          : topLevelNodes(graph).map((n) => blockStats(graph, n, true)),
    }),
  ];
}
