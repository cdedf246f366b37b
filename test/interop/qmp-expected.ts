/**
 * Expected QMP shapes recorded from QEMU 7.2's QAPI schema (qapi/block-core.json, qapi/block-export.json,
 * qapi/job.json, qapi/qom.json, qapi/control.json), as the installed qemu-storage-daemon 7.2 reports it
 * through query-qmp-schema (its compiled QAPI: the same members and types). Not drivetap's output: the
 * conformance test checks drivetap against these. A shape is a JSON type name, `[element]` for an
 * array, or an object of members (`name?` = optional). Enums are "string"; deeper nesting "object".
 */
import type { ShapeSpec } from "../helpers/qmp-shapes.js";

/**
 * Each command drivetap shares with QEMU 7.2's storage daemon, with every argument member QEMU's
 * schema gives it (for a union: the base and every variant's members; for blockdev-add, BlockdevOptions'
 * base and the file, raw, null-co and nbd variants, the QEMU drivers drivetap has).
 */
export const QEMU_COMMAND_ARGS: Readonly<Record<string, readonly string[]>> = {
  "query-block": [],
  "query-block-jobs": [],
  "drive-backup": [
    "job-id",
    "device",
    "sync",
    "speed",
    "bitmap",
    "bitmap-mode",
    "compress",
    "on-source-error",
    "on-target-error",
    "auto-finalize",
    "auto-dismiss",
    "filter-node-name",
    "x-perf",
    "target",
    "format",
    "mode",
  ],
  "blockdev-backup": [
    "job-id",
    "device",
    "sync",
    "speed",
    "bitmap",
    "bitmap-mode",
    "compress",
    "on-source-error",
    "on-target-error",
    "auto-finalize",
    "auto-dismiss",
    "filter-node-name",
    "x-perf",
    "target",
  ],
  "query-named-block-nodes": ["flat"],
  "drive-mirror": [
    "job-id",
    "device",
    "target",
    "format",
    "node-name",
    "replaces",
    "sync",
    "mode",
    "speed",
    "granularity",
    "buf-size",
    "on-source-error",
    "on-target-error",
    "unmap",
    "copy-mode",
    "auto-finalize",
    "auto-dismiss",
  ],
  "block-dirty-bitmap-add": ["node", "name", "granularity", "persistent", "disabled"],
  "block-dirty-bitmap-remove": ["node", "name"],
  "block-dirty-bitmap-clear": ["node", "name"],
  "block-dirty-bitmap-enable": ["node", "name"],
  "block-dirty-bitmap-disable": ["node", "name"],
  "block-dirty-bitmap-merge": ["node", "target", "bitmaps"],
  "blockdev-mirror": [
    "job-id",
    "device",
    "target",
    "replaces",
    "sync",
    "speed",
    "granularity",
    "buf-size",
    "on-source-error",
    "on-target-error",
    "filter-node-name",
    "copy-mode",
    "auto-finalize",
    "auto-dismiss",
  ],
  "block-job-set-speed": ["device", "speed"],
  "block-job-cancel": ["device", "force"],
  "block-job-pause": ["device"],
  "block-job-resume": ["device"],
  "block-job-complete": ["device"],
  "block-job-dismiss": ["id"],
  "block-job-finalize": ["id"],
  "blockdev-add": [
    "driver",
    "node-name",
    "discard",
    "cache",
    "read-only",
    "auto-read-only",
    "force-share",
    "detect-zeroes",
    "filename",
    "pr-manager",
    "locking",
    "aio",
    "aio-max-batch",
    "drop-cache",
    "x-check-cache-dropped",
    "file",
    "offset",
    "size",
    "latency-ns",
    "read-zeroes",
    "server",
    "export",
    "tls-creds",
    "tls-hostname",
    "x-dirty-bitmap",
    "reconnect-delay",
    "open-timeout",
    // BlockdevOptionsThrottle
    "throttle-group",
    // BlockdevOptionsGenericCOWFormat (qcow2)
    "backing",
  ],
  "blockdev-del": ["node-name"],
  "job-pause": ["id"],
  "job-resume": ["id"],
  "job-cancel": ["id"],
  "job-complete": ["id"],
  "job-dismiss": ["id"],
  "job-finalize": ["id"],
  "query-jobs": [],
  "block-export-add": [
    "type",
    "id",
    "fixed-iothread",
    "iothread",
    "node-name",
    "writable",
    "writethrough",
    "name",
    "description",
    "bitmaps",
    "allocation-depth",
    "addr",
    "logical-block-size",
    "num-queues",
    "mountpoint",
    "growable",
    "allow-other",
    "queue-size",
    "serial",
  ],
  "block-export-del": ["id", "mode"],
  "query-block-exports": [],
  qmp_capabilities: ["enable"],
  "query-version": [],
  "query-commands": [],
  quit: [],
  "query-qmp-schema": [],
  "object-add": [
    "qom-type",
    "id",
    "policy",
    "rules",
    "filename",
    "refresh",
    "service",
    "identity",
    "if",
    "canbus",
    "primary_in",
    "secondary_in",
    "outdev",
    "iothread",
    "notify_dev",
    "compare_timeout",
    "expired_scan_cycle",
    "max_queue_size",
    "vnet_hdr_support",
    "queues",
    "chardev",
    "addr",
    "id-list",
    "netdev",
    "queue",
    "status",
    "position",
    "insert",
    "interval",
    "file",
    "maxlen",
    "indev",
    "name",
    "server",
    "port",
    "x-origin",
    "y-origin",
    "width",
    "height",
    "evdev",
    "grab_all",
    "repeat",
    "grab-toggle",
    "aio-max-batch",
    "thread-pool-min",
    "thread-pool-max",
    "poll-max-ns",
    "poll-grow",
    "poll-shrink",
    "dump",
    "host-nodes",
    "merge",
    "prealloc",
    "prealloc-threads",
    "prealloc-context",
    "share",
    "reserve",
    "size",
    "x-use-canonical-path-for-ramblock-id",
    "align",
    "discard-data",
    "mem-path",
    "pmem",
    "readonly",
    "hugetlb",
    "hugetlbsize",
    "seal",
    "path",
    "log",
    "opened",
    "loaded",
    "format",
    "keyid",
    "iv",
    "data",
    "serial",
    "sev-device",
    "dh-cert-file",
    "session-file",
    "handle",
    "cbitpos",
    "reduced-phys-bits",
    "kernel-hashes",
    "cpu-affinity",
    "node-affinity",
    "limits",
    "x-iops-total",
    "x-iops-total-max",
    "x-iops-total-max-length",
    "x-iops-read",
    "x-iops-read-max",
    "x-iops-read-max-length",
    "x-iops-write",
    "x-iops-write-max",
    "x-iops-write-max-length",
    "x-bps-total",
    "x-bps-total-max",
    "x-bps-total-max-length",
    "x-bps-read",
    "x-bps-read-max",
    "x-bps-read-max-length",
    "x-bps-write",
    "x-bps-write-max",
    "x-bps-write-max-length",
    "x-iops-size",
    "verify-peer",
    "dir",
    "endpoint",
    "priority",
    "username",
    "sanity-check",
    "passwordid",
    "fd",
    "devid",
    "socket",
    "device",
  ],
  "object-del": ["id"],
  transaction: ["actions", "properties"],
  "nbd-server-start": ["addr", "tls-creds", "tls-authz", "max-connections"],
  "nbd-server-stop": [],
  "nbd-server-add": ["name", "description", "device", "writable", "bitmap"],
  "nbd-server-remove": ["name", "mode"],
  "blockdev-create": ["job-id", "options"],
  block_resize: ["device", "node-name", "size"],
  "query-blockstats": ["query-nodes"],
};

