/**
 * `npm run bench`: fio (ioengine=nbd) against drivetap, qemu-nbd and nbdkit on the same raw image,
 * interleaved round by round so that machine noise hits all servers alike. Prints medians and ratios,
 * and drivetap's peak RSS. Environment: BENCH_ROUNDS (default 3), BENCH_RUNTIME_S (default 5),
 * BENCH_SIZE (default 1G), BENCH_DIR (default a temp dir), BENCH_SERVERS (comma list to restrict),
 * BENCH_PARTS (comma list of "servers", "engines", "tls", "stream", "journal", "tap", "mirror", "qcow2";
 * default all).
 *
 * The "engines" part (bench/engines.ts, issue 14) runs the workloads, and a stream job to a file,
 * through drivetap on each I/O engine (io_uring, sync, threads; BENCH_IO_ENGINES), at least five
 * rounds, with the daemon's CPU per request and io_uring's entries per submit.
 *
 * The "tls" part (bench/tls.ts) runs two workloads over NBD with TLS (x509, certificates made by
 * openssl for the run) against drivetap, qemu-nbd and nbdkit with the same certificates.
 *
 * The "stream" part measures the cost of a backup sync=stream job: the same fio workloads through
 * drivetap's export with no job and with a stream job to a local raw file, interleaved. The "journal"
 * part does the same with a journal node (issue 5) as the stream target. The "mirror" part
 * (bench/mirror.ts) compares a write-blocking mirror to a qemu-nbd target in drivetap and in
 * qemu-storage-daemon (BENCH_MIRROR_DAEMONS=drivetap|qsd|both).
 *
 * The "qcow2" part (bench/qcow2.ts, issue 13) runs the five workloads against drivetap and
 * `qemu-nbd -f qcow2` on a qcow2 image with 64 KiB clusters, empty (a fresh image per run: writes
 * allocate, reads read unallocated clusters) and fully allocated (writes in place).
 */
import { spawn, spawnSync, type ChildProcess } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { QmpClient } from "../src/qmp/client.js";
import {
  CLI,
  JOB_WORKLOADS,
  ROUNDS,
  RUNTIME_S,
  SIZE,
  WORKLOADS,
  need,
  peakRssBytes,
  printTable,
  qemuNbdArgs,
  spread,
  runFio,
  stopProcess,
  waitForSocket,
} from "./common.js";
import { benchEngines } from "./engines.js";
import { benchMirror, selectedMirrorDaemons } from "./mirror.js";
import { benchQcow2 } from "./qcow2.js";
import { benchTls } from "./tls.js";

interface Server {
  readonly name: string;
  start(image: string, socket: string): ChildProcess;
}

export const SERVERS: readonly Server[] = [
  {
    name: "drivetap",
    start: (image, socket) =>
      spawn(process.execPath, [CLI, "serve", image, "--socket", socket], { stdio: "ignore" }),
  },
  {
    // The event loop without its adaptive polling (--poll-max-ns 0), in the same run: what polling buys.
    name: "drivetap-nopoll",
    start: (image, socket) =>
      spawn(process.execPath, [CLI, "serve", image, "--socket", socket, "--poll-max-ns", "0"], {
        stdio: "ignore",
      }),
  },
  {
    name: "qemu-nbd",
    start: (image, socket) => spawn("qemu-nbd", qemuNbdArgs(image, socket), { stdio: "ignore" }),
  },
  {
    name: "nbdkit",
    start: (image, socket) =>
      spawn("nbdkit", ["--foreground", "--unix", socket, "file", image], { stdio: "ignore" }),
  },
];

/** The parts BENCH_PARTS picks from, in the order they run; all by default. */
const BENCH_PARTS: readonly string[] = [
  "servers",
  "engines",
  "tls",
  "stream",
  "journal",
  "tap",
  "mirror",
  "qcow2",
];

type StreamTarget = "file" | "journal" | "tap";

