/**
 * Server CPU per request for 4 KiB random writes at QD1 on a qcow2 image (64 KiB clusters), the
 * workload where drivetap trailed qemu-nbd (issue 13). Wall-clock ratios are noise on a shared
 * machine, so this counts a fixed number of fio requests and reads the server's user+sys time from
 * /proc/PID/stat around them (startup excluded). "empty": a fresh image, so most writes allocate a
 * cluster and fill the rest of it; "allocated": `preallocation=metadata`, so every write lands in
 * place. Rounds interleave the servers. `node dist/bench/qcow2-qd1-cpu.js` (QD1_REQUESTS, QD1_ROUNDS,
 * QD1_SERVERS=drivetap,qemu-nbd, where NAME=PATH is another drivetap build's dist/src/cli/main.js,
 * for an A/B; DRIVETAP_CPU_PROF=DIR adds --cpu-prof to drivetap).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { CLI, cpuSeconds, median, need, qemuNbdArgs, stopProcess, waitForSocket } from "./common.js";

const REQUESTS = Number(process.env.QD1_REQUESTS ?? 20000);
const ROUNDS = Number(process.env.QD1_ROUNDS ?? 3);
const SIZE = "1G";
const SERVERS = (process.env.QD1_SERVERS ?? "drivetap,qemu-nbd").split(",");
const PROFILE_DIR = process.env.DRIVETAP_CPU_PROF;

function run(cmd: string, args: readonly string[]): void {
  const r = spawnSync(cmd, args, { encoding: "utf8" });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.status}): ${r.stderr}`);
}

function startServer(server: string, image: string, socket: string): ChildProcess {
  if (server === "qemu-nbd")
    return spawn("qemu-nbd", qemuNbdArgs(image, socket, "qcow2"), { stdio: "ignore" });
  const cli = server.includes("=") ? server.slice(server.indexOf("=") + 1) : CLI;
  const prof = PROFILE_DIR ? ["--cpu-prof", `--cpu-prof-dir=${PROFILE_DIR}`] : [];
  return spawn(process.execPath, [...prof, cli, "serve", image, "--format", "qcow2", "--socket", socket], {
    stdio: "ignore",
  });
}

/** CPU µs per request of one server over REQUESTS random 4 KiB writes at QD1. */
async function measure(server: string, state: string, dir: string, round: number): Promise<number> {
  const name = server.split("=")[0];
  const image = path.join(dir, `${name}-${state}-${round}.qcow2`);
  const opts = state === "allocated" ? "cluster_size=64k,preallocation=metadata" : "cluster_size=64k";
  run("qemu-img", ["create", "-q", "-f", "qcow2", "-o", opts, image, SIZE]);
  const socket = path.join(dir, `${name}.sock`);
  fs.rmSync(socket, { force: true });
  const proc = startServer(server, image, socket);
  try {
    await waitForSocket(socket, proc);
    const before = cpuSeconds(proc.pid!);
    run("fio", [
      "--name=qd1",
      "--ioengine=nbd",
      `--uri=nbd+unix:///?socket=${socket}`,
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=1",
      `--size=${SIZE}`,
      `--number_ios=${REQUESTS}`,
      `--randseed=${round + 1}`,
    ]);
    const after = cpuSeconds(proc.pid!);
    return ((after - before) * 1e6) / REQUESTS;
  } finally {
    await stopProcess(proc);
    fs.rmSync(image, { force: true });
  }
}

async function main(): Promise<void> {
  need("fio");
  need("qemu-nbd");
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "drivetap-qd1-"));
  try {
    for (const state of ["empty", "allocated"]) {
      const results = new Map<string, number[]>(SERVERS.map((s) => [s, []]));
      for (let r = 0; r < ROUNDS; r++) {
        // Alternate the order from round to round, as bench/qcow2.ts does.
        const order = r % 2 === 0 ? SERVERS : [...SERVERS].reverse();
        for (const server of order) results.get(server)!.push(await measure(server, state, dir, r));
      }
      for (const [server, xs] of results) {
        const shown = xs.map((x) => x.toFixed(1)).join(", ");
        console.log(
          `${state} ${server.split("=")[0]}: ${median(xs).toFixed(1)} µs CPU/request (rounds: ${shown})`,
        );
      }
    }
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
