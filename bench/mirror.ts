/**
 * The "mirror" part of `npm run bench` (issue 4, item 7): what a write-blocking mirror to a qemu-nbd
 * target costs in drivetap, next to what the same job costs in qemu-storage-daemon (qsd) in the same
 * run. For each workload and round it runs, interleaved: drivetap with no job, drivetap with the
 * mirror, qsd with no job, qsd with the mirror. Each run starts a fresh daemon on the same source image
 * (and, for a mirror, a fresh qemu-nbd on a fresh preallocated target), so runs do not inherit each
 * other's state. The mirror is set up by QMP, identically for both daemons: blockdev-add of an nbd
 * node, blockdev-mirror sync=full copy-mode=write-blocking, and fio starts only after BLOCK_JOB_READY.
 * After fio, the job must still be ready; a block-job-cancel must end in BLOCK_JOB_COMPLETED, and (unless
 * BENCH_MIRROR_VERIFY=0) qemu-img compare must find the target equal to the source, so a mirror that
 * drops writes cannot look fast.
 *
 * BENCH_MIRROR_DAEMONS=drivetap|qsd|both (default both) runs one side alone. A side whose setup fails
 * (for example a drivetap without blockdev-mirror) is reported and skipped for the rest of the run; the
 * other columns are still measured, and the process exits 1.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { QmpError } from "../src/qmp/errors.js";
import { QmpClient, type QmpEvent } from "../src/qmp/client.js";
import {
  CLI,
  JOB_WORKLOADS,
  ROOT,
  ROUNDS,
  RUNTIME_S,
  SIZE,
  median,
  need,
  peakRssBytes,
  printTable,
  qemuNbdArgs,
  runFio,
  stopProcess,
  waitForSocket,
  type Workload,
} from "./common.js";

/** The initial sync=full copy of the whole image runs before READY; generous for a slow disk. */
const READY_TIMEOUT_MS = 600_000;
const CANCEL_TIMEOUT_MS = 120_000;
/** How much of a child's stderr is kept for error messages. */
const STDERR_KEEP_CHARS = 4096;
const JOB_ID = "m0";
const TARGET_NODE = "tgt";
/** qemu-nbd's default export name (no -x). */
const TARGET_EXPORT = "";

type DaemonName = "drivetap" | "qsd";
type Variant = "no job" | "mirror";
const VARIANTS: readonly Variant[] = ["no job", "mirror"];

interface Started {
  readonly proc: ChildProcess;
  /** The tail of the child's stderr. */
  stderr(): string;
}

function startLogged(command: string, args: readonly string[]): Started {
  const proc = spawn(command, args, { stdio: ["ignore", "ignore", "pipe"] });
  let err = "";
  proc.stderr!.setEncoding("utf8").on("data", (s: string) => {
    err = (err + s).slice(-STDERR_KEEP_CHARS);
  });
  proc.on("error", (e) => (err += `\n${command}: ${e.message}`));
  return { proc, stderr: () => err.trim() };
}

export interface MirrorDaemon {
  readonly name: DaemonName;
  /** The node the export serves, which the mirror copies. */
  readonly sourceNode: string;
  /** The command line, with IMAGE, SOCK and QMPSOCK as placeholders, for the report. */
  commandLine(image: string, socket: string, qmpSocket: string): string[];
  /** The fio URI of the export on that socket. */
  uri(socket: string): string;
}

