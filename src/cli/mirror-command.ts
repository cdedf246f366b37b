/**
 * `drivetap mirror`: mirrors a served disk to a file (drive-mirror) or to a remote NBD export
 * (blockdev-add driver=nbd, then blockdev-mirror; nbds:// and nbds+unix:// URIs go over TLS with
 * credentials created by object-add from --tls-creds or --tls-psk), shows the bulk copy's progress until
 * BLOCK_JOB_READY, and then either returns with the job keeping the target in sync, or, with
 * --complete, pivots the served disk onto the target and waits for the job to end. Ctrl-C before
 * READY cancels the job. Exit 0 on success, 1 on a failure, 130 after Ctrl-C.
 */
import * as path from "node:path";
import { Command, InvalidArgumentError, Option } from "commander";
import { parseSize } from "../core/units.js";
import type { QmpClient, QmpEvent } from "../qmp/client.js";
import { ProgressReporter } from "./progress.js";
import {
  CliFailure,
  connect,
  defaultQmpSocket,
  PROGRESS_POLL_MS,
  runAction,
  SOCKET_HELP,
} from "./qmp-commands.js";

const EXIT_SIGINT = 130;
const TIMER_MAX_MS = 2 ** 31 - 1;

interface MirrorOptions {
  target: string;
  device: string;
  jobId?: string;
  sync: "full" | "top" | "none";
  copyMode: "background" | "write-blocking";
  speed?: number;
  complete?: boolean;
  socket?: string;
  tlsCreds?: string;
  tlsPsk?: string;
  tlsUsername?: string;
  tlsHostname?: string;
}

/** What an NBD URI names: the nbd node's `server` and `export`, and whether it asks for TLS. */
export interface NbdTarget {
  readonly options: Record<string, unknown>;
  readonly tls: boolean;
}

/**
 * The nbd node's `server` and `export` for an NBD URI: nbd+unix:///EXPORT?socket=P or
 * nbd://H[:P]/EXPORT, and their TLS forms nbds+unix:// and nbds:// (the URI scheme libnbd and
 * QEMU use for "TLS required").
 */
export function nbdTargetFromUri(uri: string): NbdTarget | null {
  if (!/^nbds?(\+unix)?:\/\//.test(uri)) return null;
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new CliFailure(`not an NBD URI: ${uri}`);
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ""));
  const tls = u.protocol.startsWith("nbds");
  if (u.protocol.endsWith("+unix:")) {
    const socket = u.searchParams.get("socket");
    if (!socket) throw new CliFailure(`an ${u.protocol.slice(0, -1)} URI needs ?socket=PATH: ${uri}`);
    return { options: { server: { type: "unix", path: path.resolve(socket) }, export: exportName }, tls };
  }
  // An IPv6 literal comes bracketed.
  const host = u.hostname.replace(/^\[(.*)\]$/, "$1");
  return { options: { server: { type: "inet", host, port: u.port || "10809" }, export: exportName }, tls };
}

/** object-add arguments for the client credentials the TLS options name, or null without them. */
export function tlsObjectFromOptions(
  id: string,
  opts: Pick<MirrorOptions, "tlsCreds" | "tlsPsk" | "tlsUsername">,
): Record<string, unknown> | null {
  if (opts.tlsCreds !== undefined && opts.tlsPsk !== undefined) {
    throw new CliFailure("give either --tls-creds (x509) or --tls-psk, not both");
  }
  if (opts.tlsUsername !== undefined && opts.tlsPsk === undefined) {
    throw new CliFailure("--tls-username goes with --tls-psk");
  }
  if (opts.tlsCreds !== undefined) {
    return { "qom-type": "tls-creds-x509", id, dir: path.resolve(opts.tlsCreds), endpoint: "client" };
  }
  if (opts.tlsPsk !== undefined) {
    return {
      "qom-type": "tls-creds-psk",
      id,
      dir: path.resolve(opts.tlsPsk),
      endpoint: "client",
      ...(opts.tlsUsername !== undefined ? { username: opts.tlsUsername } : {}),
    };
  }
  return null;
}

