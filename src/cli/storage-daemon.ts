/**
 * `drivetap storage-daemon`: qemu-storage-daemon's command line, so a script can swap the program
 * name and keep its arguments. Every option is first parsed and checked against the schema of the
 * QMP command it maps to (--blockdev: blockdev-add, --export: block-export-add, --nbd-server:
 * nbd-server-start's NbdServerOptions, --object: object-add), so bad syntax, unknown options and
 * unsupported drivers end the process with exit 1 before anything is opened or created. Then the
 * options run in command-line order, as QSD runs them; the first failure closes what was opened
 * and exits 1. `--daemonize` re-runs the same command line as a detached child and exits 0 only once
 * that child reports it is ready.
 */
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import pino from "pino";
import type { Logger } from "../core/log.js";
import { DRIVETAP_VERSION, openMonitor } from "../daemon/daemon.js";
import { BlockGraph } from "../graph/block-graph.js";
import { blockCommands, blockdevAddArgs } from "../qmp/commands/block.js";
import { blockExportAddArgs, exportCommands } from "../qmp/commands/exports.js";
import {
  FLAT_SOCKET_ADDRESS,
  NBD_SERVER_OPTIONS,
  nbdServerOptionsCommand,
} from "../qmp/commands/nbd-server.js";
import { objectAddArgs, objectCommands } from "../qmp/commands/objects.js";
import { SUPPORTED_OBJECT_TYPES } from "../graph/objects.js";
import { QmpError } from "../qmp/errors.js";
import { validateArgs, type ArgsSpec } from "../qmp/schema.js";
import type { QmpCommandDef, QmpServer } from "../qmp/server.js";
import { KeyvalError, parseKeyval, typeKeyval } from "./keyval.js";
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

const PROGRAM = "drivetap storage-daemon";
/** The environment variable that tells a --daemonize child which fd reports readiness. */
const READY_FD_ENV = "DRIVETAP_STORAGE_DAEMON_READY_FD";
const READY_FD = 3;
/** Options on one command line; QSD has no bound, a script never comes near. */
export const OPTIONS_MAX = 4096;

/** A command-line error: printed as QSD prints it, exit 1. */
export class UsageError extends Error {}

type OptionName =
  | "help"
  | "version"
  | "trace"
  | "blockdev"
  | "chardev"
  | "daemonize"
  | "export"
  | "monitor"
  | "nbd-server"
  | "object"
  | "pidfile"
  | "io-engine"
  | "poll-max-ns";

const LONG_OPTIONS: Readonly<Record<OptionName, { readonly arg: boolean; readonly short?: string }>> = {
  help: { arg: false, short: "h" },
  version: { arg: false, short: "V" },
  trace: { arg: true, short: "T" },
  blockdev: { arg: true },
  chardev: { arg: true },
  daemonize: { arg: false },
  export: { arg: true },
  monitor: { arg: true },
  "nbd-server": { arg: true },
  object: { arg: true },
  pidfile: { arg: true },
  /** drivetap's own: the file driver's I/O engine (QSD has none; `aio` per node is QEMU's). */
  "io-engine": { arg: true },
  /** drivetap's own: adaptive polling of the one event loop (QEMU's iothread poll-max-ns). */
  "poll-max-ns": { arg: true },
};

export interface RawOption {
  readonly name: OptionName;
  readonly arg?: string;
}

