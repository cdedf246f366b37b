/**
 * blockdev-backup (target is a node) and drive-backup (target is a file). sync full, top and none are
 * QEMU's; stream is ours (jobs/stream.ts).
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { FileDriver } from "../../block/drivers/file.js";
import type { BlockGraph } from "../../graph/block-graph.js";
import { BlockNode } from "../../io/block-node.js";
import { CbwBackupJob } from "../../jobs/backup.js";
import type { BackupOptions, SyncMode } from "../../jobs/backup-common.js";
import type { Job, ErrorAction } from "../../jobs/job.js";
import { StreamJob } from "../../jobs/stream.js";
import { QmpError } from "../errors.js";
import { defineCommand, type QmpCommandDef } from "../server.js";

const SYNC_VALUES = ["full", "top", "none", "stream", "incremental", "bitmap"] as const;
const ERROR_ACTIONS = ["report", "ignore", "stop", "enospc"] as const;
const JOB_ID_PATTERN = /^[A-Za-z][A-Za-z0-9_.-]{0,127}$/;

const commonArgs = {
  "job-id": { type: "str", optional: true },
  device: { type: "str" },
  sync: { type: "enum", values: SYNC_VALUES },
  speed: { type: "int", min: 0, optional: true },
  bitmap: { type: "str", optional: true },
  "bitmap-mode": { type: "enum", values: ["on-success", "never", "always"], optional: true },
  compress: { type: "bool", optional: true },
  "on-source-error": { type: "enum", values: ERROR_ACTIONS, optional: true },
  "on-target-error": { type: "enum", values: ERROR_ACTIONS, optional: true },
  "auto-finalize": { type: "bool", optional: true },
  "auto-dismiss": { type: "bool", optional: true },
  "filter-node-name": { type: "str", optional: true },
} as const;

interface CommonArgs {
  "job-id"?: string;
  device: string;
  sync: (typeof SYNC_VALUES)[number];
  speed?: number;
  bitmap?: string;
  compress?: boolean;
  "on-source-error"?: ErrorAction;
  "on-target-error"?: ErrorAction;
  "auto-finalize"?: boolean;
  "auto-dismiss"?: boolean;
}

/** Checks everything that can be checked before anything is created. */
function validate(graph: BlockGraph, a: CommonArgs): { source: BlockNode; jobId: string; sync: SyncMode } {
  const source = graph.getNode(a.device);
  if (!source)
    throw new QmpError("GenericError", `Cannot find device='${a.device}' nor node-name='${a.device}'`);
  const jobId = a["job-id"] ?? a.device;
  if (!JOB_ID_PATTERN.test(jobId)) throw new QmpError("GenericError", `Invalid job ID '${jobId}'`);
  if (graph.hasJob(jobId)) throw new QmpError("GenericError", `Job ID '${jobId}' already in use`);
  if (a.sync === "incremental" || a.sync === "bitmap") {
    throw new QmpError(
      "GenericError",
      `sync mode '${a.sync}' needs dirty bitmaps, which are not supported yet`,
    );
  }
  if (a.bitmap !== undefined)
    throw new QmpError("GenericError", "a bitmap may only be given with sync=incremental or bitmap");
  if (a.compress) throw new QmpError("GenericError", "Compression is not supported for this drive");
  return { source, jobId, sync: a.sync };
}

function startJob(
  graph: BlockGraph,
  a: CommonArgs,
  checked: { source: BlockNode; jobId: string; sync: SyncMode },
  target: BlockNode,
  onEnd: () => Promise<void>,
): Job {
  const { source, jobId, sync } = checked;
  const user = `job:${jobId}`;
  try {
    graph.claim(target.name, user, `block job ${jobId} (backup target)`, true);
    graph.claim(source.name, user, `block job ${jobId} (backup source)`);
  } catch (err) {
    graph.release(target.name, user);
    throw new QmpError("GenericError", (err as Error).message);
  }
  const options: BackupOptions = {
    id: jobId,
    type: "backup",
    source,
    target,
    sync,
    speed: a.speed ?? 0,
    onSourceError: a["on-source-error"],
    onTargetError: a["on-target-error"],
    autoFinalize: a["auto-finalize"],
    autoDismiss: a["auto-dismiss"],
    events: graph.events,
    log: graph.log,
    release: async () => {
      graph.release(target.name, user);
      graph.release(source.name, user);
      await onEnd();
    },
    onGone: (j) => graph.removeJob(j),
  };
  const job = sync === "stream" ? new StreamJob(options) : new CbwBackupJob(options);
  graph.addJob(job);
  job.start();
  return job;
}