function sizeOption(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

function jobEvent(jobId: string, names: readonly string[]): (e: QmpEvent) => boolean {
  return (e) => names.includes(e.event) && e.data.device === jobId;
}

async function mirrorAction(opts: MirrorOptions): Promise<number> {
  const socketPath = opts.socket ?? defaultQmpSocket();
  const jobId = opts.jobId ?? opts.device;
  const client = await connect(socketPath);
  const common: Record<string, unknown> = {
    "job-id": jobId,
    device: opts.device,
    sync: opts.sync,
    "copy-mode": opts.copyMode,
  };
  if (opts.speed !== undefined) common.speed = opts.speed;
  const remote = nbdTargetFromUri(opts.target);
  const nodeName = `${jobId}-target`;
  const credsId = `${jobId}-tls`;
  const tlsObject = tlsObjectFromOptions(credsId, opts);
  if (remote?.tls && !tlsObject) {
    throw new CliFailure(`${opts.target} asks for TLS: give --tls-creds DIR or --tls-psk FILE`);
  }
  if (!remote?.tls && (tlsObject || opts.tlsHostname !== undefined)) {
    throw new CliFailure("TLS options need an nbds:// or nbds+unix:// target");
  }
  if (remote) {
    const tls: Record<string, unknown> = {};
    if (tlsObject) {
      await client.execute("object-add", tlsObject);
      tls["tls-creds"] = credsId;
      if (opts.tlsHostname !== undefined) tls["tls-hostname"] = opts.tlsHostname;
    }
    try {
      await client.execute("blockdev-add", {
        driver: "nbd",
        "node-name": nodeName,
        ...remote.options,
        ...tls,
      });
    } catch (err) {
      if (tlsObject) await client.execute("object-del", { id: credsId }).catch(() => undefined);
      throw err;
    }
  }
  let interrupted = false;
  process.on("SIGINT", () => {
    if (interrupted) process.exit(EXIT_SIGINT);
    interrupted = true;
    process.stderr.write(`\ndrivetap mirror: cancelling job ${jobId}\n`);
    client.execute("block-job-cancel", { device: jobId, force: true }).catch(() => undefined);
  });
  if (remote) await client.execute("blockdev-mirror", { ...common, target: nodeName });
  else
    await client.execute("drive-mirror", {
      ...common,
      target: path.resolve(opts.target),
      "node-name": nodeName,
    });

  const ended = jobEvent(jobId, ["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"]);
  await follow(client, jobId, jobEvent(jobId, ["BLOCK_JOB_READY"]), ended);
  const end = client.events.find(ended);
  if (end) {
    client.close();
    if (interrupted) return EXIT_SIGINT;
    throw new CliFailure(`job ${jobId} ended before it was in sync: ${String(end.data.error ?? end.event)}`);
  }
  if (!opts.complete) {
    process.stdout.write(
      `mirror ${jobId} ready: the target is in sync and stays in sync.\n` +
        `  stop, leaving the target a copy: drivetap qmp block-job-cancel device=${jobId}\n` +
        `  switch the disk to the target:   drivetap qmp block-job-complete device=${jobId}\n`,
    );
    client.close();
    return 0;
  }
  await client.execute("block-job-complete", { device: jobId });
  const done = await client.waitForEvent(ended, TIMER_MAX_MS);
  client.close();
  if (typeof done.data.error === "string") throw new CliFailure(`job ${jobId} failed: ${done.data.error}`);
  process.stdout.write(`mirror ${jobId} completed: ${opts.device} now reads and writes the target\n`);
  return 0;
}

/** Shows the copy's progress until `until` or `ended` is seen. */
async function follow(
  client: QmpClient,
  jobId: string,
  until: (e: QmpEvent) => boolean,
  ended: (e: QmpEvent) => boolean,
): Promise<void> {
  const progress = new ProgressReporter(process.stderr, `mirror ${jobId}:`);
  const stop = client.waitForEvent((e) => until(e) || ended(e), TIMER_MAX_MS);
  stop.catch(() => undefined);
  try {
    while (!client.events.some((e) => until(e) || ended(e))) {
      const jobs = (await client.execute("query-block-jobs")) as Array<Record<string, unknown>>;
      const info = jobs.find((j) => j.device === jobId);
      if (info) {
        progress.update({
          offset: Number(info.offset),
          len: Number(info.len),
          status: String(info.status),
          ioStatus: String(info["io-status"]),
        });
      }
      let timer: NodeJS.Timeout | undefined;
      await Promise.race([stop, new Promise((resolve) => (timer = setTimeout(resolve, PROGRESS_POLL_MS)))]);
      clearTimeout(timer);
    }
  } finally {
    progress.finish();
  }
}

export function addMirrorCommand(program: Command): void {
  program
    .command("mirror")
    .description("Mirror a disk to a file or an NBD export and keep it in sync (blockdev-mirror)")
    .requiredOption(
      "--target <file|uri>",
      "a raw file to create, or nbd+unix:///EXPORT?socket=PATH, or nbd://HOST[:PORT]/EXPORT " +
        "(nbds+unix://, nbds://: over TLS)",
    )
    .option(
      "--tls-creds <dir>",
      "TLS with x509 certificates: a directory with ca-cert.pem (and client-cert.pem, client-key.pem)",
    )
    .option(
      "--tls-psk <file>",
      "TLS with a pre-shared key: a keys.psk file (identity:hexkey), or its directory",
    )
    .option("--tls-username <name>", "the PSK identity to use (default: qemu)")
    .option("--tls-hostname <name>", "the name the server's certificate must carry (default: the URI's host)")
    .option("--device <node>", "the source node", "disk0")
    .option("--job-id <id>", "the job's id (default: the device name)")
    .addOption(
      new Option("--sync <mode>", "what the bulk copy covers")
        .choices(["full", "top", "none"])
        .default("full"),
    )
    .addOption(
      new Option("--copy-mode <mode>", "write-blocking: a write is answered once both sides have it")
        .choices(["background", "write-blocking"])
        .default("write-blocking"),
    )
    .option(
      "--speed <size>",
      "bulk copy at most this many bytes per second (e.g. 64M; 0 = unlimited)",
      sizeOption,
    )
    .option("--complete", "once in sync, switch the disk to the target (block-job-complete) and wait")
    .option("--socket <path>", SOCKET_HELP)
    .addHelpText(
      "after",
      `
Shows the bulk copy's progress until the target is in sync (BLOCK_JOB_READY). Then the job keeps the
target in sync, through target outages (it records what the target misses and resyncs when it is
back), until block-job-cancel (the target stays an exact copy) or block-job-complete (the served disk
moves onto the target). Ctrl-C before READY cancels the job.

Examples:
  drivetap mirror --target 'nbd+unix:///?socket=/run/remote.sock'
  drivetap mirror --target nbd://10.0.0.2/disk --copy-mode background --speed 100M
  drivetap mirror --target nbds://backup.example:10809/disk --tls-creds /etc/pki/drivetap
  drivetap mirror --target 'nbds+unix:///?socket=/run/remote.sock' --tls-psk /etc/drivetap/keys.psk \\
      --tls-username drivetap
  drivetap mirror --target /new/disk.img --complete      # move the disk to a new file, live`,
    )
    .action((opts: MirrorOptions) => runAction("mirror", () => mirrorAction(opts)));
}
