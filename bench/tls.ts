/**
 * The "tls" part of `npm run bench`: fio over NBD with TLS (x509) against drivetap (TLS on the main
 * loop, and with DRIVETAP_TLS_WORKERS=auto on worker threads), qemu-nbd and nbdkit, all serving the same raw image with the same certificates, interleaved round by round.
 * The certificates (a CA and a server certificate) are made with openssl for the run. fio reaches
 * each server through libnbd's `nbds+unix://` URI. fio's nbd engine refuses URIs that name local
 * files (tls-certificates=), so the client does not verify the server. What is measured is the
 * session's encryption, the same for all three. Besides throughput it prints each server's CPU time
 * per request, which the other load on a shared machine disturbs far less, and drivetap's main
 * thread's share of it (the event loop: what bounds a saturated drivetap).
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

const TLS_WORKLOADS = WORKLOADS.filter(
  (w) => w.name === "seq write 1M QD8" || w.name === "rand read 4k QD32",
);

function isDrivetap(name: string): boolean {
  return name.startsWith("drivetap");
}

interface TlsServer {
  readonly name: string;
  start(image: string, socket: string, certs: string): ChildProcess;
}

function startDrivetap(image: string, socket: string, certs: string, env: NodeJS.ProcessEnv): ChildProcess {
  return spawn(process.execPath, [CLI, "serve", image, "--socket", socket, "--tls-creds", certs], {
    stdio: "ignore",
    env,
  });
}

const TLS_SERVERS: readonly TlsServer[] = [
  {
    name: "drivetap",
    start: (image, socket, certs) =>
      startDrivetap(image, socket, certs, { ...process.env, DRIVETAP_TLS_WORKERS: "0" }),
  },
  {
    // TLS sessions on worker threads (opt-in: see docs/ARCHITECTURE.md).
    name: "drivetap-workers",
    start: (image, socket, certs) =>
      startDrivetap(image, socket, certs, { ...process.env, DRIVETAP_TLS_WORKERS: "auto" }),
  },
  {
    name: "qemu-nbd",
    start: (image, socket, certs) =>
      spawn(
        "qemu-nbd",
        [
          "--object",
          `tls-creds-x509,id=tls0,dir=${certs},endpoint=server,verify-peer=off`,
          "--tls-creds",
          "tls0",
          ...qemuNbdArgs(image, socket),
        ],
        { stdio: "ignore" },
      ),
  },
  {
    name: "nbdkit",
    start: (image, socket, certs) =>
      spawn(
        "nbdkit",
        ["--foreground", "--unix", socket, "--tls=require", `--tls-certificates=${certs}`, "file", image],
        { stdio: "ignore" },
      ),
  },
];

/** A CA and a server certificate for localhost, in QEMU's x509 directory layout. */
function makeCerts(dir: string): void {
  fs.mkdirSync(dir, { recursive: true });
  const run = (args: string[]): void => {
    const r = spawnSync("openssl", args, { cwd: dir, encoding: "utf8" });
    if (r.status !== 0) throw new Error(`openssl ${args.join(" ")} failed: ${r.stderr}`);
  };
  run(
    ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca-key.pem", "-out", "ca-cert.pem"].concat([
      "-days",
      "2",
      "-subj",
      "/CN=drivetap bench CA",
    ]),
  );
  run([
    "req",
    "-newkey",
    "rsa:2048",
    "-nodes",
    "-keyout",
    "server-key.pem",
    "-out",
    "server.csr",
    "-subj",
    "/CN=localhost",
  ]);
  fs.writeFileSync(path.join(dir, "san.ext"), "subjectAltName=DNS:localhost,IP:127.0.0.1\n");
  run(
    [
      "x509",
      "-req",
      "-in",
      "server.csr",
      "-CA",
      "ca-cert.pem",
      "-CAkey",
      "ca-key.pem",
      "-CAcreateserial",
    ].concat(["-out", "server-cert.pem", "-days", "2", "-extfile", "san.ext"]),
  );
}

