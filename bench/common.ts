/**
 * What the parts of `npm run bench` share: the run settings from the environment, the fio workloads,
 * starting and stopping servers, and the table printer. Every part runs fio (ioengine=nbd) against an
 * NBD export on a unix socket.
 */
import { spawnSync, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { fileURLToPath } from "node:url";
import { parseSize } from "../src/core/units.js";

/** The repository root (this file runs as dist/bench/common.js). */
export const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "../..");
export const CLI = path.join(ROOT, "dist/src/cli/main.js");
export const ROUNDS = Number(process.env.BENCH_ROUNDS ?? 3);
export const RUNTIME_S = Number(process.env.BENCH_RUNTIME_S ?? 5);
export const SIZE = parseSize(process.env.BENCH_SIZE ?? "1G");

/** fio's warm-up before it starts counting, in every run. */
const RAMP_S = 1;
const SOCKET_WAIT_MS = 10_000;
const STOP_TIMEOUT_MS = 30_000;

export interface Workload {
  readonly name: string;
  readonly rw: string;
  readonly bs: string;
  readonly iodepth: number;
  /** MB/s for large blocks, IOPS for small ones. */
  readonly unit: "MB/s" | "IOPS";
}

export const WORKLOADS: readonly Workload[] = [
  { name: "seq write 1M QD8", rw: "write", bs: "1M", iodepth: 8, unit: "MB/s" },
  { name: "seq read 1M QD8", rw: "read", bs: "1M", iodepth: 8, unit: "MB/s" },
  { name: "rand write 4k QD32", rw: "randwrite", bs: "4k", iodepth: 32, unit: "IOPS" },
  { name: "rand read 4k QD32", rw: "randread", bs: "4k", iodepth: 32, unit: "IOPS" },
  { name: "rand write 4k QD1", rw: "randwrite", bs: "4k", iodepth: 1, unit: "IOPS" },
];

/** The workloads the job parts (stream, journal, mirror) measure: only writes pay for a job. */
export const JOB_WORKLOADS = WORKLOADS.filter(
  (w) => w.name === "seq write 1M QD8" || w.name === "rand write 4k QD32",
);

/**
 * qemu-nbd as every part runs it: persistent (-t), buffered with flushes honoured (--cache=writeback),
 * up to 8 clients (-e 8), the image's format named (raw unless told), on a unix socket.
 */
export function qemuNbdArgs(image: string, socket: string, format: "raw" | "qcow2" = "raw"): string[] {
  return ["-t", "--cache=writeback", "-e", "8", "-f", format, "-k", socket, image];
}

export function need(tool: string): void {
  const r = spawnSync("sh", ["-c", `command -v ${tool}`]);
  if (r.status !== 0) throw new Error(`${tool} is not installed (run scripts/install-deps.sh)`);
}

export async function waitForSocket(socket: string, proc: ChildProcess): Promise<void> {
  const deadline = Date.now() + SOCKET_WAIT_MS;
  while (!fs.existsSync(socket)) {
    if (proc.exitCode !== null) throw new Error(`server exited with ${proc.exitCode} before listening`);
    if (Date.now() > deadline) throw new Error(`server did not create ${socket}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** SIGTERM, then SIGKILL if the process has not exited within STOP_TIMEOUT_MS. */
export async function stopProcess(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  const exited = new Promise((r) => proc.once("exit", r));
  proc.kill("SIGTERM");
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise((r) => (timer = setTimeout(r, STOP_TIMEOUT_MS, "late")));
  if ((await Promise.race([exited, late])) === "late") {
    proc.kill("SIGKILL");
    await exited;
  }
  clearTimeout(timer);
}

export function peakRssBytes(pid: number): number {
  try {
    const status = fs.readFileSync(`/proc/${pid}/status`, "utf8");
    const m = /VmHWM:\s+(\d+) kB/.exec(status);
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

/**
 * User plus system CPU seconds a process (all its threads) has used so far, or with `thread` only
 * that thread (the main thread's id is the pid); NaN once it is gone.
 */
export function cpuSeconds(pid: number, thread?: number): number {
  try {
    // Fields 14 and 15 of /proc/PID/stat, counted after the parenthesised command name.
    const file = thread === undefined ? `/proc/${pid}/stat` : `/proc/${pid}/task/${thread}/stat`;
    const fields = fs.readFileSync(file, "utf8").split(") ")[1].split(" ");
    return (Number(fields[11]) + Number(fields[12])) / CLOCK_TICKS_PER_S;
  } catch {
    return NaN;
  }
}

/** The kernel's USER_HZ, the unit of /proc/PID/stat's times (100 on every Linux we run on). */
const CLOCK_TICKS_PER_S = 100;

export interface FioResult {
  /** MB/s or IOPS, as the workload's unit says. */
  readonly value: number;
  /**
   * Requests over the whole run, ramp included (the span a server's CPU time is read over): fio
   * counts only after the ramp, so the ramp's share is estimated at the measured rate.
   */
  readonly ops: number;
}

export function runFio(uri: string, w: Workload): number {
  return runFioCounted(uri, w).value;
}

export function runFioCounted(uri: string, w: Workload): FioResult {
  const args = [
    "--name=bench",
    "--ioengine=nbd",
    `--uri=${uri}`,
    `--rw=${w.rw}`,
    `--bs=${w.bs}`,
    `--iodepth=${w.iodepth}`,
    `--size=${SIZE}`,
    "--time_based",
    `--runtime=${RUNTIME_S}`,
    `--ramp_time=${RAMP_S}`,
    "--randrepeat=0",
    "--output-format=json",
  ];
  const r = spawnSync("fio", args, { encoding: "utf8", maxBuffer: 64 << 20 });
  if (r.status !== 0) throw new Error(`fio failed: ${r.stderr}`);
  const job = JSON.parse(r.stdout.slice(r.stdout.indexOf("{"))).jobs[0];
  const side = w.rw.includes("write") ? job.write : job.read;
  return {
    value: w.unit === "IOPS" ? side.iops : side.bw_bytes / 1e6,
    ops: (side.total_ios * (RUNTIME_S + RAMP_S)) / RUNTIME_S,
  };
}

export function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s.length % 2 ? s[(s.length - 1) / 2] : (s[s.length / 2 - 1] + s[s.length / 2]) / 2;
}

/** "median (min-max)" of a series. */
export function spread(xs: number[], digits: number, unit: string): string {
  const f = (v: number): string => v.toFixed(digits) + unit;
  if (xs.length < 2) return f(median(xs));
  return `${f(median(xs))} (${f(Math.min(...xs))}-${f(Math.max(...xs))})`;
}

/** Prints a markdown table with padded columns. */
export function printTable(header: readonly string[], rows: readonly (readonly string[])[]): void {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i].length)));
  const line = (cells: readonly string[]): string =>
    "| " + cells.map((c, i) => c.padEnd(widths[i])).join(" | ") + " |";
  console.log(line(header));
  console.log("|" + widths.map((w) => "-".repeat(w + 2)).join("|") + "|");
  for (const r of rows) console.log(line(r));
}
