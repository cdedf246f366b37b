/** Job commands: query-block-jobs, query-jobs, the block-job-* verbs, job-* verbs. */
import type { BlockGraph } from "../../graph/block-graph.js";
import { Job, JobVerbError } from "../../jobs/job.js";
import { QmpError } from "../errors.js";
import { defineCommand, type QmpCommandDef } from "../server.js";

function blockJob(graph: BlockGraph, device: string): Job {
  const job = graph.getJob(device);
  // A job that is not a block job (blockdev-create) is unknown to the block-job-* verbs, as in QEMU.
  if (!job?.isBlockJob) throw new QmpError("DeviceNotActive", `Block job '${device}' not found`);
  return job;
}

function job(graph: BlockGraph, id: string): Job {
  const j = graph.getJob(id);
  if (!j) throw new QmpError("GenericError", `Job not found`);
  return j;
}

/** Runs a verb, turning a refusal into QEMU's GenericError. */
function verb(fn: () => void): Record<string, never> {
  try {
    fn();
  } catch (err) {
    if (err instanceof JobVerbError) throw new QmpError("GenericError", err.message);
    throw err;
  }
  return {};
}

export function jobCommands(graph: BlockGraph): QmpCommandDef[] {
  const device = { device: { type: "str" } } as const;
  const id = { id: { type: "str" } } as const;
  return [
    defineCommand({
      name: "query-block-jobs",
      args: {},
      handler: () =>
        graph
          .jobs()
          .filter((j) => j.isBlockJob)
          .map((j) => j.blockJobInfo()),
    }),
    defineCommand({ name: "query-jobs", args: {}, handler: () => graph.jobs().map((j) => j.jobInfo()) }),
    defineCommand({
      name: "block-job-cancel",
      args: { ...device, force: { type: "bool", optional: true } },
      handler: (a) => verb(() => blockJob(graph, a.device).cancel(a.force ?? false)),
    }),
    defineCommand({
      name: "block-job-pause",
      args: device,
      handler: (a) => verb(() => blockJob(graph, a.device).pause()),
    }),
    defineCommand({
      name: "block-job-resume",
      args: device,
      handler: (a) => verb(() => blockJob(graph, a.device).resume()),
    }),
    defineCommand({
      name: "block-job-set-speed",
      args: { ...device, speed: { type: "int" } },
      handler: (a) => {
        if (a.speed < 0) throw new QmpError("GenericError", "Parameter 'speed' expects a non negative value");
        return verb(() => blockJob(graph, a.device).setSpeed(a.speed));
      },
    }),
    defineCommand({
      name: "block-job-complete",
      args: device,
      handler: (a) => verb(() => blockJob(graph, a.device).complete()),
    }),
    defineCommand({
      name: "block-job-finalize",
      args: id,
      handler: (a) => verb(() => blockJob(graph, a.id).finalize()),
    }),
    defineCommand({
      name: "block-job-dismiss",
      args: id,
      handler: (a) => verb(() => blockJob(graph, a.id).dismiss()),
    }),
    defineCommand({ name: "job-pause", args: id, handler: (a) => verb(() => job(graph, a.id).pause()) }),
    defineCommand({ name: "job-resume", args: id, handler: (a) => verb(() => job(graph, a.id).resume()) }),
    defineCommand({
      name: "job-cancel",
      args: id,
      handler: (a) => verb(() => job(graph, a.id).cancel(false)),
    }),
    defineCommand({
      name: "job-complete",
      args: id,
      handler: (a) => verb(() => job(graph, a.id).complete()),
    }),
    defineCommand({
      name: "job-finalize",
      args: id,
      handler: (a) => verb(() => job(graph, a.id).finalize()),
    }),
    defineCommand({ name: "job-dismiss", args: id, handler: (a) => verb(() => job(graph, a.id).dismiss()) }),
  ];
}