/**
 * blockdev-add options of drivetap's own drivers (error-inject, journal; no QEMU driver has them). They
 * name options of drivers QEMU does not have, so they replace no QEMU member.
 */
export const DRIVETAP_DRIVER_OPTIONS: readonly string[] = ["fail-reads", "fail-writes", "fail-flush", "data"];

/** BlockJobInfo (qapi/block-core.json), one entry of query-block-jobs. */
const BLOCK_JOB_INFO: ShapeSpec = {
  type: "string",
  device: "string",
  len: "int",
  offset: "int",
  busy: "boolean",
  paused: "boolean",
  speed: "int",
  "io-status": "string",
  ready: "boolean",
  status: "string",
  "auto-finalize": "boolean",
  "auto-dismiss": "boolean",
  "error?": "string",
};

/** BlockDirtyInfo (qapi/block-core.json). */
const BLOCK_DIRTY_INFO: ShapeSpec = {
  "name?": "string",
  count: "int",
  granularity: "int",
  recording: "boolean",
  busy: "boolean",
  persistent: "boolean",
  "inconsistent?": "boolean",
};

/** ImageInfo (qapi/block-core.json), without the recursive backing-image and the snapshot list. */
const IMAGE_INFO: ShapeSpec = {
  filename: "string",
  format: "string",
  "dirty-flag?": "boolean",
  "actual-size?": "int",
  "virtual-size": "int",
  "cluster-size?": "int",
  "encrypted?": "boolean",
  "compressed?": "boolean",
  "backing-filename?": "string",
  "full-backing-filename?": "string",
  "backing-filename-format?": "string",
  "snapshots?": ["object"],
  "backing-image?": "object",
  "format-specific?": "object",
};

