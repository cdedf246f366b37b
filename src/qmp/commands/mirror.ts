/**
 * blockdev-mirror (target is a node, e.g. an nbd node) and drive-mirror (target is a file drivetap
 * creates), with QEMU's arguments. The job is jobs/mirror.ts; block-job-complete pivots the exports of
 * the source onto the target (graph.pivotExports).
 */
import type { BlockGraph } from "../../graph/block-graph.js";
import { NODE_NAME_PATTERN } from "../../graph/node-factory.js";
import { BlockNode } from "../../io/block-node.js";
import type { ErrorAction } from "../../jobs/job.js";
import { MirrorJob, type CopyMode, type MirrorSync } from "../../jobs/mirror.js";
import { QmpError } from "../errors.js";
import { defineCommand, type QmpCommandDef } from "../server.js";
import { DRIVE_TARGET_FORMATS, openDriveTarget } from "./drive-target.js";
import { requireSizedNode } from "./block.js";
import { checkJobStart, JOB_START_ARGS } from "./job-start.js";

/** QEMU's DriveMirror has no filter-node-name (only blockdev-mirror has). */
function withoutFilterNodeName<T extends { "filter-node-name": unknown }>(
  args: T,
): Omit<T, "filter-node-name"> {
  const rest: Partial<T> = { ...args };
  delete rest["filter-node-name"];
  return rest as Omit<T, "filter-node-name">;
}

export const MIRROR_GRANULARITY_MIN = 512;
export const MIRROR_GRANULARITY_MAX = 64 * 1024 * 1024;
export const MIRROR_BUF_SIZE_MAX = 1024 * 1024 * 1024;

const commonArgs = {
  ...JOB_START_ARGS,
  target: { type: "str" },
  replaces: { type: "str", optional: true },
  sync: { type: "enum", values: ["full", "top", "none"] },
  granularity: { type: "int", optional: true },
  "buf-size": { type: "int", optional: true },
  "copy-mode": { type: "enum", values: ["background", "write-blocking"], optional: true },
} as const;
const driveMirrorCommonArgs = withoutFilterNodeName(commonArgs);

interface CommonArgs {
  "job-id"?: string;
  device: string;
  target: string;
  replaces?: string;
  sync: MirrorSync;
  speed?: number;
  granularity?: number;
  "buf-size"?: number;
  "on-source-error"?: ErrorAction;
  "on-target-error"?: ErrorAction;
  "copy-mode"?: CopyMode;
  "auto-finalize"?: boolean;
  "auto-dismiss"?: boolean;
}

function checkCommon(graph: BlockGraph, a: CommonArgs): { source: BlockNode; jobId: string } {
  const { source, jobId } = checkJobStart(graph, a.device, a["job-id"]);
  const g = a.granularity;
  if (g !== undefined) {
    if (g < MIRROR_GRANULARITY_MIN || g > MIRROR_GRANULARITY_MAX) {
      throw new QmpError("GenericError", "Parameter 'granularity' expects a value in range [512B, 64MB]");
    }
    if (g & (g - 1)) throw new QmpError("GenericError", "Parameter 'granularity' expects a power of 2");
  }
  const b = a["buf-size"];
  if (b !== undefined && (b <= 0 || b > MIRROR_BUF_SIZE_MAX)) {
    throw new QmpError("GenericError", "Parameter 'buf-size' expects a value from 1 to 1 GiB");
  }
  if (a.replaces !== undefined && a.replaces !== a.device) {
    throw new QmpError("GenericError", "'replaces' may only name the mirrored device itself");
  }
  return { source, jobId };
}

