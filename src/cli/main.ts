#!/usr/bin/env node
/**
 * The drivetap command line. `serve` parses its options and hands a config to the daemon; `qmp`, `backup`
 * and `jobs` (qmp-commands.ts) talk to a running daemon over its QMP socket.
 */
import { Command, InvalidArgumentError } from "commander";
import pino from "pino";
import { FileDriver } from "../block/drivers/file.js";
import {
  closeIoUring,
  DEFAULT_IO_ENGINE_MODE,
  IO_ENGINE_MODES,
  parseIoEngineMode,
  setProcessIoEngine,
  type IoEngineMode,
} from "../block/drivers/io-engine/index.js";
import {
  defaultPollMaxNs,
  parsePollMaxNs,
  POLL_MAX_NS_DEFAULT,
  POLL_MAX_NS_LIMIT,
  setLoopPolling,
} from "../block/drivers/io-engine/loop-poll.js";
import { formatSize, parseSize } from "../core/units.js";
import { Daemon, NULL_IMAGE, type ServeConfig } from "../daemon/daemon.js";
import { NODE_NAME_PATTERN } from "../graph/node-factory.js";
import { listedPeers, type ServerTlsConfig, type TlsMode } from "../nbd/server/tls-upgrade.js";
import { loadPsk, loadX509 } from "../nbd/tls/credentials.js";
import type { Logger } from "../core/log.js";
import { addTapCommand } from "./tap.js";
import { addJournalCommands } from "./journal-commands.js";
import { addQmpCommands, DEFAULT_QMP_SOCKET } from "./qmp-commands.js";
import { addVerifyCommand } from "./verify-command.js";
import { addMirrorCommand } from "./mirror-command.js";
import { storageDaemonMain } from "./storage-daemon.js";
import { addCreateCommand, formatOption } from "./create-command.js";
import type { ImageFormat } from "../block/drivers/qcow2/image.js";

const DEFAULT_SIZE = "1G";
const DEFAULT_PORT = 10809;