/** BlockDeviceInfo (qapi/block-core.json): query-named-block-nodes, BlockInfo's inserted. */
const BLOCK_DEVICE_INFO: ShapeSpec = {
  file: "string",
  "node-name?": "string",
  ro: "boolean",
  drv: "string",
  "backing_file?": "string",
  backing_file_depth: "int",
  encrypted: "boolean",
  detect_zeroes: "string",
  bps: "int",
  bps_rd: "int",
  bps_wr: "int",
  iops: "int",
  iops_rd: "int",
  iops_wr: "int",
  image: IMAGE_INFO,
  "bps_max?": "int",
  "bps_rd_max?": "int",
  "bps_wr_max?": "int",
  "iops_max?": "int",
  "iops_rd_max?": "int",
  "iops_wr_max?": "int",
  "bps_max_length?": "int",
  "bps_rd_max_length?": "int",
  "bps_wr_max_length?": "int",
  "iops_max_length?": "int",
  "iops_rd_max_length?": "int",
  "iops_wr_max_length?": "int",
  "iops_size?": "int",
  "group?": "string",
  cache: { writeback: "boolean", direct: "boolean", "no-flush": "boolean" },
  write_threshold: "int",
  "dirty-bitmaps?": [BLOCK_DIRTY_INFO],
};

/** BlockDeviceStats (qapi/block-core.json); timed_stats' BlockDeviceTimedStats entries as objects. */
const BLOCK_DEVICE_STATS: ShapeSpec = {
  rd_bytes: "int",
  wr_bytes: "int",
  unmap_bytes: "int",
  rd_operations: "int",
  wr_operations: "int",
  flush_operations: "int",
  unmap_operations: "int",
  rd_total_time_ns: "int",
  wr_total_time_ns: "int",
  flush_total_time_ns: "int",
  unmap_total_time_ns: "int",
  wr_highest_offset: "int",
  rd_merged: "int",
  wr_merged: "int",
  unmap_merged: "int",
  "idle_time_ns?": "int",
  failed_rd_operations: "int",
  failed_wr_operations: "int",
  failed_flush_operations: "int",
  failed_unmap_operations: "int",
  invalid_rd_operations: "int",
  invalid_wr_operations: "int",
  invalid_flush_operations: "int",
  invalid_unmap_operations: "int",
  account_invalid: "boolean",
  account_failed: "boolean",
  timed_stats: ["object"],
  "rd_latency_histogram?": "object",
  "wr_latency_histogram?": "object",
  "flush_latency_histogram?": "object",
};

/**
 * BlockStatsSpecific (qapi/block-core.json): the union's base and the members of its file variant
 * (BlockStatsSpecificFile), the only driver drivetap reports them for.
 */
const BLOCK_STATS_SPECIFIC: ShapeSpec = {
  driver: "string",
  "discard-nb-ok?": "int",
  "discard-nb-failed?": "int",
  "discard-bytes-ok?": "int",
};

/** BlockStats (qapi/block-core.json), recursive through `parent` and `backing`: two levels checked. */
const BLOCK_STATS_INNER: ShapeSpec = {
  "device?": "string",
  "qdev?": "string",
  "node-name?": "string",
  stats: BLOCK_DEVICE_STATS,
  "driver-specific?": BLOCK_STATS_SPECIFIC,
  "parent?": "object",
  "backing?": "object",
};
const BLOCK_STATS: ShapeSpec = {
  ...BLOCK_STATS_INNER,
  "parent?": BLOCK_STATS_INNER,
  "backing?": BLOCK_STATS_INNER,
};

