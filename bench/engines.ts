/**
 * The "engines" part of `npm run bench` (issue 14): the five serving workloads, and a stream job to a
 * local raw file on the two job workloads, through drivetap on each I/O engine (`--io-engine`),
 * interleaved engine by engine within each round, for at least ENGINE_ROUNDS_MIN rounds. Besides
 * fio's throughput it reports what a shared machine does not distort much: the daemon's CPU time
 * (user + system, all threads, from /proc/PID/stat) per request, and on io_uring the entries per
 * io_uring_enter (x-query-io-engine), which shows whether a job's target writes joined the source's
 * submissions. Each cell is median (min-max). BENCH_IO_ENGINES restricts the engines.
 */
import { spawn } from "node:child_process";
import * as fs from "node:fs";
import * as path from "node:path";
import { QmpClient } from "../src/qmp/client.js";
import {
  CLI,
  cpuSeconds,
  JOB_WORKLOADS,
  printTable,
  ROUNDS,
  RUNTIME_S,
  SIZE,
  WORKLOADS,
  runFioCounted,
  spread,
  stopProcess,
  waitForSocket,
  type Workload,
} from "./common.js";

/** The issue asks for at least five rounds, so that a ratio is not a matter of luck. */
export const ENGINE_ROUNDS_MIN = 5;
const ENGINES = ["io_uring", "sync", "threads"] as const;

interface Ring {
  submits: number;
  sqes: number;
}

interface Cell {
  value: number[];
  cpuUsPerOp: number[];
  sqesPerSubmit: number[];
}

type Variant = "no job" | "stream job";

async function ringCounters(qmp: QmpClient): Promise<Ring | undefined> {
  const r = (await qmp.execute("x-query-io-engine")) as { "io-uring"?: Ring };
  return r["io-uring"];
}

async function measure(
  dir: string,
  image: string,
  engine: string,
  w: Workload,
  variant: Variant,
): Promise<{ value: number; cpuUsPerOp: number; sqesPerSubmit: number }> {
  const socket = path.join(dir, "engines.sock");
  const qmpPath = path.join(dir, "engines-qmp.sock");
  const target = path.join(dir, "engines-target.img");
  fs.rmSync(socket, { force: true });
  const proc = spawn(
    process.execPath,
    [CLI, "serve", image, "--socket", socket, "--qmp", qmpPath, "--io-engine", engine],
    { stdio: "ignore" },
  );
  let qmp: QmpClient | null = null;
  try {
    await waitForSocket(socket, proc);
    await waitForSocket(qmpPath, proc);
    qmp = await QmpClient.connect(qmpPath);
    if (variant === "stream job")
      await qmp.execute("drive-backup", { "job-id": "bench", device: "disk0", sync: "stream", target });
    const ring0 = await ringCounters(qmp);
    const cpu0 = cpuSeconds(proc.pid!);
    const r = runFioCounted(`nbd+unix:///?socket=${socket}`, w);
    const cpu1 = cpuSeconds(proc.pid!);
    const ring1 = await ringCounters(qmp);
    const submits = ring0 && ring1 ? ring1.submits - ring0.submits : 0;
    return {
      value: r.value,
      cpuUsPerOp: ((cpu1 - cpu0) * 1e6) / r.ops,
      sqesPerSubmit: ring0 && ring1 && submits > 0 ? (ring1.sqes - ring0.sqes) / submits : NaN,
    };
  } finally {
    qmp?.close();
    await stopProcess(proc);
    fs.rmSync(target, { force: true });
  }
}

export async function benchEngines(dir: string, image: string): Promise<void> {
  const only = process.env.BENCH_IO_ENGINES?.split(",");
  const engines = ENGINES.filter((e) => !only || only.includes(e));
  const rounds = Math.max(ROUNDS, ENGINE_ROUNDS_MIN);
  const cases: { w: Workload; variant: Variant }[] = [
    ...WORKLOADS.map((w) => ({ w, variant: "no job" as const })),
    ...JOB_WORKLOADS.map((w) => ({ w, variant: "stream job" as const })),
  ];
  const cells = new Map<string, Cell>();
  for (let round = 1; round <= rounds; round++) {
    for (const { w, variant } of cases) {
      for (const engine of engines) {
        const m = await measure(dir, image, engine, w, variant);
        const key = `${engine}/${variant}/${w.name}`;
        const c = cells.get(key) ?? { value: [], cpuUsPerOp: [], sqesPerSubmit: [] };
        c.value.push(m.value);
        c.cpuUsPerOp.push(m.cpuUsPerOp);
        if (!Number.isNaN(m.sqesPerSubmit)) c.sqesPerSubmit.push(m.sqesPerSubmit);
        cells.set(key, c);
        process.stderr.write(
          `round ${round} ${w.name.padEnd(20)} ${variant.padEnd(10)} ${engine.padEnd(8)} ` +
            `${m.value.toFixed(0)} ${w.unit}, ${m.cpuUsPerOp.toFixed(1)} us CPU/req` +
            (Number.isNaN(m.sqesPerSubmit) ? "\n" : `, ${m.sqesPerSubmit.toFixed(2)} SQEs/submit\n`),
        );
      }
    }
  }
  console.log(
    `\ndrivetap per I/O engine: fio ioengine=nbd, ${SIZE} bytes raw image, ${RUNTIME_S}s per run, ${rounds} interleaved rounds; ` +
      "median (min-max). CPU = the daemon's user+sys per request; on a shared machine trust it over throughput",
  );
  const header = ["workload", ...engines.flatMap((e) => [`${e}`, `${e} CPU us/req`]), "io_uring SQEs/submit"];
  const rows = cases.map(({ w, variant }) => {
    const row = [`${w.name} (${w.unit})${variant === "stream job" ? ", stream job" : ""}`];
    for (const e of engines) {
      const c = cells.get(`${e}/${variant}/${w.name}`)!;
      row.push(spread(c.value, 0, ""), spread(c.cpuUsPerOp, 1, ""));
    }
    const ring = cells.get(`io_uring/${variant}/${w.name}`);
    row.push(ring && ring.sqesPerSubmit.length > 0 ? spread(ring.sqesPerSubmit, 2, "") : "-");
    return row;
  });
  printTable(header, rows);
}