async function benchStream(dir: string, image: string, targetKind: StreamTarget): Promise<void> {
  const results = new Map<string, number[]>();
  for (let round = 1; round <= ROUNDS; round++) {
    for (const w of JOB_WORKLOADS) {
      for (const variant of ["no job", "stream job"] as const) {
        const socket = path.join(dir, "stream.sock");
        const qmpPath = path.join(dir, "stream-qmp.sock");
        const target = path.join(dir, "stream-target.img");
        fs.rmSync(socket, { force: true });
        const proc = spawn(process.execPath, [CLI, "serve", image, "--socket", socket, "--qmp", qmpPath], {
          stdio: "ignore",
        });
        let qmp: QmpClient | null = null;
        let tap: ReturnType<typeof spawn> | null = null;
        try {
          await waitForSocket(socket, proc);
          await waitForSocket(qmpPath, proc);
          qmp = await QmpClient.connect(qmpPath);
          if (variant === "stream job" && targetKind === "tap") {
            // A live feed instead of a job: `drivetap tap` reading every write, its output discarded.
            tap = spawn(process.execPath, [CLI, "tap", "--socket", qmpPath], { stdio: "ignore" });
            const deadline = Date.now() + 30_000;
            for (;;) {
              const taps = (await qmp.execute("query-x-taps")) as Array<{ readers: unknown[] }>;
              if (taps.length === 1 && taps[0].readers.length === 1) break;
              if (Date.now() > deadline) throw new Error("drivetap tap did not connect");
              await new Promise((resolve) => setTimeout(resolve, 50));
            }
          } else if (variant === "stream job" && targetKind === "file") {
            await qmp.execute("drive-backup", { "job-id": "bench", device: "disk0", sync: "stream", target });
          } else if (variant === "stream job") {
            await qmp.execute("blockdev-add", {
              driver: "journal",
              "node-name": "journal0",
              filename: target,
              data: true,
              size: fs.statSync(image).size,
            });
            await qmp.execute("blockdev-backup", {
              "job-id": "bench",
              device: "disk0",
              sync: "stream",
              target: "journal0",
            });
          }
          const value = runFio(`nbd+unix:///?socket=${socket}`, w);
          if (tap) {
            const taps = (await qmp.execute("query-x-taps")) as Array<{ records: number }>;
            if (!(taps[0]?.records > 0)) throw new Error("the tap saw no writes");
            await stopProcess(tap);
            tap = null;
          } else if (variant === "stream job") {
            const jobs = (await qmp.execute("query-block-jobs")) as Array<Record<string, unknown>>;
            if (jobs.length !== 1 || jobs[0].status !== "running")
              throw new Error("stream job did not keep running");
            await qmp.execute("block-job-cancel", { device: "bench" });
            await qmp.waitForEvent(
              (e) => e.event === "BLOCK_JOB_CANCELLED" || e.event === "BLOCK_JOB_COMPLETED",
              120_000,
            );
          }
          const key = `${variant}/${w.name}`;
          results.set(key, [...(results.get(key) ?? []), value]);
          process.stderr.write(
            `round ${round} ${w.name.padEnd(20)} ${variant.padEnd(10)} ${value.toFixed(0)} ${w.unit}\n`,
          );
        } finally {
          if (tap) await stopProcess(tap);
          qmp?.close();
          await stopProcess(proc);
          fs.rmSync(target, { force: true });
        }
      }
    }
  }
  const what =
    targetKind === "tap"
      ? "a live feed instead of a job (`drivetap tap` reading every write, output discarded)"
      : `backup sync=stream to ${targetKind === "file" ? "a local raw file" : "a journal node (data: true)"}`;
  console.log(
    `\n${what}, through drivetap's export, ${ROUNDS} interleaved rounds; median (min-max), ratios per round`,
  );
  console.log(`| workload | no job | ${targetKind === "tap" ? "tap reader" : "stream job"} | ratio |`);
  console.log("|---|---|---|---|");
  for (const w of JOB_WORKLOADS) {
    const a = results.get(`no job/${w.name}`) ?? [NaN];
    const b = results.get(`stream job/${w.name}`) ?? [NaN];
    const ratios = b.map((v, i) => v / a[i]);
    console.log(
      `| ${w.name} (${w.unit}) | ${spread(a, 0, "")} | ${spread(b, 0, "")} | ${spread(ratios, 2, "x")} |`,
    );
  }
}

