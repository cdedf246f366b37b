/**
 * The subcommands that talk to a running daemon over its QMP socket: `qmp` runs any command, `backup`
 * starts drive-backup and follows the job to its end, `jobs` lists block jobs. Each connects, does its
 * work and exits with 0 on success, 1 on a failure (the reason on stderr) and 130 after Ctrl-C.
 */
import * as path from "node:path";
import { Command, InvalidArgumentError, Option } from "commander";
import { parseSize } from "../core/units.js";
import { QmpClient, type QmpEvent } from "../qmp/client.js";
import { QmpError } from "../qmp/errors.js";
import { formatBytes, percent, ProgressReporter } from "./progress.js";
import { parseQmpArgs, QmpArgsError } from "./qmp-args.js";

/** Where the CLI looks for the daemon's QMP socket when neither --socket nor $DRIVETAP_QMP is given. */
export const DEFAULT_QMP_SOCKET = "/tmp/drivetap-qmp.sock";
/** How long to wait for the QMP greeting: a socket that is not QMP (the NBD one) never sends it. */
export const QMP_CONNECT_TIMEOUT_MS = 5_000;
/** How often `backup` asks for the job's progress. */
export const PROGRESS_POLL_MS = 200;
/** Longest timer Node allows; a backup has no deadline of its own. */
const TIMER_MAX_MS = 2 ** 31 - 1;
const EXIT_SIGINT = 130;

export const SOCKET_HELP = `the daemon's QMP socket (default: $DRIVETAP_QMP, else ${DEFAULT_QMP_SOCKET})`;

export function defaultQmpSocket(): string {
  return process.env.DRIVETAP_QMP || DEFAULT_QMP_SOCKET;
}

/** A failure to report as `drivetap NAME: message` with an exit code. */
export class CliFailure extends Error {
  readonly exitCode: number;
  constructor(message: string, exitCode = 1) {
    super(message);
    this.exitCode = exitCode;
  }
}

/** Runs an action and exits with its code; any failure is one line on stderr. */
export async function runAction(name: string, action: () => Promise<number>): Promise<never> {
  let code: number;
  try {
    code = await action();
  } catch (err) {
    let message: string;
    if (err instanceof QmpError) message = `${err.errorClass}: ${err.message}`;
    else message = (err as Error).message;
    process.stderr.write(`drivetap ${name}: ${message}\n`);
    code = err instanceof CliFailure ? err.exitCode : 1;
  }
  process.exit(code);
}

export async function connect(socketPath: string): Promise<QmpClient> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () =>
        reject(
          new CliFailure(
            `no QMP greeting on ${socketPath} within ${QMP_CONNECT_TIMEOUT_MS / 1000} s: is it the daemon's ` +
              `QMP socket (the --qmp path given to drivetap serve), not its NBD socket?`,
          ),
        ),
      QMP_CONNECT_TIMEOUT_MS,
    );
  });
  try {
    return await Promise.race([QmpClient.connect(socketPath), timeout]);
  } catch (err) {
    if (err instanceof CliFailure) throw err;
    const code = (err as NodeJS.ErrnoException).code;
    const why =
      code === "ENOENT"
        ? "no such socket"
        : code === "ECONNREFUSED"
          ? "connection refused (nothing is listening)"
          : (err as Error).message;
    throw new CliFailure(
      `cannot connect to the QMP socket ${socketPath}: ${why}. Start the daemon with ` +
        `'drivetap serve --qmp ${socketPath}', or point to its socket with --socket or $DRIVETAP_QMP.`,
    );
  } finally {
    clearTimeout(timer);
  }
}

/** `--socket` in a hint, when the socket is not the one the CLI would find by itself. */
function socketHint(socketPath: string): string {
  return socketPath === defaultQmpSocket() ? "" : ` --socket ${socketPath}`;
}

// ---- drivetap qmp ------------------------------------------------------------------------------------

interface SocketOptions {
  socket?: string;
}

async function qmpAction(command: string, words: string[], opts: SocketOptions): Promise<number> {
  let args: Record<string, unknown> | undefined;
  try {
    args = parseQmpArgs(words);
  } catch (err) {
    if (err instanceof QmpArgsError) throw new CliFailure(`${err.message} (see drivetap qmp --help)`);
    throw err;
  }
  const client = await connect(opts.socket ?? defaultQmpSocket());
  try {
    const ret = await client.execute(command, args);
    process.stdout.write(JSON.stringify(ret, null, 2) + "\n");
    return 0;
  } finally {
    client.close();
  }
}

