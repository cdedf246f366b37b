/**
 * A real Linux guest on drivetap's NBD export: QEMU (TCG) boots the Debian kernel and initramfs that
 * scripts/guest-image.sh builds, with the export as its virtio-blk disk, and the guest's /init
 * (scripts/guest-init.sh) makes an ext4, fills it, deletes, trims, runs fio and checks the result.
 *
 * A guest that stops making progress is diagnosed, not just timed out. A watchdog follows the disk
 * node's completed requests over QMP; when they stop moving for `stallMs`, or the run exceeds its
 * budget, it asks the daemon which NBD requests it has received and not answered
 * (`x-query-nbd-connections`) and puts that, the guest's last heartbeat (its own count of requests in
 * flight) and the console's tail into the failure. So a server holding requests, requests lost between
 * QEMU and the server, and a guest that issues nothing read differently.
 */
import assert from "node:assert/strict";
import { createWriteStream } from "node:fs";
import { join } from "node:path";
import { QmpClient } from "../../src/qmp/client.js";
import { QmpError } from "../../src/qmp/errors.js";
import { REPO_ROOT } from "./daemon.js";
import { runOk, start, type Running } from "./run.js";

/** The first build downloads the kernel package and packs ~90 MiB: allow for a slow mirror. */
const IMAGE_BUILD_TIMEOUT_MS = 10 * 60_000;
/** A whole guest run (boot, mkfs, fill, fstrim, fio, checks) under TCG; it takes about 25 s here. */
export const GUEST_BUDGET_MS_DEFAULT = 110_000;
/** No completed request on the disk for this long while the guest runs counts as a stall. */
export const GUEST_STALL_MS_DEFAULT = 20_000;
/** How often the watchdog samples the node's counters. */
const WATCH_INTERVAL_MS = 1_000;
/** A diagnostic QMP call that takes longer than this means the daemon itself is stuck. */
const DIAG_QMP_TIMEOUT_MS = 5_000;
/** Console lines shown in a failure message. */
const CONSOLE_TAIL_LINES = 60;
/** Unanswered requests listed per connection in a report (the rest are counted). */
const REPORT_REQUESTS_MAX = 40;
/** A request the server has held for longer than this is a server stall, not ordinary latency. */
export const SERVER_STALL_AGE_MS = 2_000;

export const MARKER = "DRIVETAP-GUEST: ";

// ---- the kernel and initramfs ------------------------------------------------------------------------

export interface GuestImage {
  readonly kernel: string;
  readonly initrd: string;
  readonly kver: string;
}

let imagePromise: Promise<GuestImage> | null = null;

/** Builds (or finds in the cache) the guest's kernel and initramfs; once per process. */
export function guestImage(): Promise<GuestImage> {
  imagePromise ??= (async () => {
    const r = await runOk(join(REPO_ROOT, "scripts/guest-image.sh"), [], {
      timeoutMs: IMAGE_BUILD_TIMEOUT_MS,
    });
    const field = (name: string): string => {
      const m = new RegExp(`^${name}=(.+)$`, "m").exec(r.stdout);
      assert.ok(m, `guest-image.sh printed ${name}=; stdout: ${r.stdout}\nstderr: ${r.stderr}`);
      return m[1];
    };
    return { kernel: field("kernel"), initrd: field("initrd"), kver: field("kver") };
  })();
  imagePromise.catch(() => (imagePromise = null));
  return imagePromise;
}

// ---- what the daemon says about its NBD connections --------------------------------------------------

/** One request the server has received and not yet answered (x-query-nbd-connections). */
export interface NbdInFlight {
  readonly command: string;
  readonly offset: number;
  readonly length: number;
  readonly "age-ms": number;
}

export interface NbdConnectionInfo {
  readonly id: number;
  readonly export: string;
  readonly "x-in-flight": readonly NbdInFlight[];
  readonly "x-unsent-bytes": number;
  /** What the connection's reading waits for (a held request header is not in x-in-flight). */
  readonly "x-waiting"?: string;
  readonly "x-held-buffer-bytes"?: number;
  readonly "x-reading-paused"?: boolean;
}

/** The server's side of a stall: what it holds, or why it cannot say. */
export interface ServerView {
  /** The connections, or null when the daemon could not be asked. */
  readonly connections: NbdConnectionInfo[] | null;
  /** Why `connections` is null (CommandNotFound before the command exists, a hung daemon, ...). */
  readonly unavailable?: string;
}

