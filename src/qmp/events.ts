/**
 * The events drivetap's QMP clients receive, with the spec of each one's `data`, for query-qmp-schema.
 * The jobs emit them through an EventSink and know nothing of QMP; this list is where QMP declares
 * them. QEMU's events carry QEMU's members (qapi/job.json, qapi/block-core.json); BLOCK_JOB_DEGRADED
 * and BLOCK_JOB_RESYNCED are drivetap's own (a stream or mirror target that went away and came back).
 */
import type { EventSpecs } from "./introspect.js";
import type { ArgsSpec, TypeSpec } from "./schema.js";

/** QEMU's JobStatus (qapi/job.json), in its order. */
export const JOB_STATUSES = [
  "undefined",
  "created",
  "running",
  "paused",
  "ready",
  "standby",
  "waiting",
  "pending",
  "aborting",
  "concluded",
  "null",
] as const;

/** QEMU's JobType (qapi/job.json); drivetap runs backup and mirror jobs. */
export const JOB_TYPES = [
  "commit",
  "stream",
  "mirror",
  "backup",
  "create",
  "amend",
  "snapshot-load",
  "snapshot-save",
  "snapshot-delete",
] as const;

const jobType: TypeSpec = { type: "enum", values: JOB_TYPES };

/** BLOCK_JOB_COMPLETED's members; READY and CANCELLED carry the same without `error`. */
const blockJobProgress = {
  type: jobType,
  device: { type: "str" },
  len: { type: "int" },
  offset: { type: "int" },
  speed: { type: "int" },
} as const satisfies ArgsSpec;

export const QMP_EVENTS: EventSpecs = {
  /** qapi/block-export.json: an export is gone (block-export-del, nbd-server-remove/-stop, quit). */
  BLOCK_EXPORT_DELETED: { id: { type: "str" } },
  JOB_STATUS_CHANGE: { id: { type: "str" }, status: { type: "enum", values: JOB_STATUSES } },
  BLOCK_JOB_READY: blockJobProgress,
  BLOCK_JOB_PENDING: { type: jobType, id: { type: "str" } },
  BLOCK_JOB_COMPLETED: { ...blockJobProgress, error: { type: "str", optional: true } },
  BLOCK_JOB_CANCELLED: blockJobProgress,
  BLOCK_JOB_ERROR: {
    device: { type: "str" },
    operation: { type: "enum", values: ["read", "write"] },
    // QEMU's BlockErrorAction: what the job did about it (an on-*-error policy of enospc becomes
    // stop or report).
    action: { type: "enum", values: ["ignore", "report", "stop"] },
  },
  BLOCK_JOB_DEGRADED: { type: jobType, device: { type: "str" }, reason: { type: "str" } },
  BLOCK_JOB_RESYNCED: {
    type: jobType,
    device: { type: "str" },
    "missed-bytes": { type: "int", optional: true },
  },
};