// ---- drivetap backup ---------------------------------------------------------------------------------

const SYNC_MODES = ["full", "top", "none", "stream", "incremental"] as const;
/** The sync modes whose job ends by itself (the others run until cancelled). */
const SYNC_MODES_WITH_END: readonly SyncMode[] = ["full", "top", "incremental"];
type SyncMode = (typeof SYNC_MODES)[number];
const ERROR_ACTIONS = ["report", "ignore", "stop", "enospc"];

interface BackupOptions extends SocketOptions {
  sync: SyncMode;
  target: string;
  device: string;
  jobId?: string;
  speed?: number;
  mode?: "existing" | "absolute-paths";
  format?: "raw" | "qcow2";
  bitmap?: string;
  onSourceError?: string;
  onTargetError?: string;
  detach?: boolean;
}

interface BlockJobInfo {
  device: string;
  type: string;
  len: number;
  offset: number;
  speed: number;
  status: string;
  "io-status": string;
  error?: string;
}

function sizeOption(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

function isJobEnd(jobId: string): (e: QmpEvent) => boolean {
  return (e) =>
    (e.event === "BLOCK_JOB_COMPLETED" || e.event === "BLOCK_JOB_CANCELLED") && e.data.device === jobId;
}

async function backupAction(opts: BackupOptions): Promise<number> {
  const socketPath = opts.socket ?? defaultQmpSocket();
  const jobId = opts.jobId ?? opts.device;
  // The daemon resolves a relative target against its own directory; the user means ours.
  const target = path.resolve(opts.target);
  const args: Record<string, unknown> = { "job-id": jobId, device: opts.device, target, sync: opts.sync };
  if (opts.speed !== undefined) args.speed = opts.speed;
  if (opts.mode !== undefined) args.mode = opts.mode;
  if (opts.format !== undefined) args.format = opts.format;
  if (opts.bitmap !== undefined) args.bitmap = opts.bitmap;
  if (opts.onSourceError !== undefined) args["on-source-error"] = opts.onSourceError;
  if (opts.onTargetError !== undefined) args["on-target-error"] = opts.onTargetError;

  const client = await connect(socketPath);
  const hasEnd = SYNC_MODES_WITH_END.includes(opts.sync);
  const follow = hasEnd && !opts.detach;
  // From here a Ctrl-C cancels the job rather than leaving it running unwatched.
  let interrupted = false;
  let started = false;
  let cancelRequested = false;
  const requestCancel = (): void => {
    if (cancelRequested) return;
    cancelRequested = true;
    // On a terminal, end the progress bar's line first.
    process.stderr.write(`${process.stderr.isTTY ? "\n" : ""}drivetap backup: cancelling job ${jobId}\n`);
    client.execute("block-job-cancel", { device: jobId }).catch((err: Error) => {
      // Already ending: its end event still arrives.
      process.stderr.write(`drivetap backup: block-job-cancel: ${err.message}\n`);
    });
  };
  if (follow) {
    process.on("SIGINT", () => {
      if (interrupted) {
        process.stderr.write(
          `drivetap backup: second interrupt, exiting; job ${jobId} may still be ending\n`,
        );
        process.exit(EXIT_SIGINT);
      }
      interrupted = true;
      if (started) requestCancel();
    });
  }

  await client.execute("drive-backup", args);
  started = true;
  const cancelHint = `drivetap qmp${socketHint(socketPath)} block-job-cancel device=${jobId}`;
  if (!follow) {
    const follower = hasEnd ? `follow with: drivetap jobs${socketHint(socketPath)}; ` : "";
    process.stdout.write(`job ${jobId} started (sync ${opts.sync}); ${follower}cancel with: ${cancelHint}\n`);
    client.close();
    return 0;
  }
  if (interrupted) requestCancel();
  return await followJob(client, jobId, socketPath, () => interrupted);
}

/** Shows progress until the job's end event; returns the exit code. */
async function followJob(
  client: QmpClient,
  jobId: string,
  socketPath: string,
  interrupted: () => boolean,
): Promise<number> {
  const isEnd = isJobEnd(jobId);
  const ended = client.waitForEvent(isEnd, TIMER_MAX_MS);
  ended.catch(() => undefined);
  const progress = new ProgressReporter(process.stderr, `backup ${jobId}:`);
  let errorEventsSeen = 0;
  let ignoredReported = false;
  let end: QmpEvent | undefined;
  try {
    for (;;) {
      // The end event precedes, on the socket, any reply that no longer lists the job.
      end = client.events.find(isEnd);
      if (end) break;
      const jobs = (await client.execute("query-block-jobs")) as BlockJobInfo[];
      end = client.events.find(isEnd);
      if (end) break;
      const info = jobs.find((j) => j.device === jobId);
      if (!info) throw new CliFailure(`job ${jobId} disappeared without an end event`);
      progress.update({
        offset: info.offset,
        len: info.len,
        status: info.status,
        ioStatus: info["io-status"],
      });
      const errors = client.events.filter((e) => e.event === "BLOCK_JOB_ERROR" && e.data.device === jobId);
      for (const e of errors.slice(errorEventsSeen)) {
        if (e.data.action === "stop") {
          progress.finish();
          process.stderr.write(
            `drivetap backup: ${String(e.data.operation)} error; job ${jobId} is paused. ` +
              `Resume with: drivetap qmp${socketHint(socketPath)} block-job-resume device=${jobId}\n`,
          );
        } else if (e.data.action === "ignore" && !ignoredReported) {
          ignoredReported = true;
          progress.finish();
          process.stderr.write(
            `drivetap backup: ${String(e.data.operation)} error ignored; the job goes on\n`,
          );
        }
      }
      errorEventsSeen = errors.length;
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([ended, new Promise((resolve) => (timer = setTimeout(resolve, PROGRESS_POLL_MS)))]);
      clearTimeout(timer);
    }
  } catch (err) {
    // The error message starts on a line of its own.
    progress.finish();
    throw err;
  }
  client.close();
  const offset = Number(end.data.offset);
  const len = Number(end.data.len);
  progress.update({ offset, len, status: "concluded", ioStatus: "ok" }, true);
  progress.finish();
  if (end.event === "BLOCK_JOB_CANCELLED") {
    if (interrupted()) {
      process.stderr.write(`drivetap backup: job ${jobId} cancelled\n`);
      return EXIT_SIGINT;
    }
    throw new CliFailure(`job ${jobId} was cancelled`);
  }
  if (typeof end.data.error === "string") throw new CliFailure(`job ${jobId} failed: ${end.data.error}`);
  process.stdout.write(`backup complete: ${offset} bytes\n`);
  return 0;
}

// ---- drivetap jobs -----------------------------------------------------------------------------------

interface JobsOptions extends SocketOptions {
  json?: boolean;
}

function table(rows: string[][]): string {
  const widths = rows[0].map((_, col) => Math.max(...rows.map((r) => r[col].length)));
  return rows
    .map(
      (r) =>
        r
          .map((cell, col) => cell.padEnd(widths[col]))
          .join("  ")
          .trimEnd() + "\n",
    )
    .join("");
}

async function jobsAction(opts: JobsOptions): Promise<number> {
  const client = await connect(opts.socket ?? defaultQmpSocket());
  let jobs: BlockJobInfo[];
  try {
    jobs = (await client.execute("query-block-jobs")) as BlockJobInfo[];
  } finally {
    client.close();
  }
  if (opts.json) {
    process.stdout.write(JSON.stringify(jobs, null, 2) + "\n");
    return 0;
  }
  if (jobs.length === 0) {
    process.stdout.write("no block jobs\n");
    return 0;
  }
  const rows = [["ID", "TYPE", "STATUS", "PROGRESS", "SPEED", "IO-STATUS"]];
  for (const j of jobs) {
    rows.push([
      j.device,
      j.type,
      j.error === undefined ? j.status : `${j.status} (error: ${j.error})`,
      `${formatBytes(j.offset)}/${formatBytes(j.len)}` + (j.len > 0 ? ` ${percent(j.offset, j.len)}%` : ""),
      j.speed > 0 ? `${formatBytes(j.speed)}/s` : "unlimited",
      j["io-status"],
    ]);
  }
  process.stdout.write(table(rows));
  return 0;
}

// ---- registration ------------------------------------------------------------------------------------

export function addQmpCommands(program: Command): void {
  program
    .command("qmp")
    .description("Run one QMP command on a running daemon and print its return value as JSON")
    .argument(
      "<command>",
      "a QMP command, spelled as QEMU spells it (query-block-jobs, block-job-cancel, ...)",
    )
    .argument("[args...]", "one JSON object, or key=value pairs")
    .option("--socket <path>", SOCKET_HELP)
    .addHelpText(
      "after",
      `
Arguments are either one JSON object or key=value pairs. A value that parses as JSON is taken as JSON
(numbers, true, false, null, objects, "quoted strings"); anything else is a string. Dotted keys build
nested objects: file.driver=file file.filename=/x gives {"file": {"driver": "file", "filename": "/x"}}.

The return value is printed as JSON on stdout (exit 0). A QMP error prints
"drivetap qmp: <ErrorClass>: <description>" on stderr and exits 1.

Examples:
  drivetap qmp query-version
  drivetap qmp query-block-jobs
  drivetap qmp block-job-set-speed device=disk0 speed=1048576
  drivetap qmp block-job-cancel device=disk0
  drivetap qmp blockdev-add driver=raw node-name=img1 file.driver=file file.filename=/tmp/other.img
  drivetap qmp blockdev-add '{"driver": "memory", "node-name": "scratch", "size": 67108864}'
  DRIVETAP_QMP=/run/drivetap/qmp.sock drivetap qmp query-commands`,
    )
    .action((command: string, words: string[], opts: SocketOptions) =>
      runAction("qmp", () => qmpAction(command, words, opts)),
    );

  program
    .command("backup")
    .description("Back up a disk to a file (drive-backup) and, for jobs with an end, show progress")
    .addOption(
      new Option("--sync <mode>", "what to copy (see below)").choices(SYNC_MODES).makeOptionMandatory(),
    )
    .requiredOption("--target <file>", "the target image (relative paths are taken from here)")
    .option("--device <node>", "the source node", "disk0")
    .option("--job-id <id>", "the job's id (default: the device name)")
    .option(
      "--speed <size>",
      "copy at most this many bytes per second (e.g. 1048576, 64M; 0 = unlimited)",
      sizeOption,
    )
    .addOption(
      new Option("--mode <mode>", "absolute-paths (default) creates the target, existing opens it").choices([
        "existing",
        "absolute-paths",
      ]),
    )
    .addOption(
      new Option(
        "--format <format>",
        "the target's format (default: the disk's for a new target, probed for an existing one)",
      ).choices(["raw", "qcow2"]),
    )
    .option("--bitmap <name>", "with incremental: the dirty bitmap that says what to copy")
    .addOption(
      new Option("--on-source-error <action>", "what a read error does to the job").choices(ERROR_ACTIONS),
    )
    .addOption(
      new Option("--on-target-error <action>", "what a target error does to the job").choices(ERROR_ACTIONS),
    )
    .option("--detach", "with full or top: start the job and return without waiting")
    .option("--socket <path>", SOCKET_HELP)
    .addHelpText(
      "after",
      `
Sync modes:
  full    the target becomes the disk as it was when the job started
  top     like full, but only allocated regions are copied
  none    only copy-before-write: before a region is first overwritten, its old data goes to the
          target; the target ends with the old data of every region overwritten after the start and
          zeros elsewhere
  stream  every write, write-zeroes and discard after the start is applied to the target too; the
          job runs until cancelled
  incremental  only the clusters dirty in --bitmap, which is then cleared of what was copied;
          into a qcow2 overlay of the previous backup (--mode existing), unchanged clusters stay
          unallocated and read from it

full, top and incremental show a progress bar on stderr until the job ends; Ctrl-C cancels the job (exit 130).
none and stream start the job and return; cancel them with drivetap qmp block-job-cancel device=ID.

Examples:
  drivetap backup --sync full --target /backup/disk.img
  drivetap backup --sync full --target /backup/disk.img --speed 64M --detach
  drivetap backup --sync stream --target /tmp/copy.img --job-id copy1
  drivetap backup --sync incremental --bitmap b0 --mode existing --target /backup/inc1.qcow2
  drivetap qmp block-job-cancel device=copy1`,
    )
    .action((opts: BackupOptions) => runAction("backup", () => backupAction(opts)));

  program
    .command("jobs")
    .description("List block jobs: id, type, status, progress, speed limit, io-status")
    .option("--json", "print query-block-jobs' answer as JSON")
    .option("--socket <path>", SOCKET_HELP)
    .action((opts: JobsOptions) => runAction("jobs", () => jobsAction(opts)));
}
