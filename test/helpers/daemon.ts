/**
 * Starts the real drivetap CLI (dist/src/cli/main.js) as a child process, on a unix socket in a fresh
 * temp directory, and waits for its "ready at" line. Interop and fault tests drive it with real clients.
 */
import { spawn, type ChildProcess } from "node:child_process";
import {
  closeSync,
  ftruncateSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  rmSync,
  writeFileSync,
} from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";
import type { TestContext } from "node:test";
import {
  ImageLockError,
  imagePermissions,
  lockImage,
  unlockImage,
} from "../../src/block/drivers/image-lock.js";

/** The repository root (this file runs as dist/test/helpers/daemon.js). */
export const REPO_ROOT = fileURLToPath(new URL("../../../", import.meta.url));
export const CLI = join(REPO_ROOT, "dist/src/cli/main.js");
export const NATIVE_ADDON = join(REPO_ROOT, "build/Release/drivetap_native.node");

const READY_TIMEOUT_MS = 15_000;
const STOP_TIMEOUT_MS = 30_000;

export interface StartOptions {
  /** A raw image file; omitted: the built-in memory disk. */
  readonly image?: string;
  /** Extra arguments after `serve [IMAGE]`. */
  readonly args?: readonly string[];
  /** Listen on TCP (args must carry --port) instead of the default temp unix socket. */
  readonly tcp?: boolean;
  /** Listen on this unix socket instead of one in a fresh temp dir (tests of socket ownership). */
  readonly socket?: string;
  readonly readyTimeoutMs?: number;
  /** Runs the daemon under `ulimit -v` (bytes), so that a leak fails the test instead of the machine. */
  readonly addressSpaceBytes?: number;
  /** Variables added to the daemon's environment. */
  readonly env?: Readonly<Record<string, string>>;
}

export interface RunningDaemon {
  /** The URI printed after "ready at". */
  readonly uri: string;
  /** The unix socket path ("" when serving TCP). */
  readonly socket: string;
  readonly proc: ChildProcess;
  /** Sends the signal and resolves with the exit code (null if killed by a signal). */
  stop(signal?: NodeJS.Signals): Promise<number | null>;
  /** Resolves with the exit code once the process has ended, for whatever reason. */
  readonly exited: Promise<number | null>;
  stdout(): string;
  stderr(): string;
  /** True while the process has not exited. */
  alive(): boolean;
  /** Resolves once stderr (the log) matches (a regex or a predicate); rejects on exit or timeout. */
  waitForStderr(match: RegExp | ((stderr: string) => boolean), timeoutMs?: number): Promise<void>;
  /** SIGKILLs if still running and removes the temp directory; for t.after. */
  cleanup(): Promise<void>;
}

export async function startDaemon(opts: StartOptions = {}): Promise<RunningDaemon> {
  const dir = mkdtempSync(join(tmpdir(), "drivetap-sock-"));
  const socket = opts.tcp ? "" : (opts.socket ?? join(dir, "nbd.sock"));
  const args = [CLI, "serve"];
  if (opts.image !== undefined) args.push(opts.image);
  if (!opts.tcp) args.push("--socket", socket);
  args.push(...(opts.args ?? []));
  const env = { ...process.env, ...opts.env };
  const proc =
    opts.addressSpaceBytes === undefined
      ? spawn(process.execPath, args, { stdio: ["ignore", "pipe", "pipe"], env })
      : spawn(
          "/bin/sh",
          [
            "-c",
            `ulimit -v ${Math.floor(opts.addressSpaceBytes / 1024)} && exec "$0" "$@"`,
            process.execPath,
            ...args,
          ],
          { stdio: ["ignore", "pipe", "pipe"], env },
        );

  let out = "";
  let err = "";
  const listeners = new Set<() => void>();
  const notify = (): void => {
    for (const l of listeners) l();
  };
  proc.stdout!.setEncoding("utf8").on("data", (s: string) => {
    out += s;
    notify();
  });
  proc.stderr!.setEncoding("utf8").on("data", (s: string) => {
    err += s;
    notify();
  });
  const exited = new Promise<number | null>((resolve) => {
    proc.on("exit", (code) => {
      notify();
      resolve(code);
    });
  });
  const spawnError = new Promise<never>((_, reject) => proc.on("error", reject));
  spawnError.catch(() => {});
  const isAlive = (): boolean => proc.exitCode === null && proc.signalCode === null;

  /** Waits until test() holds on the collected output, failing on exit or timeout. */
  const waitFor = (what: string, test: () => boolean, timeoutMs: number): Promise<void> =>
    new Promise((resolve, reject) => {
      const finish = (e?: Error): void => {
        clearTimeout(timer);
        listeners.delete(check);
        if (e) reject(e);
        else resolve();
      };
      const check = (): void => {
        if (test()) finish();
        else if (!isAlive())
          finish(
            new Error(
              `drivetap exited (${proc.exitCode ?? proc.signalCode}) before ${what}\nstdout: ${out}\nstderr: ${err}`,
            ),
          );
      };
      const timer = setTimeout(
        () =>
          finish(new Error(`drivetap: no ${what} within ${timeoutMs} ms\nstdout: ${out}\nstderr: ${err}`)),
        timeoutMs,
      );
      listeners.add(check);
      spawnError.catch((e: Error) => finish(e));
      check();
    });

  const cleanup = async (): Promise<void> => {
    if (isAlive()) {
      proc.kill("SIGKILL");
      await exited;
    }
    rmSync(dir, { recursive: true, force: true });
  };

  try {
    await waitFor(
      "ready line",
      () => /^drivetap: ready at \S+$/m.test(out),
      opts.readyTimeoutMs ?? READY_TIMEOUT_MS,
    );
  } catch (e) {
    await cleanup();
    throw e;
  }
  const uri = /^drivetap: ready at (\S+)$/m.exec(out)![1];

  const stop = async (signal: NodeJS.Signals = "SIGTERM"): Promise<number | null> => {
    if (isAlive()) proc.kill(signal);
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () =>
          reject(
            new Error(`drivetap did not exit within ${STOP_TIMEOUT_MS} ms of ${signal}\nstderr: ${err}`),
          ),
        STOP_TIMEOUT_MS,
      );
    });
    try {
      return await Promise.race([exited, timeout]);
    } finally {
      clearTimeout(timer);
    }
  };

  return {
    uri,
    socket,
    proc,
    stop,
    exited,
    stdout: () => out,
    stderr: () => err,
    alive: isAlive,
    waitForStderr: (match, timeoutMs = 15_000) =>
      waitFor(
        `log matching ${String(match)}`,
        () => (match instanceof RegExp ? match.test(err) : match(err)),
        timeoutMs,
      ),
    cleanup,
  };
}

