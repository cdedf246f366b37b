/**
 * blockdev-backup (target is a node) and drive-backup (target is a file). sync full, top, none,
 * incremental and bitmap are QEMU's (incremental = bitmap with bitmap-mode on-success); stream is ours
 * (jobs/stream.ts). `transaction` runs backups and dirty bitmap actions all-or-nothing.
 */
import { FileDriver } from "../../block/drivers/file.js";
import type { BlockGraph } from "../../graph/block-graph.js";
import { BlockNode } from "../../io/block-node.js";
import { CbwBackupJob } from "../../jobs/backup.js";
import type { NamedBitmap } from "../../io/named-bitmaps.js";
import type { BackupOptions, BitmapMode, SyncMode } from "../../jobs/backup-common.js";
import type { Job, ErrorAction } from "../../jobs/job.js";
import { isUnsizedStreamTarget, sizeStreamTarget, StreamJob } from "../../jobs/stream.js";
import { QmpError } from "../errors.js";
import { DRIVE_TARGET_FORMATS, openDriveTarget, type TargetBacking } from "./drive-target.js";
import { requireSizedNode } from "./block.js";
import { checkJobStart, JOB_START_ARGS } from "./job-start.js";
import { validateArgs } from "../schema.js";
import { defineCommand, type QmpCommandDef } from "../server.js";
import {
  BITMAP_ACTIONS,
  checkNotBusy,
  isBitmapAction,
  prepareBitmapAction,
  type PreparedAction,
} from "./bitmaps.js";

const SYNC_VALUES = ["full", "top", "none", "stream", "incremental", "bitmap"] as const;

const commonArgs = {
  ...JOB_START_ARGS,
  sync: { type: "enum", values: SYNC_VALUES },
  bitmap: { type: "str", optional: true },
  "bitmap-mode": { type: "enum", values: ["on-success", "never", "always"], optional: true },
  compress: { type: "bool", optional: true },
} as const;

interface CommonArgs {
  "job-id"?: string;
  device: string;
  sync: (typeof SYNC_VALUES)[number];
  speed?: number;
  bitmap?: string;
  "bitmap-mode"?: BitmapMode;
  compress?: boolean;
  "on-source-error"?: ErrorAction;
  "on-target-error"?: ErrorAction;
  "auto-finalize"?: boolean;
  "auto-dismiss"?: boolean;
}

interface Checked {
  source: BlockNode;
  jobId: string;
  sync: SyncMode;
  bitmap?: NamedBitmap;
  bitmapMode?: BitmapMode;
}

/** Checks everything that can be checked before anything is created. */
function validate(graph: BlockGraph, a: CommonArgs): Checked {
  const { source, jobId } = checkJobStart(graph, a.device, a["job-id"]);
  if (a.compress) throw new QmpError("GenericError", "Compression is not supported for this drive");
  let sync: SyncMode;
  let mode = a["bitmap-mode"];
  if (a.sync === "incremental" || a.sync === "bitmap") {
    if (a.bitmap === undefined) {
      throw new QmpError("GenericError", `must provide a valid bitmap name for '${a.sync}' sync mode`);
    }
    if (a.sync === "incremental") {
      if (mode !== undefined && mode !== "on-success") {
        throw new QmpError(
          "GenericError",
          "Bitmap sync mode must be 'on-success' when using sync mode 'incremental'",
        );
      }
      mode = "on-success";
    }
    sync = "bitmap";
  } else {
    sync = a.sync;
  }
  if (a.bitmap === undefined) {
    if (mode !== undefined)
      throw new QmpError("GenericError", "Cannot specify bitmap sync mode without a bitmap");
    return { source, jobId, sync };
  }
  const bitmap = graph.bitmaps.find(source.name, a.bitmap);
  if (!bitmap) throw new QmpError("GenericError", `Bitmap '${a.bitmap}' could not be found`);
  if (mode === undefined)
    throw new QmpError("GenericError", "Bitmap sync mode must be given when providing a bitmap");
  checkNotBusy(bitmap);
  if (sync === "none" || sync === "stream") {
    throw new QmpError("GenericError", `sync mode '${sync}' does not produce meaningful bitmap outputs`);
  }
  if (mode === "never" && sync !== "bitmap") {
    throw new QmpError(
      "GenericError",
      `Bitmap sync mode 'never' has no meaningful effect when combined with sync mode '${sync}'`,
    );
  }
  return { source, jobId, sync, bitmap, bitmapMode: mode };
}