/** Claims the nodes, creates and starts the job. `onEnd(pivoted)` cleans up what the command made. */
function startMirror(
  graph: BlockGraph,
  a: CommonArgs,
  source: BlockNode,
  target: BlockNode,
  jobId: string,
  onEnd: (pivoted: boolean) => Promise<void>,
): MirrorJob {
  const user = `job:${jobId}`;
  try {
    graph.claim(target.name, user, `block job ${jobId} (mirror target)`, true);
    graph.claim(source.name, user, `block job ${jobId} (mirror source)`);
  } catch (err) {
    graph.release(target.name, user);
    throw new QmpError("GenericError", (err as Error).message);
  }
  let pivoted = false;
  const job = new MirrorJob({
    id: jobId,
    source,
    target,
    sync: a.sync,
    copyMode: a["copy-mode"] ?? "background",
    granularity: a.granularity,
    bufSize: a["buf-size"],
    speed: a.speed ?? 0,
    onSourceError: a["on-source-error"],
    onTargetError: a["on-target-error"],
    autoFinalize: a["auto-finalize"],
    autoDismiss: a["auto-dismiss"],
    events: graph.events,
    log: graph.log,
    pivot: async () => {
      graph.pivotExports(source.name, target.name);
      pivoted = true;
    },
    release: async () => {
      graph.release(target.name, user);
      graph.release(source.name, user);
      await onEnd(pivoted);
    },
    onGone: (j) => graph.removeJob(j),
  });
  graph.addJob(job);
  job.start();
  return job;
}

function checkTarget(graph: BlockGraph, source: BlockNode, target: BlockNode): void {
  if (target === source) throw new QmpError("GenericError", "Source and target cannot be the same");
  // Before the size check: an unsized journal's size (0) is not the reason it is refused.
  requireSizedNode(graph, target.name);
  if (target.size() !== source.size()) {
    throw new QmpError(
      "GenericError",
      `Source and target image have different sizes (${source.size()} and ${target.size()})`,
    );
  }
  if (target.readOnly) throw new QmpError("GenericError", `Target node '${target.name}' is read-only`);
}

export function mirrorCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "blockdev-mirror",
      args: commonArgs,
      handler: (a) => {
        const { source, jobId } = checkCommon(graph, a);
        const target = graph.getNode(a.target);
        if (!target)
          throw new QmpError("GenericError", `Cannot find device='${a.target}' nor node-name='${a.target}'`);
        checkTarget(graph, source, target);
        const users = graph.usersOf(target.name);
        if (users.length > 0)
          throw new QmpError("GenericError", `Node '${target.name}' is busy: ${users.join(", ")}`);
        startMirror(graph, a, source, target, jobId, async () => {});
        return {};
      },
    }),
    defineCommand({
      name: "drive-mirror",
      args: {
        ...driveMirrorCommonArgs,
        format: { type: "enum", values: DRIVE_TARGET_FORMATS, optional: true },
        "node-name": { type: "str", optional: true },
        mode: { type: "enum", values: ["existing", "absolute-paths"], optional: true },
        unmap: { type: "bool", optional: true },
      },
      handler: async (a) => {
        const { source, jobId } = checkCommon(graph, a);
        const nodeName = a["node-name"] ?? `#mirror-target-${jobId}`;
        if (a["node-name"] !== undefined && !NODE_NAME_PATTERN.test(nodeName))
          throw new QmpError("GenericError", `Invalid node-name: '${nodeName}'`);
        if (graph.getNode(nodeName))
          throw new QmpError("GenericError", `Duplicate nodes with node-name='${nodeName}'`);
        // sync=top: a new qcow2 target names the source's backing image, as QEMU's does, so after
        // block-job-complete it serves the same chain; the job copies only the top layer.
        const { filename, driver, format, removeCreated } = await openDriveTarget(graph, source, a.target, {
          mode: a.mode,
          format: a.format,
          backing: a.sync === "top" ? "source-backing" : "none",
        });
        if (format === "qcow2" && a.sync === "none") {
          // QEMU gives such a target the source as its backing image at the pivot; drivetap cannot
          // change a node's backing while it runs, and without it the pivoted disk would read zeros
          // wherever the guest did not write during the job.
          await driver.close();
          removeCreated();
          throw new QmpError("GenericError", "drive-mirror sync=none into a qcow2 target is not supported");
        }
        const target = new BlockNode(nodeName, driver);
        graph.addNode(
          target,
          { driver: format === "raw" ? "file" : "qcow2", filename },
          a["node-name"] === undefined,
        );
        try {
          startMirror(graph, a, source, target, jobId, async (pivoted) => {
            // After a pivot the new node is the served disk; otherwise it was only the job's.
            if (!pivoted) await graph.removeNode(target.name);
          });
        } catch (err) {
          await graph.removeNode(target.name);
          removeCreated();
          throw err;
        }
        return {};
      },
    }),
  ];
}