const DAEMONS: readonly MirrorDaemon[] = [
  {
    name: "drivetap",
    sourceNode: "disk0",
    // The file driver does buffered I/O and turns a flush into fdatasync.
    commandLine: (image, socket, qmpSocket) => [
      process.execPath,
      CLI,
      "serve",
      image,
      "--socket",
      socket,
      "--qmp",
      qmpSocket,
    ],
    uri: (socket) => `nbd+unix:///?socket=${socket}`,
  },
  {
    name: "qsd",
    sourceNode: "disk0",
    // cache.direct=off with flushes honoured (the default cache.no-flush=off) and thread-pool AIO: the
    // buffered I/O drivetap's file driver does.
    commandLine: (image, socket, qmpSocket) => [
      "qemu-storage-daemon",
      "--blockdev",
      `driver=file,node-name=file0,filename=${image},cache.direct=off,aio=threads`,
      "--blockdev",
      "driver=raw,node-name=disk0,file=file0",
      "--nbd-server",
      `addr.type=unix,addr.path=${socket}`,
      "--export",
      "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on",
      "--chardev",
      `socket,id=qmp0,path=${qmpSocket},server=on,wait=off`,
      "--monitor",
      "chardev=qmp0",
    ],
    uri: (socket) => `nbd+unix:///disk0?socket=${socket}`,
  },
];

/** The daemons BENCH_MIRROR_DAEMONS selects; throws on a value it does not know. */
export function selectedMirrorDaemons(): readonly MirrorDaemon[] {
  const which = process.env.BENCH_MIRROR_DAEMONS ?? "both";
  if (which === "both") return DAEMONS;
  const d = DAEMONS.find((x) => x.name === which);
  if (!d) throw new Error(`BENCH_MIRROR_DAEMONS must be drivetap, qsd or both, not "${which}"`);
  return [d];
}

function jobEvent(names: readonly string[]): (e: QmpEvent) => boolean {
  return (e) => names.includes(e.event) && e.data.device === JOB_ID;
}

function describe(e: QmpEvent): string {
  return typeof e.data.error === "string" ? `${e.event} (${e.data.error})` : e.event;
}

/** Runs a QMP command, prefixing a failure with what the step was for. */
async function step(qmp: QmpClient, what: string, command: string, args?: Record<string, unknown>) {
  try {
    return await qmp.execute(command, args);
  } catch (e) {
    const detail = e instanceof QmpError ? `${e.errorClass}: ${e.message}` : String(e);
    throw new Error(`${what}: ${command} failed: ${detail}`);
  }
}

/** Sets up the mirror on a connected daemon and resolves once the job is READY. */
async function startMirror(daemon: MirrorDaemon, qmp: QmpClient, targetSocket: string): Promise<void> {
  const commands = (await qmp.execute("query-commands")) as Array<{ name: string }>;
  const missing = ["blockdev-add", "blockdev-mirror", "block-job-cancel"].filter(
    (c) => !commands.some((x) => x.name === c),
  );
  if (missing.length > 0)
    throw new Error(
      `${daemon.name} has no ${missing.join(", ")} command` +
        (daemon.name === "drivetap" ? " yet (issue 4: the NBD client driver and the mirror job)" : ""),
    );
  await step(qmp, `${daemon.name}: adding the NBD target`, "blockdev-add", {
    driver: "nbd",
    "node-name": TARGET_NODE,
    server: { type: "unix", path: targetSocket },
    export: TARGET_EXPORT,
  });
  await step(qmp, `${daemon.name}: starting the mirror`, "blockdev-mirror", {
    "job-id": JOB_ID,
    device: daemon.sourceNode,
    target: TARGET_NODE,
    sync: "full",
    "copy-mode": "write-blocking",
  });
  const e = await qmp.waitForEvent(
    jobEvent(["BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"]),
    READY_TIMEOUT_MS,
  );
  if (e.event !== "BLOCK_JOB_READY")
    throw new Error(`${daemon.name}: mirror ended before READY: ${describe(e)}`);
}

