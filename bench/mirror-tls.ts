/**
 * What TLS costs a write-blocking mirror: `node dist/bench/mirror-tls.js`. For each workload and
 * round, interleaved, drivetap serves a fresh copy-on-nothing sparse image and mirrors it
 * (blockdev-mirror sync=full copy-mode=write-blocking) to a fresh qemu-nbd, once over plaintext and
 * once with qemu-nbd requiring x509 TLS (object-add tls-creds-x509 + blockdev-add tls-creds); fio
 * runs against drivetap's export only after BLOCK_JOB_READY. After fio the job must still be ready
 * and a cancel must end in BLOCK_JOB_COMPLETED, so a mirror that fell out of sync cannot look fast.
 * Certificates are made with openssl in the run's temp directory. BENCH_ROUNDS, BENCH_RUNTIME_S and
 * BENCH_SIZE as for `npm run bench`.
 */
import { spawn, spawnSync } from "node:child_process";
import * as fs from "node:fs";
import * as os from "node:os";
import * as path from "node:path";
import { QmpClient } from "../src/qmp/client.js";
import {
  CLI,
  JOB_WORKLOADS,
  median,
  need,
  printTable,
  qemuNbdArgs,
  ROUNDS,
  RUNTIME_S,
  runFio,
  SIZE,
  stopProcess,
  waitForSocket,
} from "./common.js";

type Variant = "plaintext" | "TLS";
const VARIANTS: readonly Variant[] = ["plaintext", "TLS"];
const EVENT_TIMEOUT_MS = 600_000;

function openssl(args: readonly string[], cwd: string): void {
  const r = spawnSync("openssl", args, { cwd, encoding: "utf8" });
  if (r.status !== 0) throw new Error(`openssl ${args.join(" ")}: ${r.stderr}`);
}

/** A CA and a server certificate for localhost: the server dir (qemu-nbd) and the client dir (CA only). */
function makeCerts(dir: string): { server: string; client: string } {
  const server = path.join(dir, "server");
  const client = path.join(dir, "client");
  fs.mkdirSync(server);
  fs.mkdirSync(client);
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-noenc"];
  openssl(
    [
      "req",
      "-x509",
      ...ec,
      "-days",
      "30",
      "-subj",
      "/CN=bench-ca",
      "-addext",
      "basicConstraints=critical,CA:TRUE",
    ].concat(["-addext", "keyUsage=critical,keyCertSign", "-keyout", "ca-key.pem", "-out", "ca-cert.pem"]),
    dir,
  );
  openssl(
    ["req", ...ec, "-subj", "/CN=localhost", "-keyout", "server/server-key.pem", "-out", "server.csr"],
    dir,
  );
  fs.writeFileSync(
    path.join(dir, "server.ext"),
    "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n" +
      "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost\n",
  );
  openssl(
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
    ].concat(["-days", "30", "-extfile", "server.ext", "-out", "server/server-cert.pem"]),
    dir,
  );
  fs.copyFileSync(path.join(dir, "ca-cert.pem"), path.join(server, "ca-cert.pem"));
  fs.copyFileSync(path.join(dir, "ca-cert.pem"), path.join(client, "ca-cert.pem"));
  return { server, client };
}