/** The return value of each query command, by its QAPI type. */
export const QEMU_RETURNS: Readonly<Record<string, ShapeSpec>> = {
  /** VersionInfo (qapi/control.json). */
  "query-version": { qemu: { major: "int", minor: "int", micro: "int" }, package: "string" },
  /** [CommandInfo] (qapi/control.json). */
  "query-commands": [{ name: "string" }],
  "query-block-jobs": [BLOCK_JOB_INFO],
  /** [JobInfo] (qapi/job.json). */
  "query-jobs": [
    {
      id: "string",
      type: "string",
      status: "string",
      "current-progress": "int",
      "total-progress": "int",
      "error?": "string",
    },
  ],
  /** [BlockExportInfo] (qapi/block-export.json). */
  "query-block-exports": [
    { id: "string", type: "string", "node-name": "string", "shutting-down": "boolean" },
  ],
  "query-named-block-nodes": [BLOCK_DEVICE_INFO],
  /** [BlockInfo] (qapi/block-core.json); `type` is deprecated but still required in 7.2. */
  "query-block": [
    {
      device: "string",
      "qdev?": "string",
      type: "string",
      removable: "boolean",
      locked: "boolean",
      "inserted?": BLOCK_DEVICE_INFO,
      "tray_open?": "boolean",
      "io-status?": "string",
    },
  ],
  /** [BlockStats] (qapi/block-core.json). */
  "query-blockstats": [BLOCK_STATS],
};

/** BLOCK_JOB_COMPLETED's data (qapi/block-core.json); READY and CANCELLED have it without error. */
const BLOCK_JOB_PROGRESS = {
  type: "string",
  device: "string",
  len: "int",
  offset: "int",
  speed: "int",
} as const;

/** Each event's data. */
export const QEMU_EVENTS: Readonly<Record<string, ShapeSpec>> = {
  /** qapi/job.json. */
  JOB_STATUS_CHANGE: { id: "string", status: "string" },
  /** qapi/block-core.json. */
  BLOCK_JOB_READY: BLOCK_JOB_PROGRESS,
  BLOCK_JOB_PENDING: { type: "string", id: "string" },
  BLOCK_JOB_COMPLETED: { ...BLOCK_JOB_PROGRESS, "error?": "string" },
  BLOCK_JOB_CANCELLED: BLOCK_JOB_PROGRESS,
  BLOCK_JOB_ERROR: { device: "string", operation: "string", action: "string" },
};

/**
 * Event sequences of QEMU's job state machine (qapi/job.json's JobStatus transitions, as job.c emits
 * them), JOB_STATUS_CHANGE written as its status; QEMU's drain blip (paused, running after running)
 * taken out (test/helpers/qmp-shapes.ts).
 */
export const QEMU_JOB_SEQUENCES: Readonly<Record<string, readonly string[]>> = {
  "backup, auto-finalize, auto-dismiss": [
    "created",
    "running",
    "waiting",
    "pending",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
  ],
  "backup sync=none, cancelled": [
    "created",
    "running",
    "aborting",
    "BLOCK_JOB_CANCELLED",
    "concluded",
    "null",
  ],
  "mirror, ready, completed": [
    "created",
    "running",
    "ready",
    "BLOCK_JOB_READY",
    "waiting",
    "pending",
    "BLOCK_JOB_COMPLETED",
    "concluded",
    "null",
  ],
};

/** The node the recorded session's daemons are started with (`--blockdev`). */
export const QSD_ERROR_SESSION_BLOCKDEV = "driver=null-co,node-name=n0,size=1048576";

export interface SessionRow {
  readonly command: string;
  readonly args?: Record<string, unknown>;
  /** QEMU's error, or "ok" when the command succeeds. */
  readonly reply: { readonly class: string; readonly desc: string } | "ok";
}
/**
 * One QMP session against a fresh qemu-storage-daemon 7.2 started with
 * `--blockdev driver=null-co,node-name=n0,size=1048576` and no NBD server, in order (later rows rely
 * on earlier ones: the server started, export e0 added, objects a0 and l1 created), with QEMU's reply
 * to each: its error class and text, or `ok` for a success. `SOCK` stands for a unix socket path of
 * the test's. Recorded from the installed qemu-storage-daemon; the conformance test replays it
 * against both that daemon and `drivetap storage-daemon` with the same command line.
 */
