/** What the commands that start a block job (backup, mirror) share: error actions and the first checks. */
import type { BlockGraph } from "../../graph/block-graph.js";
import type { BlockNode } from "../../io/block-node.js";
import { QmpError } from "../errors.js";
import { requireSizedNode } from "./block.js";

export const ERROR_ACTIONS = ["report", "ignore", "stop", "enospc"] as const;

/** The arguments every command that starts a job (backup, mirror) takes, with QEMU's names. */
export const JOB_START_ARGS = {
  "job-id": { type: "str", optional: true },
  device: { type: "str" },
  speed: { type: "int", min: 0, optional: true },
  "on-source-error": { type: "enum", values: ERROR_ACTIONS, optional: true },
  "on-target-error": { type: "enum", values: ERROR_ACTIONS, optional: true },
  "filter-node-name": { type: "str", optional: true },
  "auto-finalize": { type: "bool", optional: true },
  "auto-dismiss": { type: "bool", optional: true },
} as const;
const JOB_ID_PATTERN = /^[A-Za-z][A-Za-z0-9_.-]{0,127}$/;

/** The source node and the job's id (default: the device name), with QEMU's texts when either is wrong. */
export function checkJobStart(
  graph: BlockGraph,
  device: string,
  jobIdArg: string | undefined,
): { source: BlockNode; jobId: string } {
  const source = graph.getNode(device);
  if (!source) throw new QmpError("GenericError", `Cannot find device='${device}' nor node-name='${device}'`);
  requireSizedNode(graph, device);
  const jobId = jobIdArg ?? device;
  checkJobId(graph, jobId);
  return { source, jobId };
}

/** A new job's id must be well formed and free (QEMU's texts). */
export function checkJobId(graph: BlockGraph, jobId: string): void {
  if (!JOB_ID_PATTERN.test(jobId)) throw new QmpError("GenericError", `Invalid job ID '${jobId}'`);
  if (graph.hasJob(jobId)) throw new QmpError("GenericError", `Job ID '${jobId}' already in use`);
}