async function main(): Promise<void> {
  need("fio");
  const parts = (process.env.BENCH_PARTS ?? BENCH_PARTS.join(",")).split(",");
  for (const part of parts)
    if (!BENCH_PARTS.includes(part)) throw new Error(`BENCH_PARTS: unknown part "${part}"`);
  const only = process.env.BENCH_SERVERS?.split(",");
  const servers = SERVERS.filter((s) => !only || only.includes(s.name));
  const mirrorDaemons = parts.includes("mirror") ? selectedMirrorDaemons() : [];
  const dir = process.env.BENCH_DIR ?? fs.mkdtempSync(path.join(os.tmpdir(), "drivetap-bench-"));
  try {
    const image = path.join(dir, "bench.img");
    process.stderr.write(`bench: filling ${image} (${SIZE} bytes) with random data\n`);
    const fill = spawnSync("sh", ["-c", `head -c ${SIZE} /dev/urandom > '${image}'`]);
    if (fill.status !== 0) throw new Error("could not create the image");

    if (parts.includes("servers")) await benchServers(servers, dir, image);
    if (parts.includes("engines")) await benchEngines(dir, image);
    if (parts.includes("tls")) await benchTls(dir, image, only);
    if (parts.includes("stream")) await benchStream(dir, image, "file");
    if (parts.includes("journal")) await benchStream(dir, image, "journal");
    if (parts.includes("tap")) await benchStream(dir, image, "tap");
    if (parts.includes("mirror")) await benchMirror(mirrorDaemons, dir, image);
    if (parts.includes("qcow2")) await benchQcow2(dir, image, only);
  } finally {
    if (!process.env.BENCH_DIR) fs.rmSync(dir, { recursive: true, force: true });
  }
}

async function benchServers(servers: readonly Server[], dir: string, image: string): Promise<void> {
  const ours = (name: string): boolean => name.startsWith("drivetap");
  for (const s of servers) if (!ours(s.name)) need(s.name);
  const results = new Map<string, number[]>(); // `${server}/${workload}`
  let drivetapRss = 0;
  for (let round = 1; round <= ROUNDS; round++) {
    for (const w of WORKLOADS) {
      for (const s of servers) {
        const socket = path.join(dir, `${s.name}.sock`);
        fs.rmSync(socket, { force: true });
        const proc = s.start(image, socket);
        try {
          await waitForSocket(socket, proc);
          const value = runFio(`nbd+unix:///?socket=${socket}`, w);
          const key = `${s.name}/${w.name}`;
          results.set(key, [...(results.get(key) ?? []), value]);
          if (s.name === "drivetap") drivetapRss = Math.max(drivetapRss, peakRssBytes(proc.pid!));
          process.stderr.write(
            `round ${round} ${w.name.padEnd(20)} ${s.name.padEnd(9)} ${value.toFixed(0)} ${w.unit}\n`,
          );
        } finally {
          await stopProcess(proc);
        }
      }
    }
  }

  const names = servers.map((s) => s.name);
  const pairs = names.filter(ours).flatMap((a) => names.filter((b) => !ours(b)).map((b) => [a, b]));
  const header = [
    "workload",
    ...names,
    ...pairs.map(([a, b]) => (a === "drivetap" ? `vs ${b}` : `${a} vs ${b}`)),
  ];
  const rows = WORKLOADS.map((w) => {
    const runs = names.map((n) => results.get(`${n}/${w.name}`) ?? [NaN]);
    // Ratios are taken round by round (the servers ran back to back in each), then summarised.
    const ratios = pairs.map(([a, b]) => {
      const mine = runs[names.indexOf(a)];
      const other = runs[names.indexOf(b)];
      return spread(
        mine.map((v, i) => v / other[i]),
        2,
        "x",
      );
    });
    return [`${w.name} (${w.unit})`, ...runs.map((r) => spread(r, 0, "")), ...ratios];
  });
  console.log(
    `\nfio ioengine=nbd, unix socket, ${SIZE} bytes raw image, ${RUNTIME_S}s per run, ${ROUNDS} interleaved rounds; median (min-max), ratios per round`,
  );
  printTable(header, rows);
  if (names.includes("drivetap"))
    console.log(`\ndrivetap peak RSS: ${(drivetapRss / 1048576).toFixed(0)} MiB`);
}

await main();