/** getopt_long's view of argv: long options (unique prefixes too, `--opt=value`), -h, -V, -T. */
export function splitOptions(argv: readonly string[]): RawOption[] {
  const out: RawOption[] = [];
  const names = Object.keys(LONG_OPTIONS) as OptionName[];
  for (let i = 0; i < argv.length; i++) {
    if (out.length >= OPTIONS_MAX) throw new UsageError(`more than ${OPTIONS_MAX} options`);
    const a = argv[i];
    let name: OptionName;
    let inline: string | undefined;
    if (a.startsWith("--") && a.length > 2) {
      const eq = a.indexOf("=");
      const given = eq < 0 ? a.slice(2) : a.slice(2, eq);
      inline = eq < 0 ? undefined : a.slice(eq + 1);
      const exact = names.find((n) => n === given);
      const prefixed = names.filter((n) => n.startsWith(given));
      if (exact) name = exact;
      else if (prefixed.length === 1) name = prefixed[0];
      else if (prefixed.length > 1) {
        throw new UsageError(
          `option '--${given}' is ambiguous; possibilities: ${prefixed.map((n) => `'--${n}'`).join(" ")}`,
        );
      } else throw new UsageError(`unrecognized option '--${given}'`);
      if (!LONG_OPTIONS[name].arg && inline !== undefined) {
        throw new UsageError(`option '--${name}' doesn't allow an argument`);
      }
    } else if (a.startsWith("-") && a.length > 1) {
      const found = names.find((n) => LONG_OPTIONS[n].short === a[1]);
      if (!found) throw new UsageError(`invalid option -- '${a[1]}'`);
      name = found;
      if (a.length > 2) {
        if (!LONG_OPTIONS[name].arg) throw new UsageError(`invalid option -- '${a[2]}'`);
        inline = a.slice(2);
      }
    } else {
      throw new UsageError(`${a}: Unexpected argument`);
    }
    if (LONG_OPTIONS[name].arg && inline === undefined) {
      if (i + 1 >= argv.length) {
        const spelled = a.startsWith("--") ? `'--${name}'` : `-- '${a[1]}'`;
        throw new UsageError(
          a.startsWith("--")
            ? `option ${spelled} requires an argument`
            : `option requires an argument ${spelled}`,
        );
      }
      inline = argv[++i];
    }
    out.push({ name, arg: inline });
  }
  return out;
}

/** One checked step, ready to run. */
type Step =
  | {
      readonly kind: "command";
      readonly option: string;
      readonly command: string;
      readonly args: Record<string, unknown>;
    }
  | { readonly kind: "monitor"; readonly option: string; readonly path: string };

export interface Plan {
  readonly steps: Step[];
  readonly daemonize: boolean;
  readonly pidfile?: string;
  /** --io-engine: how file nodes do their I/O (default: auto). */
  readonly ioEngine?: IoEngineMode;
  /** --poll-max-ns: adaptive polling of the event loop (default: loop-poll.ts's). */
  readonly pollMaxNs?: number;
  /** -h / -V / --object help: print this and exit 0. */
  readonly print?: string;
}

/** The JSON form QSD takes when an argument starts with `{`. */
function parseJson(arg: string): Record<string, unknown> {
  let v: unknown;
  try {
    v = JSON.parse(arg);
  } catch (err) {
    throw new KeyvalError(`JSON parse error, ${(err as Error).message}`);
  }
  if (typeof v !== "object" || v === null || Array.isArray(v))
    throw new KeyvalError("JSON value must be an object");
  return v as Record<string, unknown>;
}

/** The options of an inline `file.*` child and of nbd's `server.*`, for typing keyval strings. */
const CACHE_OPTIONS = {
  direct: { type: "bool", optional: true },
  "no-flush": { type: "bool", optional: true },
} as const satisfies ArgsSpec;
const NESTED_BLOCKDEV = {
  ...blockdevAddArgs,
  "node-name": { type: "str", optional: true },
} as const satisfies ArgsSpec;

function resolveAny(key: string): ArgsSpec | undefined {
  if (key === "file") return NESTED_BLOCKDEV;
  if (key === "server") return FLAT_SOCKET_ADDRESS;
  if (key === "cache") return CACHE_OPTIONS;
  return undefined;
}

/** blockdev-add's checks for a whole tree (inline children included), before anything opens. */
function checkBlockdev(o: Record<string, unknown>, nested: boolean, path = ""): void {
  const spec = nested ? NESTED_BLOCKDEV : blockdevAddArgs;
  const v = validateArgs(spec, o, path);
  if (typeof v.file === "object" && v.file !== null) {
    checkBlockdev(v.file as Record<string, unknown>, true, path === "" ? "file" : `${path}.file`);
  }
  if (v.cache !== undefined) validateArgs(CACHE_OPTIONS, v.cache, path === "" ? "cache" : `${path}.cache`);
}

function typed(arg: string, implied: string | undefined, spec: ArgsSpec): Record<string, unknown> {
  if (arg.startsWith("{")) return parseJson(arg);
  return typeKeyval(parseKeyval(arg, implied), spec, resolveAny);
}