/** Preallocates in `target` every range the source has allocated. */
async function mirrorAllocation(source: BlockNode, target: FileDriver): Promise<void> {
  const size = source.size();
  let pos = 0;
  while (pos < size) {
    const extents = await source.blockStatus(pos, size - pos);
    for (const x of extents) {
      if (!x.hole && !target.preallocate(x.offset, x.length)) return;
      pos = x.offset + x.length;
    }
  }
}

export function backupCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "blockdev-backup",
      args: { ...commonArgs, target: { type: "str" } },
      handler: (a) => {
        const checked = validate(graph, a);
        const target = graph.getNode(a.target);
        if (!target)
          throw new QmpError("GenericError", `Cannot find device='${a.target}' nor node-name='${a.target}'`);
        if (target === checked.source)
          throw new QmpError("GenericError", "Source and target cannot be the same");
        if (target.size() !== checked.source.size()) {
          throw new QmpError(
            "GenericError",
            `Source and target image have different sizes (${checked.source.size()} and ${target.size()})`,
          );
        }
        if (target.readOnly) throw new QmpError("GenericError", `Target node '${target.name}' is read-only`);
        const users = graph.usersOf(target.name);
        if (users.length > 0)
          throw new QmpError("GenericError", `Node '${target.name}' is busy: ${users.join(", ")}`);
        startJob(graph, a, checked, target, async () => {});
        return {};
      },
    }),
    defineCommand({
      name: "drive-backup",
      args: {
        ...commonArgs,
        target: { type: "str" },
        format: { type: "enum", values: ["raw"], optional: true },
        mode: { type: "enum", values: ["existing", "absolute-paths"], optional: true },
      },
      handler: async (a) => {
        const checked = validate(graph, a);
        const filename = path.resolve(a.target);
        const mode = a.mode ?? "absolute-paths";
        const size = checked.source.size();
        const existed = fs.existsSync(filename);
        if (mode === "existing" && !existed) {
          throw new QmpError("GenericError", `Could not open '${filename}': No such file or directory`);
        }
        const usedBy = graph.nodesUsingFile(filename);
        if (usedBy.includes(checked.source.name)) {
          throw new QmpError("GenericError", "Source and target cannot be the same");
        }
        if (usedBy.length > 0) {
          // Recreating or writing a file another node has open would destroy its data.
          throw new QmpError("GenericError", `'${filename}' is in use by node '${usedBy[0]}'`);
        }
        let created = false;
        if (mode === "absolute-paths") {
          // Create (or recreate) a sparse raw image of the source's size, as qemu-img create would.
          try {
            fs.writeFileSync(filename, "");
            fs.truncateSync(filename, size);
            created = true;
          } catch (err) {
            throw new QmpError("GenericError", `Could not create '${filename}': ${(err as Error).message}`);
          }
        }
        let target: BlockNode;
        try {
          const driver = FileDriver.open(filename);
          if (driver.size() !== size) {
            await driver.close();
            throw new QmpError(
              "GenericError",
              `Source and target image have different sizes (${size} and ${driver.size()})`,
            );
          }
          // A target that will receive the source's data gets the source's allocation up front:
          // writes into holes cost a block allocation each, and a stream job would pay it on every
          // duplicated write (seq write 1M through a stream job: 0.5x with a sparse target, 1.0x
          // with an allocated one). sync=none only receives old data of overwritten regions.
          if (created && checked.sync !== "none") await mirrorAllocation(checked.source, driver);
          target = new BlockNode(`#backup-target-${checked.jobId}`, driver);
          graph.addNode(target, { driver: "file", filename }, true);
        } catch (err) {
          if (created && !existed) fs.rmSync(filename, { force: true });
          if (err instanceof QmpError) throw err;
          throw new QmpError("GenericError", `Could not open '${filename}': ${(err as Error).message}`);
        }
        try {
          startJob(graph, a, checked, target, async () => {
            await graph.removeNode(target.name);
          });
        } catch (err) {
          // Leave nothing behind: the internal node and a file we created.
          await graph.removeNode(target.name);
          if (created && !existed) fs.rmSync(filename, { force: true });
          throw err;
        }
        return {};
      },
    }),
  ];
}
