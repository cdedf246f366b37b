/**
 * Remote NBD targets for the client-driver and mirror tests: qemu-nbd over a raw image and nbdkit
 * (memory plugin, optionally behind filters), each on a unix socket, with kill -9 and restart on the
 * same socket, optionally requiring TLS (x509, with or without client certificates, or PSK). Readiness
 * is awaited by connecting, never by sleeping.
 */
import assert from "node:assert/strict";
import * as net from "node:net";
import { existsSync, rmSync } from "node:fs";
import type { TestContext } from "node:test";
import { blockJob, jobEvent, pollUntil, type QmpDaemon } from "./jobs.js";
import { runOk, start, type Running } from "./run.js";

export interface RemoteTarget {
  readonly socket: string;
  /** Restartable: the process now serving, if any. */
  readonly running: Running | null;
  /** kill -9; resolves when the process is gone. */
  kill(): Promise<void>;
  /** Starts it again on the same socket and waits until it accepts connections. */
  restart(): Promise<void>;
}

function accepts(socket: string): Promise<boolean> {
  return new Promise((resolve) => {
    if (!existsSync(socket)) return resolve(false);
    const s = net.createConnection({ path: socket });
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

async function startTarget(
  t: Pick<TestContext, "after">,
  what: string,
  socket: string,
  cmd: string,
  args: readonly string[],
): Promise<RemoteTarget> {
  let running: Running | null = null;
  const launch = async (): Promise<void> => {
    rmSync(socket, { force: true });
    const r = start(cmd, args, { timeoutMs: 30 * 60_000 });
    running = r;
    let exited = false;
    void r.result.then(
      () => (exited = true),
      () => (exited = true),
    );
    await pollUntil(
      `${what} listening on ${socket}`,
      async () => {
        if (exited) throw new Error(`${what} exited: ${r.stderr()}`);
        return accepts(socket);
      },
      15_000,
    );
  };
  const kill = async (): Promise<void> => {
    const r = running;
    if (!r) return;
    running = null;
    r.proc.kill("SIGKILL");
    await r.result.catch(() => undefined);
  };
  t.after(kill);
  await launch();
  return {
    socket,
    get running() {
      return running;
    },
    kill,
    restart: launch,
  };
}

/** TLS a server requires: x509 from a QEMU-style dir (verifyPeer: demand a client certificate), or PSK. */
export type ServerTls =
  | { readonly kind: "x509"; readonly dir: string; readonly verifyPeer?: boolean }
  | { readonly kind: "psk"; readonly dir: string };

/** qemu-nbd's arguments for TLS: a credentials object and --tls-creds naming it. */
function qemuNbdTlsArgs(tls: ServerTls | undefined): string[] {
  if (!tls) return [];
  const object =
    tls.kind === "x509"
      ? `tls-creds-x509,id=tls0,dir=${tls.dir},endpoint=server,verify-peer=${tls.verifyPeer ? "on" : "off"}`
      : `tls-creds-psk,id=tls0,dir=${tls.dir},endpoint=server`;
  return ["--object", object, "--tls-creds", "tls0"];
}

/** nbdkit's arguments to require TLS (x509 dir, or the keys.psk file). */
export function nbdkitTlsArgs(tls: ServerTls): string[] {
  if (tls.kind === "psk") return ["--tls=require", `--tls-psk=${tls.dir}/keys.psk`];
  return ["--tls=require", `--tls-certificates=${tls.dir}`, ...(tls.verifyPeer ? ["--tls-verify-peer"] : [])];
}

/**
 * qemu-nbd serving a raw image, writeback cache, up to 8 clients, staying up between clients. With
 * `discard: "ignore"` (qemu-nbd's default) it advertises TRIM but keeps the data. With `tls`, it
 * accepts only clients that negotiate TLS.
 */
export function startQemuNbd(
  t: Pick<TestContext, "after">,
  image: string,
  socket: string,
  opts: { discard?: "unmap" | "ignore"; tls?: ServerTls } = {},
): Promise<RemoteTarget> {
  const discard = opts.discard === "ignore" ? [] : ["--discard=unmap"];
  return startTarget(t, "qemu-nbd", socket, "qemu-nbd", [
    ...qemuNbdTlsArgs(opts.tls),
    "-f",
    "raw",
    "-k",
    socket,
    "-t",
    "-e",
    "8",
    "--cache=writeback",
    ...discard,
    image,
  ]);
}

/** nbdkit in the foreground on a unix socket; `plugin` and its arguments, filters as --filter=NAME. */
export function startNbdkit(
  t: Pick<TestContext, "after">,
  socket: string,
  args: readonly string[],
): Promise<RemoteTarget> {
  return startTarget(t, "nbdkit", socket, "nbdkit", ["-f", "-U", socket, ...args]);
}

// ---- mirror jobs -------------------------------------------------------------------------------------

/** Waits for BLOCK_JOB_READY and checks the job says ready. */
export async function untilReady(d: QmpDaemon, id: string): Promise<void> {
  await d.qmp.waitForEvent(jobEvent(id, "BLOCK_JOB_READY"), 60_000);
  assert.equal((await blockJob(d.qmp, id)).status, "ready");
}

/** block-job-cancel after READY: the mirror completes (not cancelled) with the target in sync. */
export async function cancelInSync(d: QmpDaemon, id: string): Promise<void> {
  await d.qmp.execute("block-job-cancel", { device: id });
  const e = await d.qmp.waitForEvent(jobEvent(id, "BLOCK_JOB_COMPLETED"), 60_000);
  assert.equal(e.data.error, undefined, `the mirror ended without error: ${JSON.stringify(e.data)}`);
  assert.ok(!d.qmp.events.some(jobEvent(id, "BLOCK_JOB_CANCELLED")));
}

/** qemu-img compare of two raw images (files or NBD URIs) says identical. */
export async function assertIdentical(a: string, b: string): Promise<void> {
  const r = await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", a, b]);
  assert.match(r.stdout, /Images are identical/);
}