/** The daemon's peak and current resident memory (VmHWM, VmRSS) in bytes, from /proc. */
export function memoryOf(daemon: RunningDaemon): { peakBytes: number; rssBytes: number } {
  const status = readFileSync(`/proc/${daemon.proc.pid}/status`, "utf8");
  const kib = (field: string): number =>
    Number(new RegExp(`^${field}:\\s+(\\d+) kB`, "m").exec(status)![1]) * 1024;
  return { peakBytes: kib("VmHWM"), rssBytes: kib("VmRSS") };
}

export interface ServedImage {
  readonly daemon: RunningDaemon;
  /** The temp directory holding the image (removed after the test). */
  readonly dir: string;
  readonly image: string;
}

/**
 * A sparse raw image of sizeBytes in a fresh temp dir, served on a unix socket. After the test the
 * daemon is stopped (SIGTERM, then SIGKILL) and the files are removed.
 */
export async function serveTempImage(
  t: Pick<TestContext, "after">,
  sizeBytes: number,
  opts: {
    args?: readonly string[];
    content?: Buffer;
    addressSpaceBytes?: number;
    tcp?: boolean;
    env?: Readonly<Record<string, string>>;
  } = {},
): Promise<ServedImage> {
  const dir = mkdtempSync(join(tmpdir(), "drivetap-img-"));
  const started: RunningDaemon[] = [];
  t.after(async () => {
    for (const d of started) await stopQuietly(d);
    rmSync(dir, { recursive: true, force: true });
  });
  const image = makeImage(join(dir, "disk.img"), sizeBytes, opts.content);
  const daemon = await startDaemon({
    image,
    args: opts.args,
    addressSpaceBytes: opts.addressSpaceBytes,
    tcp: opts.tcp,
    env: opts.env,
  });
  started.push(daemon);
  return { daemon, dir, image };
}

/** Registers the daemon's shutdown after the test: SIGTERM first, SIGKILL if it does not exit. */
export function stopAfter(t: Pick<TestContext, "after">, daemon: RunningDaemon): void {
  t.after(() => stopQuietly(daemon));
}

async function stopQuietly(daemon: RunningDaemon): Promise<void> {
  if (daemon.alive()) await daemon.stop("SIGTERM").catch(() => undefined);
  await daemon.cleanup();
}

/** Creates a sparse raw image of sizeBytes (optionally with content at offset 0). */
export function makeImage(path: string, sizeBytes: number, content?: Buffer): string {
  if (content) writeFileSync(path, content);
  const fd = openSync(path, content ? "r+" : "w");
  try {
    ftruncateSync(fd, sizeBytes);
  } finally {
    closeSync(fd);
  }
  return path;
}

/** Builds an nbd+unix URI for another export name on the same socket. */
export function unixUri(socket: string, exportName = ""): string {
  return `nbd+unix:///${encodeURIComponent(exportName)}?socket=${socket}`;
}

/** Reads bytes straight from an image file, bypassing the daemon. */
export function readImage(path: string, offset: number, length: number): Buffer {
  const fd = openSync(path, "r");
  try {
    const out = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = readSync(fd, out, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return out;
  } finally {
    closeSync(fd);
  }
}

/** How long a killed daemon's image locks may outlive its process (see untilImageUnlocked). */
const KILLED_LOCKS_LINGER_MS_MAX = 10_000;

/**
 * Waits until nobody holds `image`'s write locks. After kill -9 of a daemon on io_uring, requests
 * still in the kernel's workers hold the file open, and so its OFD locks, for a moment after the
 * process is gone: the kernel tears the ring down asynchronously. There is no event for that, so
 * this probes the lock bytes (as a writer would take them) until they are free, up to a bound.
 */
export async function untilImageUnlocked(image: string): Promise<void> {
  const deadline = Date.now() + KILLED_LOCKS_LINGER_MS_MAX;
  for (;;) {
    const fd = openSync(image, "r");
    try {
      lockImage(fd, image, imagePermissions({ readOnly: false }));
      unlockImage(fd);
      return;
    } catch (err) {
      if (!(err instanceof ImageLockError) || Date.now() > deadline) throw err;
    } finally {
      closeSync(fd);
    }
    await new Promise((resolve) => setTimeout(resolve, 10));
  }
}
