/**
 * x-block-verify (a drivetap extension): compares a source node with a target node by checksums while
 * writes go on, and repairs the target on request (jobs/verify.ts).
 *
 * Arguments: `source`, `target` (node names) or `job-id` (a job with a source, a target and a dirty
 * bitmap: stream, mirror), `offset` (default 0), `length` (default: to the end), `granularity` (bytes
 * compared at a time, default 1 MiB), `repair` (default false).
 * Returns `{"checked-bytes", "mismatches": [{"offset", "length", "repaired"?}], "mismatch-bytes",
 * "pending": [...], "pending-bytes", "repaired-bytes", "rechecked", "truncated"}`. With a job,
 * differences where the job already knows its target is behind are pending, not mismatches.
 */
import type { BlockGraph } from "../../graph/block-graph.js";
import type { BlockNode } from "../../io/block-node.js";
import {
  isVerifiableJob,
  verifyNodes,
  VERIFY_GRANULARITY_MAX,
  VERIFY_GRANULARITY_MIN,
  type ByteRange,
  type DirtyRanges,
  type VerifyExtent,
} from "../../jobs/verify.js";
import { QmpError } from "../errors.js";
import { defineCommand, type QmpCommandDef } from "../server.js";
import { requireNode } from "./block.js";

function extents(list: readonly VerifyExtent[]): Record<string, unknown>[] {
  return list.map((e) =>
    e.repaired === undefined
      ? { offset: e.offset, length: e.length }
      : { offset: e.offset, length: e.length, repaired: e.repaired },
  );
}

export function verifyCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "x-block-verify",
      args: {
        "job-id": { type: "str", optional: true },
        source: { type: "str", optional: true },
        target: { type: "str", optional: true },
        offset: { type: "int", min: 0, optional: true },
        length: { type: "int", min: 0, optional: true },
        granularity: {
          type: "int",
          min: VERIFY_GRANULARITY_MIN,
          max: VERIFY_GRANULARITY_MAX,
          optional: true,
        },
        repair: { type: "bool", optional: true },
      },
      handler: async (args) => {
        let source: BlockNode;
        let target: BlockNode;
        let pending: DirtyRanges | undefined;
        let copiesInFlight: (() => Iterable<ByteRange>) | undefined;
        const jobId = args["job-id"];
        if (jobId !== undefined) {
          const job = graph.getJob(jobId);
          if (!job) throw new QmpError("DeviceNotActive", `Block job '${jobId}' not found`);
          if (!isVerifiableJob(job)) {
            throw new QmpError(
              "GenericError",
              `Job '${jobId}' does not keep its target in sync with its source; verify nodes by name instead`,
            );
          }
          source = job.source;
          target = job.target;
          pending = job.dirty;
          copiesInFlight = job.copiesInFlight?.bind(job);
          for (const [arg, node] of [
            ["source", source],
            ["target", target],
          ] as const) {
            const given = args[arg];
            if (given !== undefined && given !== node.name) {
              throw new QmpError("GenericError", `Job '${jobId}' has ${arg} '${node.name}', not '${given}'`);
            }
          }
        } else {
          if (args.source === undefined || args.target === undefined)
            throw new QmpError("GenericError", "Give 'source' and 'target', or 'job-id'");
          source = requireNode(graph, args.source);
          target = requireNode(graph, args.target);
        }
        const r = await verifyNodes(source, target, {
          offset: args.offset,
          length: args.length,
          granularityBytes: args.granularity,
          repair: args.repair,
          pending,
          copiesInFlight,
        });
        return {
          "checked-bytes": r.checkedBytes,
          mismatches: extents(r.mismatches),
          "mismatch-bytes": r.mismatchBytes,
          pending: extents(r.pending),
          "pending-bytes": r.pendingBytes,
          "repaired-bytes": r.repairedBytes,
          rechecked: r.rechecked,
          truncated: r.truncated,
        };
      },
    }),
  ];
}