export async function benchTls(dir: string, image: string, only?: readonly string[]): Promise<void> {
  need("openssl");
  const servers = TLS_SERVERS.filter((s) => !only || only.includes(s.name));
  for (const s of servers) if (!isDrivetap(s.name)) need(s.name);
  const certs = path.join(dir, "tls-certs");
  makeCerts(certs);
  const results = new Map<string, number[]>();
  /** The server's CPU time (every thread) per request, in microseconds. */
  const cpuPerOp = new Map<string, number[]>();
  /** drivetap's main thread's CPU time per request, in microseconds. */
  const mainCpuPerOp = new Map<string, number[]>();
  let drivetapRss = 0;
  for (let round = 1; round <= ROUNDS; round++) {
    for (const w of TLS_WORKLOADS) {
      for (const s of servers) {
        const socket = path.join(dir, `${s.name}-tls.sock`);
        fs.rmSync(socket, { force: true });
        const proc = s.start(image, socket, certs);
        try {
          await waitForSocket(socket, proc);
          const cpuBefore = cpuSeconds(proc.pid!);
          const mainBefore = cpuSeconds(proc.pid!, proc.pid!);
          const { value, ops } = runFioCounted(`nbds+unix:///?socket=${socket}&tls-verify-peer=false`, w);
          const cpuUsPerOp = ((cpuSeconds(proc.pid!) - cpuBefore) * 1e6) / ops;
          const mainUsPerOp = ((cpuSeconds(proc.pid!, proc.pid!) - mainBefore) * 1e6) / ops;
          const key = `${s.name}/${w.name}`;
          results.set(key, [...(results.get(key) ?? []), value]);
          cpuPerOp.set(key, [...(cpuPerOp.get(key) ?? []), cpuUsPerOp]);
          mainCpuPerOp.set(key, [...(mainCpuPerOp.get(key) ?? []), mainUsPerOp]);
          if (isDrivetap(s.name)) drivetapRss = Math.max(drivetapRss, peakRssBytes(proc.pid!));
          process.stderr.write(
            `tls round ${round} ${w.name.padEnd(20)} ${s.name.padEnd(9)} ${value.toFixed(0)} ${w.unit}, ` +
              `${cpuUsPerOp.toFixed(1)} us CPU/request (main thread ${mainUsPerOp.toFixed(1)})\n`,
          );
        } finally {
          await stopProcess(proc);
        }
      }
    }
  }
  const names = servers.map((s) => s.name);
  // Each drivetap variant against each other server, round by round.
  const pairs = names
    .filter(isDrivetap)
    .flatMap((d) => names.filter((n) => !isDrivetap(n)).map((n) => [d, n]));
  const header = ["workload (TLS)", ...names, ...pairs.map(([d, n]) => `${d} vs ${n}`)];
  const rows = TLS_WORKLOADS.map((w) => {
    const runs = names.map((n) => results.get(`${n}/${w.name}`) ?? [NaN]);
    const ratios = pairs.map(([d, n]) =>
      spread(
        runs[names.indexOf(d)].map((v, i) => v / runs[names.indexOf(n)][i]),
        2,
        "x",
      ),
    );
    return [`${w.name} (${w.unit})`, ...runs.map((r) => spread(r, 0, "")), ...ratios];
  });
  console.log(
    `\nNBD over TLS (x509), fio ioengine=nbd, unix socket, ${SIZE} bytes raw image, ${RUNTIME_S}s per run, ` +
      `${ROUNDS} interleaved rounds; median (min-max), ratios per round`,
  );
  printTable(header, rows);
  // Throughput on a shared machine moves with the load; CPU time per request moves much less.
  const cpuTable = (title: string, columns: readonly string[], perOp: Map<string, number[]>): void => {
    console.log(`\n${title} CPU time per request, us; median (min-max)`);
    printTable(
      ["workload (TLS)", ...columns],
      TLS_WORKLOADS.map((w) => [
        w.name,
        ...columns.map((n) => spread(perOp.get(`${n}/${w.name}`) ?? [NaN], 1, "")),
      ]),
    );
  };
  cpuTable("Server (user + system, all threads)", names, cpuPerOp);
  const drivetaps = names.filter(isDrivetap);
  if (drivetaps.length === 0) return;
  cpuTable("drivetap's main thread (the event loop)", drivetaps, mainCpuPerOp);
  console.log(`\ndrivetap peak RSS over TLS: ${(drivetapRss / 1048576).toFixed(0)} MiB`);
}