/** Parses and checks the whole command line; opens nothing. */
export function planCommandLine(argv: readonly string[]): Plan {
  const steps: Step[] = [];
  const chardevs = new Map<string, { path: string; used: boolean }>();
  let daemonize = false;
  let pidfile: string | undefined;
  let ioEngine: IoEngineMode | undefined;
  let pollMaxNs: number | undefined;
  for (const o of splitOptions(argv)) {
    if (o.name === "help") return { steps: [], daemonize: false, print: usage() };
    if (o.name === "version") return { steps: [], daemonize: false, print: version() };
    if (o.name === "daemonize") {
      daemonize = true;
      continue;
    }
    const arg = o.arg!;
    const option = `--${o.name} ${arg}`;
    try {
      switch (o.name) {
        case "trace":
          throw new KeyvalError("drivetap has no QEMU trace events (-T/--trace)");
        case "pidfile":
          pidfile = arg;
          break;
        case "poll-max-ns":
          pollMaxNs = parsePollMaxNs(arg);
          if (pollMaxNs === undefined)
            throw new KeyvalError(
              `Invalid poll-max-ns '${arg}': expected a whole number of ns, 0 to ${POLL_MAX_NS_LIMIT}`,
            );
          break;
        case "io-engine":
          ioEngine = parseIoEngineMode(arg);
          if (ioEngine === undefined)
            throw new KeyvalError(
              `Invalid io-engine '${arg}': expected one of ${IO_ENGINE_MODES.join(", ")}`,
            );
          break;
        case "blockdev": {
          const args = typed(arg, "driver", blockdevAddArgs);
          // The driver and the other members first, as QSD: a bad driver is named before node-name.
          checkBlockdev(args, true);
          if (args["node-name"] === undefined)
            throw new KeyvalError("'node-name' must be specified for the root node");
          steps.push({ kind: "command", option, command: "blockdev-add", args });
          break;
        }
        case "export": {
          const args = typed(arg, "type", blockExportAddArgs);
          steps.push({
            kind: "command",
            option,
            command: "block-export-add",
            args: validateArgs(blockExportAddArgs, args),
          });
          break;
        }
        case "nbd-server": {
          const args = typed(arg, undefined, NBD_SERVER_OPTIONS);
          steps.push({
            kind: "command",
            option,
            command: "nbd-server",
            args: validateArgs(NBD_SERVER_OPTIONS, args),
          });
          break;
        }
        case "object": {
          if (arg === "help" || arg === "?") {
            return {
              steps: [],
              daemonize: false,
              print: `List of user creatable objects drivetap supports:\n  ${SUPPORTED_OBJECT_TYPES.join("\n  ")}\n`,
            };
          }
          const args = typed(arg, "qom-type", objectAddArgs);
          steps.push({
            kind: "command",
            option,
            command: "object-add",
            args: validateArgs(objectAddArgs, args),
          });
          break;
        }
        case "chardev": {
          const { id, path } = checkChardev(arg);
          if (chardevs.has(id))
            throw new KeyvalError(`attempt to add duplicate property '${id}' to object (type 'container')`);
          chardevs.set(id, { path, used: false });
          break;
        }
        case "monitor": {
          const m = validateArgs(
            {
              chardev: { type: "str" },
              mode: { type: "enum", values: ["control", "readline"], optional: true },
              pretty: { type: "bool", optional: true },
              id: { type: "str", optional: true },
            },
            typeKeyval(parseKeyval(arg, "chardev"), { pretty: { type: "bool" } }),
          );
          if (m.mode === "readline")
            throw new KeyvalError("drivetap has no human monitor: only mode=control (QMP)");
          if (m.pretty === true) throw new KeyvalError("drivetap does not pretty-print QMP (pretty=on)");
          const c = chardevs.get(m.chardev as string);
          if (!c) throw new KeyvalError(`chardev "${String(m.chardev)}" not found`);
          if (c.used) throw new KeyvalError(`Device '${String(m.chardev)}' is in use`);
          c.used = true;
          steps.push({ kind: "monitor", option, path: c.path });
          break;
        }
      }
    } catch (err) {
      if (err instanceof KeyvalError || err instanceof QmpError)
        throw new UsageError(`${option}: ${err.message}`);
      throw err;
    }
  }
  return { steps, daemonize, pidfile, ioEngine, pollMaxNs };
}

/** QemuOpts' `--chardev socket,id=ID,path=P,server=on,wait=off`: the one kind a QMP monitor uses here. */
function checkChardev(arg: string): { id: string; path: string } {
  const o = parseKeyval(arg, "backend");
  const known = new Set(["backend", "id", "path", "server", "wait"]);
  for (const k of Object.keys(o)) if (!known.has(k)) throw new KeyvalError(`Invalid parameter '${k}'`);
  const s = typeKeyval(o, { server: { type: "bool" }, wait: { type: "bool" } });
  if (s.backend !== "socket") {
    throw new KeyvalError(
      `drivetap supports only socket chardevs (a unix socket for --monitor), not '${String(s.backend)}'`,
    );
  }
  if (typeof s.id !== "string") throw new KeyvalError("Parameter 'id' is missing");
  if (typeof s.path !== "string")
    throw new KeyvalError("drivetap needs path= (a unix socket) for a socket chardev");
  if (s.server !== true) throw new KeyvalError("drivetap only listens: the chardev needs server=on");
  if (s.wait !== false)
    throw new KeyvalError("drivetap does not wait for a monitor client: the chardev needs wait=off");
  return { id: s.id, path: s.path };
}