function withTimeout<V>(p: Promise<V>, ms: number, what: string): Promise<V> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer within ${ms} ms`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(timer));
}

export async function queryNbdConnections(qmp: QmpClient): Promise<ServerView> {
  try {
    const ret = await withTimeout(
      qmp.execute("x-query-nbd-connections"),
      DIAG_QMP_TIMEOUT_MS,
      "x-query-nbd-connections",
    );
    return { connections: ret as NbdConnectionInfo[] };
  } catch (err) {
    if (err instanceof QmpError)
      return {
        connections: null,
        unavailable: `${err.errorClass}: ${err.message}${err.errorClass === "CommandNotFound" ? " (this daemon predates x-query-nbd-connections)" : ""}`,
      };
    return {
      connections: null,
      unavailable: `the daemon did not answer over QMP: ${(err as Error).message}`,
    };
  }
}

/** The guest's own view of its disk, from one heartbeat line. */
export interface GuestHeartbeat {
  readonly uptimeS: number;
  readonly inFlightReads: number;
  readonly inFlightWrites: number;
  /** Requests the guest has seen completed: reads + writes + discards + flushes (/sys/block/vda/stat). */
  readonly completed: number;
  readonly line: string;
}

export function heartbeats(console: string): GuestHeartbeat[] {
  const re = /DRIVETAP-GUEST: hb uptime ([\d.]+) inflight (\d+) (\d+) stat ([\d ]*)/g;
  const out: GuestHeartbeat[] = [];
  for (const m of console.matchAll(re)) {
    const end = console.indexOf("\n", m.index);
    // Fields 1, 5, 12 and 16 of the stat file count completed reads, writes, discards and flushes.
    const stat = m[4].trim().split(/\s+/).map(Number);
    const completed = [0, 4, 11, 15].reduce((n, i) => n + (stat[i] || 0), 0);
    out.push({
      uptimeS: Number(m[1]),
      inFlightReads: Number(m[2]),
      inFlightWrites: Number(m[3]),
      completed,
      line: console.slice(m.index, end < 0 ? undefined : end).trim(),
    });
  }
  return out;
}

export function lastHeartbeat(console: string): GuestHeartbeat | null {
  return heartbeats(console).pop() ?? null;
}

/**
 * Spans (guest seconds) in which the guest had requests in flight and saw none complete, longest
 * first: a guest-side stall even while the server stays busy (with a mirror's copy, for example).
 * `current` is the span still open at the last heartbeat (0 if none).
 */
export function guestWaits(beats: readonly GuestHeartbeat[]): { longestS: number; currentS: number } {
  let longestS = 0;
  let since: GuestHeartbeat | null = null;
  for (let i = 0; i < beats.length; i++) {
    const b = beats[i];
    const stuck = b.inFlightReads + b.inFlightWrites > 0 && since !== null && b.completed === since.completed;
    if (stuck) longestS = Math.max(longestS, b.uptimeS - since!.uptimeS);
    else since = b.inFlightReads + b.inFlightWrites > 0 ? b : null;
  }
  const last = beats[beats.length - 1];
  const currentS = since && last && last !== since ? last.uptimeS - since.uptimeS : 0;
  return { longestS: Math.round(longestS * 100) / 100, currentS: Math.round(currentS * 100) / 100 };
}

/** Which side holds the stall, from the server's and the guest's view. */
export function stallVerdict(server: ServerView, guest: GuestHeartbeat | null): string {
  const guestHolds = guest ? guest.inFlightReads + guest.inFlightWrites : null;
  const guestText =
    guestHolds === null
      ? "the guest printed no heartbeat"
      : `the guest's last heartbeat (uptime ${guest!.uptimeS} s) shows ${guestHolds} requests in flight`;
  if (server.connections === null) {
    return `UNKNOWN which side: the server's view is unavailable (${server.unavailable}); ${guestText}`;
  }
  const held = server.connections.flatMap((c) => c["x-in-flight"]);
  const oldMs = Math.max(0, ...held.map((r) => r["age-ms"]));
  const unsent = server.connections.reduce((n, c) => n + c["x-unsent-bytes"], 0);
  if (held.length > 0 && oldMs >= SERVER_STALL_AGE_MS) {
    const unread =
      guestHolds !== null && guestHolds > held.length
        ? ` (the other ${guestHolds - held.length} never reached the server: they wait in QEMU, whose NBD client sends at most 16 at a time, or in the socket)`
        : "";
    return `SERVER STALL: the server has received ${held.length} requests it has not answered, the oldest ${oldMs} ms ago; ${guestText}${unread}`;
  }
  if (unsent > 0)
    return `SERVER SIDE: replies are written but ${unsent} bytes are not yet sent on the socket (QEMU is not reading?); ${guestText}`;
  if (guestHolds !== null && guestHolds > 0)
    return `BETWEEN GUEST AND SERVER: the server holds ${held.length} requests (none older than ${SERVER_STALL_AGE_MS} ms) while ${guestText}: requests are stuck in QEMU or never reached the socket`;
  return `GUEST STALL: the server holds ${held.length} requests and ${guestText}: the guest is not issuing I/O`;
}