/** Checks the job survived the load, then cancels it and waits for it to complete in sync. */
async function stopMirror(daemon: MirrorDaemon, qmp: QmpClient): Promise<void> {
  const jobs = (await step(qmp, daemon.name, "query-block-jobs")) as Array<Record<string, unknown>>;
  const job = jobs.find((j) => j.device === JOB_ID);
  if (!job || job.status !== "ready")
    throw new Error(
      `${daemon.name}: the mirror is not ready after fio (${job ? `status ${String(job.status)}` : "gone"}` +
        `${qmp.events.some(jobEvent(["BLOCK_JOB_ERROR"])) ? ", after BLOCK_JOB_ERROR" : ""})`,
    );
  await step(qmp, daemon.name, "block-job-cancel", { device: JOB_ID });
  const e = await qmp.waitForEvent(
    jobEvent(["BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"]),
    CANCEL_TIMEOUT_MS,
  );
  if (e.event !== "BLOCK_JOB_COMPLETED" || e.data.error !== undefined)
    throw new Error(`${daemon.name}: cancel after READY ended in ${describe(e)}, not BLOCK_JOB_COMPLETED`);
}

/** The target: a preallocated raw image of the source's size behind qemu-nbd. */
function createTarget(target: string): void {
  fs.rmSync(target, { force: true });
  const args = ["create", "-q", "-f", "raw", "-o", "preallocation=falloc", target, `${SIZE}`];
  const r = spawnSync("qemu-img", args, { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`qemu-img create failed: ${r.stderr}`);
}

function verifyTarget(daemon: MirrorDaemon, image: string, target: string): void {
  const r = spawnSync("qemu-img", ["compare", "-q", "-f", "raw", "-F", "raw", image, target], {
    encoding: "utf8",
  });
  if (r.status !== 0)
    throw new Error(
      `${daemon.name}: the target differs from the source after the mirror (${r.stderr.trim() || `qemu-img compare exit ${r.status}`})`,
    );
}

interface RunResult {
  readonly value: number;
  readonly peakRssBytes: number;
}

async function runOnce(
  daemon: MirrorDaemon,
  variant: Variant,
  w: Workload,
  dir: string,
  image: string,
): Promise<RunResult> {
  const socket = path.join(dir, "mirror-src.sock");
  const qmpSocket = path.join(dir, "mirror-qmp.sock");
  const targetSocket = path.join(dir, "mirror-tgt.sock");
  const target = path.join(dir, "mirror-target.img");
  for (const s of [socket, qmpSocket, targetSocket]) fs.rmSync(s, { force: true });
  const started: Started[] = [];
  let qmp: QmpClient | null = null;
  const explain = (e: unknown): Error => {
    const logs = started.map((s) => s.stderr()).filter((s) => s !== "");
    const message = e instanceof Error ? e.message : String(e);
    return new Error(logs.length > 0 ? `${message}\n  stderr: ${logs.join("\n  stderr: ")}` : message);
  };
  try {
    let tgt: Started | null = null;
    if (variant === "mirror") {
      createTarget(target);
      tgt = startLogged("qemu-nbd", qemuNbdArgs(target, targetSocket));
      started.push(tgt);
    }
    const [command, ...args] = daemon.commandLine(image, socket, qmpSocket);
    const src = startLogged(command, args);
    started.push(src);
    if (tgt) await waitForSocket(targetSocket, tgt.proc);
    await waitForSocket(socket, src.proc);
    await waitForSocket(qmpSocket, src.proc);
    qmp = await QmpClient.connect(qmpSocket);
    if (variant === "mirror") await startMirror(daemon, qmp, targetSocket);
    const value = runFio(daemon.uri(socket), w);
    const rss = peakRssBytes(src.proc.pid!);
    if (variant === "mirror") await stopMirror(daemon, qmp);
    qmp.close();
    qmp = null;
    for (const s of started) await stopProcess(s.proc);
    if (variant === "mirror" && process.env.BENCH_MIRROR_VERIFY !== "0") verifyTarget(daemon, image, target);
    return { value, peakRssBytes: rss };
  } catch (e) {
    throw explain(e);
  } finally {
    qmp?.close();
    for (const s of started) await stopProcess(s.proc);
    fs.rmSync(target, { force: true });
  }
}

export async function benchMirror(
  daemons: readonly MirrorDaemon[],
  dir: string,
  image: string,
): Promise<void> {
  for (const tool of ["qemu-nbd", "qemu-img"]) need(tool);
  if (daemons.some((d) => d.name === "qsd")) need("qemu-storage-daemon");
  const results = new Map<string, number[]>(); // `${daemon}/${variant}/${workload}`
  const failures = new Map<string, string>(); // `${daemon} ${variant}` -> why
  let drivetapRss = 0;
  for (let round = 1; round <= ROUNDS; round++) {
    for (const w of JOB_WORKLOADS) {
      for (const d of daemons) {
        for (const variant of VARIANTS) {
          const column = `${d.name} ${variant}`;
          if (failures.has(column)) continue;
          try {
            const r = await runOnce(d, variant, w, dir, image);
            const key = `${d.name}/${variant}/${w.name}`;
            results.set(key, [...(results.get(key) ?? []), r.value]);
            if (d.name === "drivetap" && variant === "mirror")
              drivetapRss = Math.max(drivetapRss, r.peakRssBytes);
            process.stderr.write(
              `round ${round} ${w.name.padEnd(20)} ${column.padEnd(16)} ${r.value.toFixed(0)} ${w.unit}\n`,
            );
          } catch (e) {
            const why = e instanceof Error ? e.message : String(e);
            failures.set(column, why);
            process.stderr.write(`bench mirror: ${column} FAILED, skipping its other runs: ${why}\n`);
          }
        }
      }
    }
  }

  const med = (d: DaemonName, v: Variant, w: Workload): number =>
    median(results.get(`${d}/${v}/${w.name}`) ?? [NaN]);
  const num = (x: number): string => (Number.isFinite(x) ? x.toFixed(0) : "failed");
  const ratio = (x: number): string => (Number.isFinite(x) ? `${x.toFixed(2)}x` : "-");
  const header = ["workload"];
  for (const d of daemons) header.push(`${d.name} no job`, `${d.name} mirror`, `${d.name} ratio`);
  const both = daemons.length === 2;
  if (both) header.push("drivetap mirror / qsd mirror", "drivetap ratio / qsd ratio");
  const rows = JOB_WORKLOADS.map((w) => {
    const row = [`${w.name} (${w.unit})`];
    for (const d of daemons) {
      const a = med(d.name, "no job", w);
      const b = med(d.name, "mirror", w);
      row.push(num(a), num(b), ratio(b / a));
    }
    if (both) {
      const dt = med("drivetap", "mirror", w) / med("drivetap", "no job", w);
      const q = med("qsd", "mirror", w) / med("qsd", "no job", w);
      row.push(ratio(med("drivetap", "mirror", w) / med("qsd", "mirror", w)), ratio(dt / q));
    }
    return row;
  });

  console.log(
    `\nwrite-blocking mirror (blockdev-mirror sync=full, measured after BLOCK_JOB_READY) to qemu-nbd on a unix socket; ` +
      `fio ioengine=nbd, ${SIZE} bytes raw image, ${RUNTIME_S}s per run, median of ${ROUNDS} interleaved rounds; ` +
      `ratio = mirror / no job`,
  );
  printTable(header, rows);
  console.log("");
  for (const d of daemons) {
    const line = d
      .commandLine("IMAGE", "SOCK", "QMPSOCK")
      .map((a) => (a === process.execPath ? "node" : a === CLI ? path.relative(ROOT, CLI) : a));
    console.log(`${d.name}: ${line.join(" ")}`);
  }
  console.log(
    `target: qemu-img create -f raw -o preallocation=falloc TARGET ${SIZE}; qemu-nbd ${qemuNbdArgs("TARGET", "TSOCK").join(" ")}`,
  );
  if (drivetapRss > 0)
    console.log(`drivetap peak RSS with the mirror: ${(drivetapRss / 1048576).toFixed(0)} MiB`);
  if (failures.size > 0) {
    console.log("");
    for (const [column, why] of failures) console.log(`FAILED: ${column}: ${why}`);
    process.exitCode = 1;
  }
}