function usage(): string {
  return `Usage: drivetap storage-daemon [options]
qemu-storage-daemon's command line, served by drivetap

  -h, --help             display this help and exit
  -V, --version          output version information and exit

  --blockdev [driver=]<driver>,node-name=<N>[,read-only=on|off][,driver options...]
                         add a block node (blockdev-add; or JSON starting with '{')
                         drivers: file, raw, memory, null-co, journal, nbd
  --chardev socket,id=<id>,path=<socket-path>,server=on,wait=off
                         a unix socket for --monitor
  --daemonize            run in the background; the parent exits once startup is complete
  --export [type=]nbd,id=<id>,node-name=<node-name>[,name=<export-name>][,writable=on|off]
           [,description=<text>][,bitmaps.0=<name>...]
                         export the node over NBD (requires --nbd-server)
  --monitor [chardev=]<id>[,mode=control]
                         serve QMP on the chardev (repeatable: one graph, events to all)
  --nbd-server addr.type=unix,addr.path=<path> | addr.type=inet,addr.host=<host>,addr.port=<port>
               [,tls-creds=<id>][,tls-authz=<id>][,max-connections=<n>]
                         start the NBD server
  --object help          list the object types drivetap can create
  --object <type>,id=<id>[,<property>=<value>...]
                         create an object (object-add): ${SUPPORTED_OBJECT_TYPES.join(", ")}
  --pidfile <path>       write the process ID to a file after startup
  --io-engine auto|io_uring|sync|threads
                         drivetap's: how file nodes do I/O (auto: sync, the fastest measured here)
  --poll-max-ns <ns>     drivetap's: poll for requests up to this long before the loop sleeps,
                         adaptively (QEMU's iothread poll-max-ns; 0: off; default ${POLL_MAX_NS_DEFAULT})

Options run in command-line order.
`;
}

function version(): string {
  return `${PROGRAM} ${DRIVETAP_VERSION.major}.${DRIVETAP_VERSION.minor}.${DRIVETAP_VERSION.micro} (qemu-storage-daemon 7.2's command line)\n`;
}

/** Where the logger writes: stderr until a daemonized child is ready, then nowhere (QSD: /dev/null). */
interface LogSink {
  write(line: string): void;
}

function makeLogger(sink: { current: LogSink }): Logger {
  return pino(
    { name: "drivetap", level: process.env.DRIVETAP_LOG_LEVEL ?? "warn", base: undefined },
    { write: (line: string) => sink.current.write(line) },
  ) as unknown as Logger;
}

/** Runs the plan's steps in order; on the first failure closes what was opened and throws. */
async function runPlan(plan: Plan, graph: BlockGraph, log: Logger, onQuit: () => void): Promise<QmpServer[]> {
  const defs = new Map<string, QmpCommandDef>();
  for (const d of [
    ...blockCommands(graph),
    ...exportCommands(graph),
    ...objectCommands(graph),
    nbdServerOptionsCommand(graph),
  ]) {
    defs.set(d.name, d);
  }
  const monitors: QmpServer[] = [];
  for (const step of plan.steps) {
    try {
      if (step.kind === "monitor") monitors.push(await openMonitor(graph, step.path, log, onQuit));
      else if (step.kind === "command") await defs.get(step.command)!.handler(step.args, { id: 0 });
    } catch (err) {
      await closeAll(graph, monitors);
      throw new UsageError(`${step.option}: ${(err as Error).message}`);
    }
  }
  return monitors;
}

async function closeAll(graph: BlockGraph, monitors: readonly QmpServer[]): Promise<void> {
  try {
    await graph.closeAll();
    await closeIoUring();
  } finally {
    await Promise.all(monitors.map((m) => m.close()));
  }
}