/** A readable report of the server's view. */
export function describeServerView(view: ServerView): string {
  if (view.connections === null) return `server view unavailable: ${view.unavailable}`;
  if (view.connections.length === 0) return "server view: no NBD connections";
  const lines = [`server view (x-query-nbd-connections): ${view.connections.length} connections`];
  for (const c of view.connections) {
    const held = [...c["x-in-flight"]].sort((a, b) => b["age-ms"] - a["age-ms"]);
    lines.push(
      `  connection ${c.id} export ${JSON.stringify(c.export)}: ${held.length} received and unanswered, ${c["x-unsent-bytes"]} reply bytes unsent, reading ${c["x-reading-paused"] ? "paused" : "on"} (waiting for ${c["x-waiting"] ?? "?"}), ${c["x-held-buffer-bytes"] ?? "?"} buffer bytes held`,
    );
    for (const r of held.slice(0, REPORT_REQUESTS_MAX))
      lines.push(`    ${r.command} offset ${r.offset} length ${r.length} age ${r["age-ms"]} ms`);
    if (held.length > REPORT_REQUESTS_MAX)
      lines.push(`    ... and ${held.length - REPORT_REQUESTS_MAX} more`);
  }
  return lines.join("\n");
}

async function nodeStats(qmp: QmpClient, nodeName: string): Promise<Record<string, number>> {
  const nodes = (await qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
  const node = nodes.find((n) => n["node-name"] === nodeName);
  assert.ok(node, `node ${nodeName} exists`);
  return node["x-stats"] as Record<string, number>;
}

/** Sum of a node's completed requests (x-stats): it moves as long as the server answers I/O. */
async function nodeOps(qmp: QmpClient, nodeName: string): Promise<number> {
  const s = await nodeStats(qmp, nodeName);
  return s.readOps + s.writeOps + s.zeroOps + s.discardOps + s.flushOps + s.blockStatusOps + s.failedOps;
}

/** The whole stall report: verdict, the server's unanswered requests, jobs, node counters. */
export async function stallReport(qmp: QmpClient, console: string, nodeName: string): Promise<string> {
  const server = await queryNbdConnections(qmp);
  const guest = lastHeartbeat(console);
  const parts = [`verdict: ${stallVerdict(server, guest)}`, describeServerView(server)];
  parts.push(`guest view: ${guest ? guest.line : "no heartbeat"}`);
  for (const [what, call] of [
    ["query-block-jobs", () => qmp.execute("query-block-jobs")],
    [`${nodeName} x-stats`, () => nodeStats(qmp, nodeName)],
  ] as const) {
    try {
      parts.push(`${what}: ${JSON.stringify(await withTimeout(call(), DIAG_QMP_TIMEOUT_MS, what))}`);
    } catch (err) {
      parts.push(`${what}: ${(err as Error).message}`);
    }
  }
  return parts.join("\n");
}

// ---- running a guest ---------------------------------------------------------------------------------

export interface GuestOptions {
  /** drivetap's NBD unix socket and export name. */
  readonly socket: string;
  readonly exportName?: string;
  /** drivetap's QMP socket: the watchdog opens its own connection on it. */
  readonly qmpPath: string;
  /** The node behind the export, whose counters show progress. */
  readonly nodeName?: string;
  /** Where console.log goes. */
  readonly dir: string;
  readonly fillMib?: number;
  readonly fioSeconds?: number;
  readonly fioMib?: number;
  readonly budgetMs?: number;
  readonly stallMs?: number;
  /**
   * What QEMU does with the guest's discards: "unmap" (default) passes them on, so fstrim reaches the
   * server; "ignore" drops them, so mkfs and fstrim leave what the disk held before in place.
   */
  readonly discard?: "unmap" | "ignore";
}

export interface GuestResult {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly console: string;
  /** QEMU's own messages (bad arguments, a missing ROM, an NBD connection it could not make). */
  readonly stderr: string;
  readonly durationMs: number;
  /** The `DRIVETAP-GUEST: ` lines, without the prefix. */
  readonly markers: string[];
}

export interface RunningGuest {
  readonly consolePath: string;
  /** The console so far. */
  console(): string;
  /** Resolves with the first console line matching re that starts at or after character `from`. */
  waitForConsole(re: RegExp, opts?: { from?: number; timeoutMs?: number }): Promise<string>;
  /**
   * Resolves when QEMU has exited; rejects (after killing QEMU) when the watchdog found a stall or
   * the budget ran out, with the stall report and the console's tail in the message.
   */
  readonly done: Promise<GuestResult>;
  kill(): void;
}

export function consoleTail(console: string, lines = CONSOLE_TAIL_LINES): string {
  const all = console.replace(/\r/g, "").split("\n");
  return all.slice(-lines).join("\n");
}

/** Boots the guest on the export; the watchdog runs until QEMU exits. */
export async function startGuest(opts: GuestOptions): Promise<RunningGuest> {
  const image = await guestImage();
  const nodeName = opts.nodeName ?? "disk0";
  const consolePath = join(opts.dir, "console.log");
  const consoleFile = createWriteStream(consolePath);
  const params = [
    `drivetap.fill_mib=${opts.fillMib ?? 64}`,
    `drivetap.fio_seconds=${opts.fioSeconds ?? 5}`,
    `drivetap.fio_mib=${opts.fioMib ?? 64}`,
  ];
  const nbd = [
    "driver=nbd",
    "node-name=disk",
    "server.type=unix",
    `server.path=${opts.socket}`,
    ...(opts.exportName ? [`export=${opts.exportName}`] : []),
    // QEMU drops guest discards unless told to pass them on: fstrim must reach the server.
    `discard=${opts.discard ?? "unmap"}`,
  ].join(",");
  const args = [
    "-accel",
    "tcg",
    "-m",
    "512",
    "-nodefaults",
    "-nographic",
    "-serial",
    "stdio",
    "-no-reboot",
    "-kernel",
    image.kernel,
    "-initrd",
    image.initrd,
    "-append",
    ["console=ttyS0", "panic=-1", "quiet", ...params].join(" "),
    "-blockdev",
    nbd,
    "-device",
    "virtio-blk-pci,drive=disk",
  ];
  const qmp = await QmpClient.connect(opts.qmpPath);
  const startedMs = Date.now();
  const budgetMs = opts.budgetMs ?? GUEST_BUDGET_MS_DEFAULT;
  const qemu: Running = start("qemu-system-x86_64", args, { timeoutMs: budgetMs + 60_000 });
  let text = "";
  const waiters = new Set<() => void>();
  qemu.proc.stdout!.on("data", (s: string) => {
    text += s;
    consoleFile.write(s);
    for (const w of waiters) w();
  });

  const stallMs = opts.stallMs ?? GUEST_STALL_MS_DEFAULT;
  let resolveStall: ((reason: string) => void) | null = null;
  const stall = new Promise<string>((resolve) => (resolveStall = resolve));
  let lastOps = -1;
  let lastChangeMs = Date.now();
  let sampling = false;
  const watch = setInterval(() => {
    if (sampling) return;
    sampling = true;
    const elapsedMs = Date.now() - startedMs;
    if (elapsedMs > budgetMs) resolveStall!(`the guest run exceeded its budget of ${budgetMs} ms`);
    const waits = guestWaits(heartbeats(text));
    if (waits.currentS * 1000 > stallMs)
      resolveStall!(
        `the guest has had requests in flight and seen none complete for ${waits.currentS} s (its heartbeats), ${elapsedMs} ms into the run`,
      );
    withTimeout(nodeOps(qmp, nodeName), DIAG_QMP_TIMEOUT_MS, "query-named-block-nodes")
      .then((ops) => {
        // The clock starts once the guest's init runs: a kernel still booting (slowly, on a loaded
        // machine under TCG) issues no I/O and is not a stall; the run's budget bounds that part.
        if (ops !== lastOps || !text.includes(MARKER)) {
          lastOps = ops;
          lastChangeMs = Date.now();
        } else if (Date.now() - lastChangeMs > stallMs) {
          resolveStall!(
            `no request on ${nodeName} completed for ${Date.now() - lastChangeMs} ms (${ops} so far), ${elapsedMs} ms into the run`,
          );
        }
      })
      .catch((err: Error) => resolveStall!(`the daemon did not answer QMP: ${err.message}`))
      .finally(() => (sampling = false));
  }, WATCH_INTERVAL_MS);

  const stalled = stall.then(async (reason) => {
    const report = await stallReport(qmp, text, nodeName);
    qemu.proc.kill("SIGKILL");
    throw new Error(
      `guest stalled: ${reason}\n${report}\nQEMU stderr: ${qemu.stderr().trim() || "(empty)"}\n--- guest console (last ${CONSOLE_TAIL_LINES} lines) ---\n${consoleTail(text)}`,
    );
  });

  const exited = qemu.result.then((r) => ({
    code: r.code,
    signal: r.signal,
    console: text,
    stderr: r.stderr,
    durationMs: Date.now() - startedMs,
    markers: text
      .replace(/\r/g, "")
      .split("\n")
      .filter((l) => l.startsWith(MARKER))
      .map((l) => l.slice(MARKER.length)),
  }));
  const done = Promise.race([exited, stalled]).finally(() => {
    clearInterval(watch);
    qmp.close();
    consoleFile.end();
    if (qemu.proc.exitCode === null && qemu.proc.signalCode === null) qemu.proc.kill("SIGKILL");
  });
  done.catch(() => undefined);

  const waitForConsole = (re: RegExp, o: { from?: number; timeoutMs?: number } = {}): Promise<string> =>
    new Promise((resolve, reject) => {
      const from = o.from ?? 0;
      const check = (): void => {
        const lines = text.slice(from).replace(/\r/g, "").split("\n");
        // Only whole lines: the last element may still be growing.
        const line = lines.slice(0, -1).find((l) => re.test(l));
        if (line !== undefined) finish(() => resolve(line));
      };
      const timer = setTimeout(
        () =>
          finish(() =>
            reject(new Error(`the guest printed no ${re} in ${o.timeoutMs} ms\n${consoleTail(text)}`)),
          ),
        o.timeoutMs ?? budgetMs,
      );
      const finish = (f: () => void): void => {
        clearTimeout(timer);
        waiters.delete(check);
        f();
      };
      waiters.add(check);
      done.then(
        () =>
          finish(() => reject(new Error(`QEMU exited before the guest printed ${re}\n${consoleTail(text)}`))),
        (err: Error) => finish(() => reject(err)),
      );
      check();
    });

  return {
    consolePath,
    console: () => text,
    waitForConsole,
    done,
    kill: () => qemu.proc.kill("SIGKILL"),
  };
}

/** Fails unless QEMU exited 0 after the guest's "result ok"; the message carries the console's tail. */
export function assertGuestOk(r: GuestResult): void {
  const result = r.markers.filter((m) => m.startsWith("result ")).pop();
  const msg = `guest ${result ?? "printed no result"} (QEMU exited ${r.code ?? r.signal} after ${r.durationMs} ms)\nQEMU stderr: ${r.stderr.trim() || "(empty)"}\n--- guest console (last ${CONSOLE_TAIL_LINES} lines) ---\n${consoleTail(r.console)}`;
  assert.equal(result, "result ok", msg);
  assert.equal(r.code, 0, msg);
  for (const step of ["step mkfs", "step fill", "step fstrim", "step fio", "step check"])
    assert.ok(
      r.markers.some((m) => m.startsWith(step)),
      `guest reached ${step}\n${msg}`,
    );
}

/**
 * One line on a finished run: its duration, the guest's fio summary ("fio rc 0 NAME;ERR;READ_KIB;
 * READ_IOPS;READ_MS;WRITE_KIB;WRITE_IOPS;WRITE_MS") and the longest the guest waited with requests
 * in flight and none completing.
 */
export function describeRun(r: GuestResult): string {
  const fio = r.markers.find((m) => m.startsWith("fio rc ")) ?? "no fio summary";
  const waits = guestWaits(heartbeats(r.console));
  return `guest run ${r.durationMs} ms; ${fio}; longest guest wait with requests in flight and none completing: ${waits.longestS} s (2 s heartbeats)`;
}

/** e2fsck -fn on an image file: exit 0 (clean) or the test fails with its output. */
export async function assertFsckClean(image: string): Promise<void> {
  await runOk("e2fsck", ["-fn", image]);
}