/** A backup whose checks passed and whose nodes are claimed; commit starts it, abort undoes it. */
export interface PreparedBackup {
  readonly jobId: string;
  commit(): Job;
  abort(): Promise<void>;
}

function prepareJob(
  graph: BlockGraph,
  a: CommonArgs,
  checked: Checked,
  target: BlockNode,
  onEnd: () => Promise<void>,
): PreparedBackup {
  const { source, jobId, sync, bitmap, bitmapMode } = checked;
  const user = `job:${jobId}`;
  try {
    graph.claim(target.name, user, `block job ${jobId} (backup target)`, true);
    graph.claim(source.name, user, `block job ${jobId} (backup source)`);
  } catch (err) {
    graph.release(target.name, user);
    throw new QmpError("GenericError", (err as Error).message);
  }
  // The bitmap is the job's from now on: nobody may clear, merge or remove it meanwhile.
  const releaseBitmap = bitmap?.hold();
  const release = async (): Promise<void> => {
    releaseBitmap?.();
    graph.release(target.name, user);
    graph.release(source.name, user);
    await onEnd();
  };
  const options: BackupOptions = {
    id: jobId,
    type: "backup",
    source,
    target,
    sync,
    bitmap,
    bitmapMode,
    speed: a.speed ?? 0,
    onSourceError: a["on-source-error"],
    onTargetError: a["on-target-error"],
    autoFinalize: a["auto-finalize"],
    autoDismiss: a["auto-dismiss"],
    events: graph.events,
    log: graph.log,
    release,
    onGone: (j) => graph.removeJob(j),
  };
  return {
    jobId,
    // Synchronous: the job's hook is attached before commit returns, so jobs committed together
    // see exactly the same writes.
    commit: () => {
      const job = sync === "stream" ? new StreamJob(options) : new CbwBackupJob(options);
      graph.addJob(job);
      job.start();
      return job;
    },
    abort: release,
  };
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

const blockdevBackupArgs = {
  ...commonArgs,
  target: { type: "str" },
} as const;

const driveBackupArgs = {
  ...commonArgs,
  target: { type: "str" },
  format: { type: "enum", values: DRIVE_TARGET_FORMATS, optional: true },
  mode: { type: "enum", values: ["existing", "absolute-paths"], optional: true },
} as const;

type BlockdevBackupArgs = CommonArgs & { target: string };
type DriveBackupArgs = CommonArgs & {
  target: string;
  format?: (typeof DRIVE_TARGET_FORMATS)[number];
  mode?: "existing" | "absolute-paths";
};

/** QEMU's backing file for a new drive-backup target: top keeps the chain, none sits on the source. */
function backupTargetBacking(sync: SyncMode): TargetBacking {
  if (sync === "top") return "source-backing";
  if (sync === "none") return "source";
  return "none";
}

export async function prepareBlockdevBackup(
  graph: BlockGraph,
  a: BlockdevBackupArgs,
): Promise<PreparedBackup> {
  const checked = validate(graph, a);
  const target = graph.getNode(a.target);
  if (!target)
    throw new QmpError("GenericError", `Cannot find device='${a.target}' nor node-name='${a.target}'`);
  if (target === checked.source) throw new QmpError("GenericError", "Source and target cannot be the same");
  // An unsized journal is for a stream job, which sizes it below; everything else is refused here.
  const sizedByJob = checked.sync === "stream" && isUnsizedStreamTarget(target);
  if (!sizedByJob) requireSizedNode(graph, target.name);
  if (!sizedByJob && target.size() !== checked.source.size()) {
    throw new QmpError(
      "GenericError",
      `Source and target image have different sizes (${checked.source.size()} and ${target.size()})`,
    );
  }
  if (target.readOnly) throw new QmpError("GenericError", `Target node '${target.name}' is read-only`);
  const users = graph.usersOf(target.name);
  if (users.length > 0)
    throw new QmpError("GenericError", `Node '${target.name}' is busy: ${users.join(", ")}`);
  let unsize: (() => void) | null = null;
  try {
    unsize = sizeStreamTarget(checked.source, target);
  } catch (err) {
    throw new QmpError("GenericError", `Could not size '${target.name}': ${(err as Error).message}`);
  }
  let prepared: PreparedBackup;
  try {
    prepared = prepareJob(graph, a, checked, target, async () => {});
  } catch (err) {
    unsize?.();
    throw err;
  }
  if (!unsize) return prepared;
  const undo = unsize;
  return {
    ...prepared,
    abort: async () => {
      await prepared.abort();
      undo();
    },
  };
}

export async function prepareDriveBackup(graph: BlockGraph, a: DriveBackupArgs): Promise<PreparedBackup> {
  const checked = validate(graph, a);
  const { filename, driver, format, file, created, removeCreated } = await openDriveTarget(
    graph,
    checked.source,
    a.target,
    { mode: a.mode, format: a.format, backing: backupTargetBacking(checked.sync) },
  );
  let target: BlockNode;
  try {
    // A target that will receive the source's data gets the source's allocation up front: a write
    // into a hole costs a block allocation, and a stream job would pay it on every duplicated write
    // (seq write 1M through a stream job measured 0.5x with a sparse target, 0.76-0.85x with an
    // allocated one). sync=none only receives old data of overwritten regions.
    // A qcow2 target allocates as it is written (and a preallocated file would only be leaked space).
    if (created && format === "raw" && checked.sync !== "none") await mirrorAllocation(checked.source, file);
    target = new BlockNode(`#backup-target-${checked.jobId}`, driver);
    graph.addNode(target, { driver: format === "raw" ? "file" : "qcow2", filename }, true);
  } catch (err) {
    await driver.close();
    removeCreated();
    throw new QmpError("GenericError", `Could not open '${filename}': ${(err as Error).message}`);
  }
  let committed = false;
  let prepared: PreparedBackup;
  try {
    prepared = prepareJob(graph, a, checked, target, async () => {
      await graph.removeNode(target.name);
      if (!committed) removeCreated();
    });
  } catch (err) {
    // Leave nothing behind: the internal node and a file we created.
    await graph.removeNode(target.name);
    removeCreated();
    throw err;
  }
  return {
    jobId: prepared.jobId,
    commit: () => {
      committed = true;
      return prepared.commit();
    },
    abort: prepared.abort,
  };
}

export function backupCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "transaction",
      args: {
        actions: {
          type: "array",
          items: {
            type: "object",
            fields: {
              type: {
                type: "enum",
                values: ["blockdev-backup", "drive-backup", ...Object.keys(BITMAP_ACTIONS)],
              },
              data: { type: "any" },
            },
          },
        },
        properties: { type: "any", optional: true },
      },
      handler: async (a) => {
        // All or nothing: every action is checked and prepared (nodes claimed, files created) before
        // any job starts; then all start in one synchronous step, so they see exactly the same writes
        // (a full backup plus a stream to a journal gives the journal's base copy).
        const ids = new Set<string>();
        const prepared: Array<PreparedBackup | PreparedAction> = [];
        try {
          for (const action of a.actions) {
            if (isBitmapAction(action.type)) {
              const data = validateArgs(BITMAP_ACTIONS[action.type], action.data);
              prepared.push(prepareBitmapAction(graph, action.type, data));
              continue;
            }
            const data = validateArgs(
              action.type === "drive-backup" ? driveBackupArgs : blockdevBackupArgs,
              action.data,
            );
            const id = (data["job-id"] as string | undefined) ?? (data.device as string);
            if (ids.has(id)) throw new QmpError("GenericError", `Job ID '${id}' already in use`);
            ids.add(id);
            prepared.push(
              action.type === "drive-backup"
                ? await prepareDriveBackup(graph, data as unknown as DriveBackupArgs)
                : await prepareBlockdevBackup(graph, data as unknown as BlockdevBackupArgs),
            );
          }
        } catch (err) {
          for (const p of prepared.reverse()) await p.abort();
          throw err;
        }
        // One synchronous step: bitmaps start recording between the same two requests as the jobs.
        const durable: Array<Promise<void> | void> = [];
        for (const p of prepared) durable.push(p.commit() as Promise<void> | void);
        await Promise.all(durable.filter((d) => d instanceof Promise));
        return {};
      },
    }),
    defineCommand({
      name: "blockdev-backup",
      args: blockdevBackupArgs,
      handler: async (a) => {
        (await prepareBlockdevBackup(graph, a)).commit();
        return {};
      },
    }),
    defineCommand({
      name: "drive-backup",
      args: driveBackupArgs,
      handler: async (a) => {
        (await prepareDriveBackup(graph, a)).commit();
        return {};
      },
    }),
  ];
}