async function once(
  dir: string,
  certs: { server: string; client: string },
  variant: Variant,
  w: (typeof JOB_WORKLOADS)[number],
): Promise<number> {
  const run = fs.mkdtempSync(path.join(dir, "run-"));
  const source = path.join(run, "source.img");
  const target = path.join(run, "target.img");
  fs.writeFileSync(source, "");
  fs.truncateSync(source, SIZE);
  fs.writeFileSync(target, "");
  fs.truncateSync(target, SIZE);
  const targetSocket = path.join(run, "target.sock");
  const tlsArgs =
    variant === "TLS"
      ? [
          "--object",
          `tls-creds-x509,id=tls0,dir=${certs.server},endpoint=server,verify-peer=off`,
          "--tls-creds",
          "tls0",
        ]
      : [];
  const qnbd = spawn("qemu-nbd", [...tlsArgs, ...qemuNbdArgs(target, targetSocket)], { stdio: "ignore" });
  const socket = path.join(run, "nbd.sock");
  const qmpSocket = path.join(run, "qmp.sock");
  const daemon = spawn(process.execPath, [CLI, "serve", source, "--socket", socket, "--qmp", qmpSocket], {
    stdio: "ignore",
  });
  try {
    await waitForSocket(targetSocket, qnbd);
    await waitForSocket(qmpSocket, daemon);
    const qmp = await QmpClient.connect(qmpSocket);
    try {
      const tls: Record<string, unknown> = {};
      if (variant === "TLS") {
        await qmp.execute("object-add", {
          "qom-type": "tls-creds-x509",
          id: "tls0",
          dir: certs.client,
          endpoint: "client",
        });
        tls["tls-creds"] = "tls0";
      }
      await qmp.execute("blockdev-add", {
        driver: "nbd",
        "node-name": "tgt",
        server: { type: "unix", path: targetSocket },
        ...tls,
      });
      await qmp.execute("blockdev-mirror", {
        "job-id": "m0",
        device: "disk0",
        target: "tgt",
        sync: "full",
        "copy-mode": "write-blocking",
      });
      await qmp.waitForEvent(
        (e) => e.event === "BLOCK_JOB_READY" && e.data.device === "m0",
        EVENT_TIMEOUT_MS,
      );
      const value = runFio(`nbd+unix:///?socket=${socket}`, w);
      const jobs = (await qmp.execute("query-block-jobs")) as Array<Record<string, unknown>>;
      if (jobs[0]?.status !== "ready")
        throw new Error(`${variant}: the job is ${String(jobs[0]?.status)} after fio`);
      await qmp.execute("block-job-cancel", { device: "m0" });
      const end = await qmp.waitForEvent(
        (e) =>
          (e.event === "BLOCK_JOB_COMPLETED" || e.event === "BLOCK_JOB_CANCELLED") && e.data.device === "m0",
        EVENT_TIMEOUT_MS,
      );
      if (end.event !== "BLOCK_JOB_COMPLETED" || end.data.error !== undefined) {
        throw new Error(`${variant}: the mirror ended with ${end.event} ${String(end.data.error ?? "")}`);
      }
      return value;
    } finally {
      qmp.close();
    }
  } finally {
    await stopProcess(daemon);
    await stopProcess(qnbd);
    fs.rmSync(run, { recursive: true, force: true });
  }
}

async function main(): Promise<void> {
  for (const tool of ["fio", "qemu-nbd", "openssl"]) need(tool);
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), "drivetap-bench-tls-"));
  try {
    const certs = makeCerts(dir);
    console.log(
      `mirror to qemu-nbd, write-blocking, after READY: ${ROUNDS} rounds of ${RUNTIME_S} s, ${SIZE} bytes`,
    );
    const rows: string[][] = [];
    for (const w of JOB_WORKLOADS) {
      const results: Record<Variant, number[]> = { plaintext: [], TLS: [] };
      for (let round = 0; round < ROUNDS; round++) {
        for (const v of VARIANTS) results[v].push(await once(dir, certs, v, w));
      }
      const fmt = (xs: number[]): string =>
        `${median(xs).toFixed(0)} (${Math.min(...xs).toFixed(0)}-${Math.max(...xs).toFixed(0)})`;
      const ratios = results.TLS.map((x, i) => x / results.plaintext[i]);
      rows.push([
        `${w.name} (${w.unit})`,
        fmt(results.plaintext),
        fmt(results.TLS),
        `${median(ratios).toFixed(2)} (${Math.min(...ratios).toFixed(2)}-${Math.max(...ratios).toFixed(2)})`,
      ]);
    }
    printTable(["workload", "plaintext target", "TLS target", "TLS / plaintext"], rows);
  } finally {
    fs.rmSync(dir, { recursive: true, force: true });
  }
}

await main();
