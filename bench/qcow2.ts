/**
 * The "qcow2" part of `npm run bench` (issue 13): the five fio workloads against drivetap and
 * `qemu-nbd -f qcow2 --cache=writeback` serving a qcow2 image (64 KiB clusters) of the bench size, in
 * two states. "empty": a fresh `qemu-img create` image before every run, so writes allocate clusters
 * (and reads read unallocated clusters, i.e. zeros that no data read stands behind). "allocated": a
 * fresh copy of one template whose every cluster was written once (qemu-img convert of the run's
 * random raw image, in guest order), so writes land in place. Rounds interleave the two servers, the
 * first server alternating from round to round, and every run ends with `qemu-img check` on the
 * image the server left, which must find no corruption and no leak. Prints median (min-max), ratios
 * taken round by round, each server's CPU time per request, the share of clusters allocated at the
 * end of the empty-state runs, and both servers' peak RSS.
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import {
  CLI,
  ROUNDS,
  RUNTIME_S,
  SIZE,
  WORKLOADS,
  cpuSeconds,
  need,
  peakRssBytes,
  printTable,
  qemuNbdArgs,
  runFioCounted,
  spread,
  stopProcess,
  waitForSocket,
} from "./common.js";

/** The cluster size (also qemu-img's default). */
const CLUSTER_BYTES = 65536;
/**
 * The RSS that drivetap is held to: the peak the hostile-client suite asserts. docs/ARCHITECTURE.md
 * adds the defaults' worst case to about 410 MiB; qcow2 adds its 4 MiB L2 and 1 MiB refcount caches.
 */
const RSS_BUDGET_BYTES = 512 * 1048576;

type State = "empty" | "allocated";
const STATES: readonly State[] = ["empty", "allocated"];

interface Qcow2Server {
  readonly name: string;
  start(image: string, socket: string): ChildProcess;
}

const QCOW2_SERVERS: readonly Qcow2Server[] = [
  {
    name: "drivetap",
    start: (image, socket) =>
      spawn(process.execPath, [CLI, "serve", image, "--format", "qcow2", "--socket", socket], {
        stdio: "ignore",
      }),
  },
  {
    name: "qemu-nbd",
    start: (image, socket) => spawn("qemu-nbd", qemuNbdArgs(image, socket, "qcow2"), { stdio: "ignore" }),
  },
];