export const QSD_ERROR_SESSION: readonly SessionRow[] = [
  {
    command: "nbd-server-add",
    args: { device: "n0" },
    reply: { class: "GenericError", desc: "NBD server not running" },
  },
  {
    command: "nbd-server-remove",
    args: { name: "x" },
    reply: { class: "GenericError", desc: "Export 'x' is not found" },
  },
  { command: "nbd-server-stop", reply: { class: "GenericError", desc: "NBD server not running" } },
  {
    command: "nbd-server-start",
    args: {},
    reply: { class: "GenericError", desc: "Parameter 'addr' is missing" },
  },
  {
    command: "nbd-server-start",
    args: { addr: { type: "bogus" } },
    reply: { class: "GenericError", desc: "Parameter 'type' does not accept value 'bogus'" },
  },
  {
    command: "nbd-server-start",
    args: { addr: { type: "unix", data: { path: "SOCK" } }, "max-connections": -1 },
    reply: { class: "GenericError", desc: "Parameter 'max-connections' expects uint32_t" },
  },
  {
    command: "nbd-server-start",
    args: { addr: { type: "unix", data: { path: "SOCK" } }, "tls-creds": "nope" },
    reply: { class: "GenericError", desc: "No TLS credentials with id 'nope'" },
  },
  { command: "nbd-server-start", args: { addr: { type: "unix", data: { path: "SOCK" } } }, reply: "ok" },
  {
    command: "nbd-server-start",
    args: { addr: { type: "unix", data: { path: "SOCK" } } },
    reply: { class: "GenericError", desc: "NBD server already running" },
  },
  {
    command: "nbd-server-add",
    args: {},
    reply: { class: "GenericError", desc: "Parameter 'device' is missing" },
  },
  {
    command: "nbd-server-add",
    args: { device: "nope" },
    reply: { class: "GenericError", desc: "Cannot find device='nope' nor node-name='nope'" },
  },
  { command: "nbd-server-add", args: { device: "n0", name: "e0" }, reply: "ok" },
  {
    command: "nbd-server-add",
    args: { device: "n0", name: "e0" },
    reply: { class: "GenericError", desc: "Block export id 'e0' is already in use" },
  },
  {
    command: "nbd-server-add",
    args: { device: "n0", name: "e1", bitmap: "nope" },
    reply: { class: "GenericError", desc: "Bitmap 'nope' is not found" },
  },
  {
    command: "nbd-server-add",
    args: { device: "n0", name: "e2", writable: "yes" },
    reply: { class: "GenericError", desc: "Invalid parameter type for 'writable', expected: boolean" },
  },
  {
    command: "nbd-server-remove",
    args: { name: "nope" },
    reply: { class: "GenericError", desc: "Export 'nope' is not found" },
  },
  {
    command: "nbd-server-remove",
    args: { name: "e0", mode: "bogus" },
    reply: { class: "GenericError", desc: "Parameter 'mode' does not accept value 'bogus'" },
  },
  {
    command: "nbd-server-remove",
    args: {},
    reply: { class: "GenericError", desc: "Parameter 'name' is missing" },
  },
  { command: "nbd-server-remove", args: { name: "e0" }, reply: "ok" },
  {
    command: "nbd-server-stop",
    args: { x: 1 },
    reply: { class: "GenericError", desc: "Parameter 'x' is unexpected" },
  },
  {
    command: "block_resize",
    args: { "node-name": "nope", size: 1 },
    reply: { class: "GenericError", desc: "Cannot find device='' nor node-name='nope'" },
  },
  {
    command: "block_resize",
    args: { device: "nope", size: 1 },
    reply: { class: "GenericError", desc: "Cannot find device='nope' nor node-name=''" },
  },
  {
    command: "block_resize",
    args: { size: 1 },
    reply: { class: "GenericError", desc: "Cannot find device='' nor node-name=''" },
  },
  {
    command: "block_resize",
    args: { "node-name": "n0" },
    reply: { class: "GenericError", desc: "Parameter 'size' is missing" },
  },
  {
    command: "block_resize",
    args: { "node-name": "n0", size: -1 },
    reply: { class: "GenericError", desc: "Parameter 'size' expects a >0 size" },
  },
  {
    command: "block_resize",
    args: { "node-name": "n0", size: "big" },
    reply: { class: "GenericError", desc: "Invalid parameter type for 'size', expected: integer" },
  },
  {
    command: "block_resize",
    args: { "node-name": "n0", size: 4096 },
    reply: { class: "GenericError", desc: "Image format driver does not support resize" },
  },
  {
    command: "blockdev-create",
    args: { options: { driver: "file", filename: "/nonexistent/x", size: 0 } },
    reply: { class: "GenericError", desc: "Parameter 'job-id' is missing" },
  },
  {
    command: "blockdev-create",
    args: { "job-id": "c0" },
    reply: { class: "GenericError", desc: "Parameter 'options' is missing" },
  },
  {
    command: "blockdev-create",
    args: { "job-id": "c0", options: { driver: "nope" } },
    reply: { class: "GenericError", desc: "Parameter 'driver' does not accept value 'nope'" },
  },
  {
    command: "blockdev-create",
    args: { "job-id": "c0", options: { driver: "file" } },
    reply: { class: "GenericError", desc: "Parameter 'options.filename' is missing" },
  },
  {
    command: "blockdev-create",
    args: { "job-id": "c0", options: { driver: "file", filename: "/nonexistent/x" } },
    reply: { class: "GenericError", desc: "Parameter 'options.size' is missing" },
  },
  {
    command: "blockdev-create",
    args: { "job-id": "0bad", options: { driver: "file", filename: "/nonexistent/x", size: 0 } },
    reply: { class: "GenericError", desc: "Invalid job ID '0bad'" },
  },
  {
    command: "query-blockstats",
    args: { "query-nodes": "yes" },
    reply: { class: "GenericError", desc: "Invalid parameter type for 'query-nodes', expected: boolean" },
  },
  {
    command: "query-blockstats",
    args: { bogus: true },
    reply: { class: "GenericError", desc: "Parameter 'bogus' is unexpected" },
  },
  {
    command: "object-add",
    args: { "qom-type": "authz-simple", id: "a0" },
    reply: { class: "GenericError", desc: "Parameter 'identity' is missing" },
  },
  { command: "object-add", args: { "qom-type": "authz-simple", id: "a0", identity: "CN=x" }, reply: "ok" },
  {
    command: "object-add",
    args: { "qom-type": "authz-simple", id: "a0", identity: "CN=x" },
    reply: {
      class: "GenericError",
      desc: "attempt to add duplicate property 'a0' to object (type 'container')",
    },
  },
  {
    command: "object-add",
    args: { "qom-type": "authz-simple", id: "a1", identity: "CN=x", policy: "allow" },
    reply: { class: "GenericError", desc: "Parameter 'policy' is unexpected" },
  },
  {
    command: "object-add",
    args: { "qom-type": "authz-list", id: "l0", policy: "maybe" },
    reply: { class: "GenericError", desc: "Parameter 'policy' does not accept value 'maybe'" },
  },
  {
    command: "object-add",
    args: { "qom-type": "authz-list", id: "l0", rules: [{ match: "x" }] },
    reply: { class: "GenericError", desc: "Parameter 'rules[0].policy' is missing" },
  },
  {
    command: "object-add",
    args: { "qom-type": "authz-list", id: "l0", rules: [{ match: "x", policy: "allow", format: "regex" }] },
    reply: { class: "GenericError", desc: "Parameter 'format' does not accept value 'regex'" },
  },
  {
    command: "object-add",
    args: { "qom-type": "authz-list", id: "l0", rules: "x" },
    reply: { class: "GenericError", desc: "Invalid parameter type for 'rules', expected: array" },
  },
  {
    command: "object-add",
    args: {
      "qom-type": "authz-list",
      id: "l1",
      policy: "allow",
      rules: [{ match: "CN=*", policy: "deny", format: "glob" }],
    },
    reply: "ok",
  },
  {
    command: "object-add",
    args: { "qom-type": "nope", id: "z" },
    reply: { class: "GenericError", desc: "Parameter 'qom-type' does not accept value 'nope'" },
  },
  {
    command: "object-del",
    args: { id: "nope" },
    reply: { class: "GenericError", desc: "object 'nope' not found" },
  },
  { command: "nbd-server-stop", reply: "ok" },
  { command: "nbd-server-stop", reply: { class: "GenericError", desc: "NBD server not running" } },
];