function sizeOption(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

function portOption(value: string): number {
  const n = Number(value);
  if (!Number.isInteger(n) || n < 0 || n > 65535) throw new InvalidArgumentError(`not a port: ${value}`);
  return n;
}

function ioEngineOption(value: string): IoEngineMode {
  const mode = parseIoEngineMode(value);
  if (mode === undefined) throw new InvalidArgumentError(`expected one of ${IO_ENGINE_MODES.join(", ")}`);
  return mode;
}

function pollMaxNsOption(value: string): number {
  const n = parsePollMaxNs(value);
  if (n === undefined)
    throw new InvalidArgumentError(`expected a whole number of ns, 0 to ${POLL_MAX_NS_LIMIT}`);
  return n;
}

function tlsModeOption(value: string): TlsMode {
  if (value !== "off" && value !== "on" && value !== "require")
    throw new InvalidArgumentError(`expected off, on or require, not ${value}`);
  return value;
}

/** Repeatable: each occurrence adds one name (a DN has commas of its own, so no comma lists). */
function collect(value: string, previous: string[] | undefined): string[] {
  return [...(previous ?? []), value];
}

interface ServeOptions {
  format?: ImageFormat;
  socket?: string;
  port?: number;
  bind: string;
  exportName: string;
  nodeName: string;
  readOnly?: boolean;
  forceShare?: boolean;
  size: number;
  description?: string;
  verbose?: boolean;
  asyncIo?: boolean;
  ioEngine?: IoEngineMode;
  pollMaxNs?: number;
  qmp?: string;
  maxBufferMemory?: number;
  tls?: TlsMode;
  tlsCreds?: string;
  tlsVerifyPeer?: boolean;
  tlsPsk?: string;
  tlsAuthz?: string[];
}

/**
 * The TLS settings: credentials make TLS required unless `--tls on` (or `off`) says otherwise, as
 * qemu-nbd requires TLS whenever it has credentials. Throws on combinations that mean nothing.
 */
function tlsConfig(opts: ServeOptions): ServerTlsConfig | undefined {
  if (opts.tlsCreds !== undefined && opts.tlsPsk !== undefined)
    throw new InvalidArgumentError("use --tls-creds or --tls-psk, not both");
  if (opts.tlsVerifyPeer && opts.tlsCreds === undefined)
    throw new InvalidArgumentError(
      "--tls-verify-peer checks x509 client certificates: it needs --tls-creds DIR",
    );
  const haveCreds = opts.tlsCreds !== undefined || opts.tlsPsk !== undefined;
  const mode = opts.tls ?? (haveCreds ? "require" : "off");
  if (mode !== "off" && !haveCreds)
    throw new InvalidArgumentError(`--tls ${mode} needs credentials: --tls-creds DIR or --tls-psk FILE`);
  if (opts.tlsAuthz && mode === "off")
    throw new InvalidArgumentError("--tls-authz needs TLS: --tls-creds DIR or --tls-psk FILE");
  // With --tls on a plaintext client never meets the peer checks, so they would check nothing.
  if (mode === "on" && (opts.tlsAuthz || opts.tlsVerifyPeer))
    throw new InvalidArgumentError(
      `${opts.tlsAuthz ? "--tls-authz" : "--tls-verify-peer"} needs --tls require: with --tls on, a plaintext client would skip it`,
    );
  if (mode === "off") return undefined;
  const authz = opts.tlsAuthz ? listedPeers(opts.tlsAuthz) : null;
  // A certificate subject means something only once the certificate is verified.
  const creds =
    opts.tlsPsk !== undefined
      ? loadPsk(opts.tlsPsk, "server")
      : loadX509(opts.tlsCreds!, "server", Boolean(opts.tlsVerifyPeer) || authz !== null);
  return { mode, creds, authz };
}

/** A client command line that works against this server, for the "try:" line. */
function tryCommand(uri: string, tls: ServerTlsConfig | undefined): string {
  if (!tls) return `nbdinfo '${uri}'`;
  const sep = uri.includes("?") ? "&" : "?";
  if (tls.creds.kind === "x509") return `nbdinfo '${uri}${sep}tls-certificates=${tls.creds.dir}'`;
  const identity = encodeURIComponent([...tls.creds.keys.keys()][0]);
  const withUser = uri.replace(/^(nbds(?:\+unix)?:\/\/)/, `$1${identity}@`);
  return `nbdinfo '${withUser}${sep}tls-psk-file=${tls.creds.file}'`;
}

async function serve(image: string | undefined, opts: ServeOptions): Promise<void> {
  const log = pino(
    { name: "drivetap", level: opts.verbose ? "debug" : "warn", base: undefined },
    pino.destination({ fd: 2, sync: false }),
  ) as unknown as Logger;
  if (opts.socket && opts.port !== undefined)
    throw new InvalidArgumentError("use --socket or --port, not both");
  // QMP names the node, and the image's file node is derived from it (daemon.ts imageFileNodeName).
  if (!NODE_NAME_PATTERN.test(opts.nodeName)) {
    throw new InvalidArgumentError(`Invalid node-name: '${opts.nodeName}'`);
  }
  if (opts.forceShare && !opts.readOnly) {
    throw new InvalidArgumentError(
      "--force-share needs --read-only (force-share=on can only be used with read-only images)",
    );
  }
  const tls = tlsConfig(opts);
  let daemonRef: Daemon | null = null;
  let stopping = false;
  const stop = (signal: string): void => {
    if (stopping) {
      process.stderr.write(`drivetap: second ${signal}, exiting without waiting\n`);
      process.exit(1);
    }
    stopping = true;
    log.info({ signal }, "stopping");
    // The ring is drained and torn down after every node has closed its files.
    (daemonRef ? daemonRef.close() : Promise.resolve()).then(closeIoUring).then(
      () => process.exit(0),
      (err) => {
        process.stderr.write(`drivetap: error while stopping: ${(err as Error).message}\n`);
        process.exit(1);
      },
    );
  };
  if (opts.format !== undefined && image === undefined)
    throw new InvalidArgumentError("--format needs an IMAGE");
  const config: ServeConfig = {
    image,
    format: opts.format,
    sizeBytes: opts.size,
    readOnly: opts.readOnly ?? false,
    forceShare: opts.forceShare ?? false,
    exportName: opts.exportName,
    nodeName: opts.nodeName,
    description: opts.description,
    listen: opts.socket
      ? { type: "unix", path: opts.socket }
      : { type: "inet", host: opts.bind, port: opts.port ?? DEFAULT_PORT },
    log,
    asyncIo: opts.asyncIo,
    qmpPath: opts.qmp,
    bufferMemoryBytes: opts.maxBufferMemory,
    tls,
    onQuit: () => stop("quit"),
  };
  // Chosen before anything opens a file; io_uring asked for and refused ends here, with the reason.
  setProcessIoEngine(opts.asyncIo ? "threads" : (opts.ioEngine ?? DEFAULT_IO_ENGINE_MODE));
  const pollMaxNs = opts.pollMaxNs ?? defaultPollMaxNs();
  const polling = setLoopPolling(pollMaxNs);
  daemonRef = await Daemon.start(config);
  const daemon = daemonRef;
  log.debug({ native: FileDriver.nativeAvailable }, "file driver native addon");
  if (daemon.file?.driver instanceof FileDriver && !daemon.file.driver.locked) {
    process.stderr.write(
      "drivetap: warning: the native addon is missing, so the image is not locked: other programs can open it\n",
    );
  }
  // Before the ready line: a supervisor may signal as soon as it reads it.
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGTERM", () => stop("SIGTERM"));
  followNpx(() => stop("SIGTERM"));
  const file = daemon.file?.driver;
  const engine = file instanceof FileDriver ? `, I/O engine ${file.ioEngine}` : "";
  log.debug({ pollMaxNs, polling }, "event loop polling");
  const what = image === undefined ? `built-in ${formatSize(opts.size)} sparse memory disk` : image;
  process.stdout.write(
    `drivetap: serving ${daemon.node.name} (${what}, ${daemon.node.size()} bytes${config.readOnly ? ", read-only" : ""}${engine})\n` +
      (opts.qmp ? `drivetap: QMP at ${opts.qmp}\n` : "") +
      `drivetap: ready at ${daemon.uri}\n` +
      `drivetap: try: ${tryCommand(daemon.uri, tls)}   (Ctrl-C stops; in-flight writes finish and are flushed)\n`,
  );
}

/** How often a daemon started by npx checks that npx is still its parent. */
const PARENT_CHECK_MS = 250;

/**
 * `npx drivetap serve &` and later `kill %1` signal npx, which exits without passing the signal on,
 * leaving the daemon behind. Under npx, the daemon stops (as on SIGTERM) when npx is gone.
 */
function followNpx(stopDaemon: () => void): void {
  if (process.env.npm_command !== "exec") return;
  const parent = process.ppid;
  const timer = setInterval(() => {
    if (process.ppid === parent) return;
    clearInterval(timer);
    stopDaemon();
  }, PARENT_CHECK_MS);
  timer.unref();
}

const program = new Command();
program
  .name("drivetap")
  .description("A userspace block-storage daemon: serves disk images over NBD and runs block jobs on them.")
  .showHelpAfterError();

program
  .command("serve")
  .description(
    `Serve IMAGE (raw or qcow2) over NBD; without IMAGE, a built-in sparse memory disk (${NULL_IMAGE} serves the null driver)`,
  )
  .argument("[image]", "disk image to serve (raw or qcow2)")
  .option(
    "-f, --format <fmt>",
    "the image's format, raw or qcow2; default: probed by its magic (a raw guess is warned about)",
    formatOption,
  )
  .option("--socket <path>", "listen on this unix socket instead of TCP")
  .option("--port <n>", `TCP port (default ${DEFAULT_PORT})`, portOption)
  .option("--bind <addr>", "TCP address to bind", "127.0.0.1")
  .option("--export-name <name>", "NBD export name", "")
  .option("--node-name <name>", "block node name", "disk0")
  .option("--read-only", "refuse writes")
  .option(
    "--force-share",
    "with --read-only: let other programs open the image even for writing (QEMU's force-share); " +
      "by default the image is locked against other writers",
  )
  .option("--size <size>", "size of the built-in disk", sizeOption, parseSize(DEFAULT_SIZE))
  .option("--description <text>", "export description shown to clients")
  .option(
    "--qmp <path>",
    "serve QMP (QEMU's control protocol) on this unix socket (mode 0600); off unless given. The qmp, " +
      `backup and jobs commands look for it at $DRIVETAP_QMP, else ${DEFAULT_QMP_SOCKET}`,
  )
  .option(
    "--max-buffer-memory <size>",
    "budget for NBD request and reply buffers, shared by every connection (default 192M, at least 80M)",
    sizeOption,
  )
  .option(
    "--tls-creds <dir>",
    "serve TLS with x509 credentials from DIR (QEMU's layout: ca-cert.pem, server-cert.pem, server-key.pem)",
  )
  .option(
    "--tls-verify-peer",
    "with --tls-creds: clients must present a certificate signed by DIR/ca-cert.pem",
  )
  .option(
    "--tls-psk <file>",
    "serve TLS-PSK (TLS 1.2) with the keys in FILE (keys.psk: identity:hexkey lines)",
  )
  .option(
    "--tls <mode>",
    "off, on (TLS offered, plaintext allowed) or require (every option before STARTTLS refused); " +
      "default: require with credentials, off without",
    tlsModeOption,
  )
  .option(
    "--tls-authz <name>",
    "accept only this TLS peer: a client certificate subject as `openssl x509 -noout -subject -nameopt RFC2253` " +
      "prints it (implies --tls-verify-peer), or a PSK identity; repeat for more",
    collect,
  )
  .option(
    "--async-io",
    "always use threadpool I/O in the file driver (for comparison; = --io-engine threads)",
  )
  .option(
    "--io-engine <engine>",
    "the file driver's I/O: auto (sync, the fastest measured here), io_uring, sync or threads",
    ioEngineOption,
  )
  .option(
    "--poll-max-ns <ns>",
    `poll for new requests up to this long before the event loop sleeps, adaptively (QEMU's iothread ` +
      `poll-max-ns; 0 turns it off; default ${POLL_MAX_NS_DEFAULT})`,
    pollMaxNsOption,
  )
  .option("-v, --verbose", "debug logs on stderr")
  .action(async (image: string | undefined, opts: ServeOptions) => {
    try {
      await serve(image, opts);
    } catch (err) {
      process.stderr.write(`drivetap serve: ${(err as Error).message}\n`);
      process.exit(1);
    }
  });

// Listed for --help; the arguments are QSD's, parsed by storage-daemon.ts, not by commander.
program
  .command("storage-daemon")
  .description(
    "qemu-storage-daemon's command line (--blockdev, --nbd-server, --export, --object, --chardev, --monitor, --pidfile, --daemonize); -h lists it",
  )
  .allowUnknownOption();

addQmpCommands(program);
addJournalCommands(program);
addTapCommand(program);
addMirrorCommand(program);
addCreateCommand(program);
addVerifyCommand(program);

if (process.argv[2] === "storage-daemon") await storageDaemonMain(process.argv.slice(3));
else await program.parseAsync(process.argv);