function run(cmd: string, args: readonly string[]): string {
  const r = spawnSync(cmd, args, { encoding: "utf8", maxBuffer: 16 << 20 });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(" ")} failed (${r.status}): ${r.stderr}`);
  return r.stdout;
}

const createOptions = ["-f", "qcow2", "-o", `cluster_size=${CLUSTER_BYTES}`];

interface CheckResult {
  readonly allocatedClusters: number;
  readonly totalClusters: number;
}

/** `qemu-img check`: throws on any corruption or leak, else returns how much is allocated. */
function check(image: string): CheckResult {
  // Exit 0 is a clean image; 2 (corruption) and 3 (leaks) fail run().
  const r = JSON.parse(run("qemu-img", ["check", "-f", "qcow2", "--output=json", image])) as {
    "allocated-clusters": number;
    "total-clusters": number;
  };
  return { allocatedClusters: r["allocated-clusters"], totalClusters: r["total-clusters"] };
}

/** Writes a file's dirty pages out, so a copy's write-back does not run under the next measurement. */
function syncFile(file: string): void {
  const fd = fs.openSync(file, "r+");
  try {
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
}

function prepare(state: State, template: string, image: string): void {
  fs.rmSync(image, { force: true });
  if (state === "empty") run("qemu-img", ["create", "-q", ...createOptions, image, String(SIZE)]);
  else fs.copyFileSync(template, image);
  syncFile(image);
}

/** What a cell measures, for the table: reads of an empty image read no data. */
function measures(state: State, rw: string): string {
  if (state === "allocated") return rw.includes("write") ? "in-place writes" : "data reads";
  return rw.includes("write") ? "allocating writes" : "unallocated clusters (zeros)";
}

export async function benchQcow2(dir: string, rawImage: string, only?: readonly string[]): Promise<void> {
  need("qemu-img");
  const servers = QCOW2_SERVERS.filter((s) => !only || only.includes(s.name));
  for (const s of servers) if (s.name !== "drivetap") need(s.name);
  const template = path.join(dir, "qcow2-allocated.qcow2");
  process.stderr.write(`bench qcow2: writing every cluster of ${template}\n`);
  run("qemu-img", ["convert", "-q", "-f", "raw", "-O", ...createOptions.slice(1), rawImage, template]);
  // The raw image's and the template's dirty pages would otherwise be written back under the first runs.
  syncFile(rawImage);
  const filled = check(template);
  if (filled.allocatedClusters !== filled.totalClusters)
    throw new Error(`${template}: ${filled.allocatedClusters}/${filled.totalClusters} clusters allocated`);
  syncFile(template);

  const image = path.join(dir, "qcow2-bench.qcow2");
  const results = new Map<string, number[]>(); // `${state}/${workload}/${server}`
  const cpuPerOp = new Map<string, number[]>();
  const allocatedShare = new Map<string, number[]>();
  const rss = new Map<string, number>();
  const add = (m: Map<string, number[]>, key: string, v: number): void => {
    m.set(key, [...(m.get(key) ?? []), v]);
  };
  for (let round = 1; round <= ROUNDS; round++) {
    // The first server alternates, so neither always runs on the machine the other just warmed.
    const order = round % 2 ? servers : [...servers].reverse();
    for (const state of STATES) {
      for (const w of WORKLOADS) {
        for (const s of order) {
          prepare(state, template, image);
          const socket = path.join(dir, `${s.name}-qcow2.sock`);
          fs.rmSync(socket, { force: true });
          const proc = s.start(image, socket);
          const key = `${state}/${w.name}/${s.name}`;
          try {
            await waitForSocket(socket, proc);
            const cpuBefore = cpuSeconds(proc.pid!);
            const { value, ops } = runFioCounted(`nbd+unix:///?socket=${socket}`, w);
            const cpuUsPerOp = ((cpuSeconds(proc.pid!) - cpuBefore) * 1e6) / ops;
            add(results, key, value);
            add(cpuPerOp, key, cpuUsPerOp);
            rss.set(s.name, Math.max(rss.get(s.name) ?? 0, peakRssBytes(proc.pid!)));
            process.stderr.write(
              `qcow2 round ${round} ${state.padEnd(9)} ${w.name.padEnd(20)} ${s.name.padEnd(9)} ` +
                `${value.toFixed(0)} ${w.unit}, ${cpuUsPerOp.toFixed(1)} us CPU/request\n`,
            );
          } finally {
            await stopProcess(proc);
          }
          if (proc.exitCode !== 0) throw new Error(`${s.name} exited with ${proc.exitCode} (${key})`);
          const after = check(image);
          add(allocatedShare, key, (100 * after.allocatedClusters) / after.totalClusters);
        }
      }
    }
  }
  fs.rmSync(image, { force: true });
  fs.rmSync(template, { force: true });

  const names = servers.map((s) => s.name);
  const others = names.filter((n) => n !== "drivetap");
  const cells = (state: State, w: (typeof WORKLOADS)[number], m: Map<string, number[]>): number[][] =>
    names.map((n) => m.get(`${state}/${w.name}/${n}`) ?? [NaN]);
  const rows = STATES.flatMap((state) =>
    WORKLOADS.map((w) => {
      const runs = cells(state, w, results);
      const dt = runs[names.indexOf("drivetap")] ?? [NaN];
      const ratios = others.map((n) =>
        spread(
          dt.map((v, i) => v / runs[names.indexOf(n)][i]),
          2,
          "x",
        ),
      );
      return [
        state,
        `${w.name} (${w.unit})`,
        measures(state, w.rw),
        ...runs.map((r) => spread(r, 0, "")),
        ...ratios,
      ];
    }),
  );
  console.log(
    `\nqcow2 (${CLUSTER_BYTES / 1024} KiB clusters), fio ioengine=nbd, unix socket, ${SIZE} bytes virtual, ` +
      `${RUNTIME_S}s per run, ${ROUNDS} interleaved rounds, a fresh image per run; median (min-max), ratios per round`,
  );
  printTable(["state", "workload", "measures", ...names, ...others.map((n) => `vs ${n}`)], rows);

  console.log("\nServer CPU time (user + system, all threads) per request, us; median (min-max)");
  printTable(
    ["state", "workload", ...names],
    STATES.flatMap((state) =>
      WORKLOADS.map((w) => [state, w.name, ...cells(state, w, cpuPerOp).map((r) => spread(r, 1, ""))]),
    ),
  );
  // A time-based run rewrites the image once it is full, so only its first part allocates.
  console.log("\nClusters allocated when an empty-state write run ended, % of the image; median (min-max)");
  printTable(
    ["workload", ...names],
    WORKLOADS.filter((w) => w.rw.includes("write")).map((w) => [
      w.name,
      ...cells("empty", w, allocatedShare).map((r) => spread(r, 1, "%")),
    ]),
  );
  console.log("");
  for (const n of names) {
    const mib = (rss.get(n) ?? 0) / 1048576;
    const budget =
      n === "drivetap"
        ? ` (budget ${RSS_BUDGET_BYTES / 1048576} MiB: ${(rss.get(n) ?? 0) <= RSS_BUDGET_BYTES ? "within" : "OVER"})`
        : "";
    console.log(`${n} peak RSS serving qcow2: ${mib.toFixed(0)} MiB${budget}`);
  }
}