/** Re-runs this command line (minus --daemonize) detached; resolves with the exit code for the parent. */
function daemonize(argv: readonly string[]): Promise<number> {
  const args = argv.filter(
    (a) => a !== "--daemonize" && !(a.startsWith("--dae") && "--daemonize".startsWith(a)),
  );
  const child = spawn(process.execPath, [...process.execArgv, process.argv[1], "storage-daemon", ...args], {
    detached: true,
    stdio: ["ignore", "ignore", "pipe", "pipe"],
    env: { ...process.env, [READY_FD_ENV]: String(READY_FD) },
  });
  return new Promise((resolve) => {
    let settled = false;
    const settle = (code: number): void => {
      if (settled) return;
      settled = true;
      child.stderr!.destroy();
      (child.stdio[READY_FD] as NodeJS.ReadableStream & { destroy(): void }).destroy();
      child.unref();
      resolve(code);
    };
    child.stderr!.on("data", (chunk: Buffer) => process.stderr.write(chunk));
    (child.stdio[READY_FD] as NodeJS.ReadableStream).on("data", () => settle(0));
    child.on("exit", (code) => settle(code === 0 ? 1 : (code ?? 1)));
    child.on("error", (err) => {
      process.stderr.write(`${PROGRAM}: cannot start the daemon: ${err.message}\n`);
      settle(1);
    });
  });
}

/** The whole command: exits the process. */
export async function storageDaemonMain(argv: readonly string[]): Promise<never> {
  let plan: Plan;
  try {
    plan = planCommandLine(argv);
  } catch (err) {
    if (!(err instanceof UsageError)) throw err;
    process.stderr.write(`${PROGRAM}: ${err.message}\n`);
    process.exit(1);
  }
  if (plan.print !== undefined) {
    process.stdout.write(plan.print);
    process.exit(0);
  }
  const readyFd = process.env[READY_FD_ENV];
  if (plan.daemonize && readyFd === undefined) process.exit(await daemonize(argv));

  const sink: { current: LogSink } = { current: { write: (line) => void process.stderr.write(line) } };
  const log = makeLogger(sink);
  const graph = new BlockGraph(log.child({ part: "graph" }));
  let monitors: QmpServer[] = [];
  let stopping = false;
  const stop = (why: string): void => {
    if (stopping) {
      process.stderr.write(`${PROGRAM}: second ${why}, exiting without waiting\n`);
      process.exit(1);
    }
    stopping = true;
    log.info({ why }, "stopping");
    closeAll(graph, monitors).then(
      () => {
        if (plan.pidfile !== undefined) fs.rmSync(plan.pidfile, { force: true });
        process.exit(0);
      },
      (err: Error) => {
        process.stderr.write(`${PROGRAM}: error while stopping: ${err.message}\n`);
        process.exit(1);
      },
    );
  };
  let engine: string;
  try {
    engine = setProcessIoEngine(plan.ioEngine ?? DEFAULT_IO_ENGINE_MODE).name;
    setLoopPolling(plan.pollMaxNs ?? defaultPollMaxNs());
    monitors = await runPlan(plan, graph, log, () => stop("quit"));
    if (plan.pidfile !== undefined) writePidfile(plan.pidfile);
  } catch (err) {
    await closeAll(graph, monitors).catch(() => undefined);
    process.stderr.write(`${PROGRAM}: ${(err as Error).message}\n`);
    process.exit(1);
  }
  process.on("SIGINT", () => stop("SIGINT"));
  process.on("SIGTERM", () => stop("SIGTERM"));
  log.info(
    { nodes: graph.nodes().length, exports: graph.exports().length, ioEngine: engine },
    "storage daemon ready",
  );
  if (readyFd !== undefined) {
    // The parent exits now; from here on, as QSD, nothing is written to the terminal.
    fs.writeSync(Number(readyFd), "ready\n");
    fs.closeSync(Number(readyFd));
    sink.current = { write: () => undefined };
    process.stderr.on("error", () => undefined);
  }
  // Keeps running until a signal or quit.
  return new Promise<never>(() => undefined);
}

/** QSD writes the pid and a newline; a file another live daemon holds is not overwritten. */
function writePidfile(path: string): void {
  try {
    const old = fs.readFileSync(path, "utf8").trim();
    const pid = Number(old);
    if (Number.isInteger(pid) && pid > 0 && pid !== process.pid && isRunning(pid)) {
      throw new UsageError(`Cannot lock pid file '${path}': process ${pid} holds it`);
    }
  } catch (err) {
    if (err instanceof UsageError) throw err;
  }
  try {
    fs.writeFileSync(path, `${process.pid}\n`, { mode: 0o600 });
  } catch (err) {
    throw new UsageError(`cannot create PID file: ${(err as Error).message}`);
  }
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}
