/**
 * Running external tools from tests. A tool that is not installed makes the test fail with a message
 * naming the tool (never a skip): interop tests are only worth something when they actually run.
 */
import { spawn, type ChildProcess, type SpawnOptions } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestContext } from "node:test";

export interface RunResult {
  readonly code: number | null;
  readonly signal: NodeJS.Signals | null;
  readonly stdout: string;
  readonly stderr: string;
}

export interface RunOptions {
  readonly cwd?: string;
  readonly env?: NodeJS.ProcessEnv;
  /** Written to stdin, which is then closed. */
  readonly input?: string | Buffer;
  /** The process is killed and the run fails after this long. */
  readonly timeoutMs?: number;
}

const DEFAULT_TIMEOUT_MS = 120_000;

function missingTool(cmd: string): Error {
  return new Error(
    `required tool "${cmd}" is not installed (spawn ENOENT); install it (Debian: qemu-utils, libnbd-bin, fio, nbdkit, python3-libnbd)`,
  );
}

/** A started process whose end can be awaited; stdout and stderr are collected as text. */
export interface Running {
  readonly proc: ChildProcess;
  readonly result: Promise<RunResult>;
  stdout(): string;
  stderr(): string;
  /** Resolves with the first stdout line matching re; rejects if the process ends or time runs out first. */
  waitForStdout(re: RegExp, timeoutMs?: number): Promise<string>;
}

export function start(cmd: string, args: readonly string[], opts: RunOptions = {}): Running {
  const spawnOpts: SpawnOptions = {
    cwd: opts.cwd,
    env: opts.env ?? process.env,
    stdio: ["pipe", "pipe", "pipe"],
  };
  const proc = spawn(cmd, args as string[], spawnOpts);
  let out = "";
  let err = "";
  const lineWaiters = new Set<() => void>();
  proc.stdout!.setEncoding("utf8").on("data", (s: string) => {
    out += s;
    for (const w of lineWaiters) w();
  });
  proc.stderr!.setEncoding("utf8").on("data", (s: string) => (err += s));
  proc.stdin!.on("error", () => {}); // the process may exit before reading its input
  if (opts.input !== undefined) proc.stdin!.end(opts.input);
  else proc.stdin!.end();

  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const result = new Promise<RunResult>((resolve, reject) => {
    const timer = setTimeout(() => {
      proc.kill("SIGKILL");
      reject(
        new Error(
          `${cmd} ${args.join(" ")} did not finish in ${timeoutMs} ms\nstdout: ${out}\nstderr: ${err}`,
        ),
      );
    }, timeoutMs);
    proc.on("error", (e: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      reject(e.code === "ENOENT" ? missingTool(cmd) : e);
    });
    proc.on("close", (code, signal) => {
      clearTimeout(timer);
      for (const w of lineWaiters) w();
      resolve({ code, signal, stdout: out, stderr: err });
    });
  });
  // Callers that only use waitForStdout still see a spawn failure through it; avoid an unhandled rejection.
  result.catch(() => {});

  const waitForStdout = (re: RegExp, waitMs = 30_000): Promise<string> =>
    new Promise((resolve, reject) => {
      let done = false;
      const check = (): void => {
        if (done) return;
        const line = out.split("\n").find((l) => re.test(l));
        if (line !== undefined) finish(() => resolve(line));
        else if (proc.exitCode !== null || proc.signalCode !== null) {
          finish(() =>
            reject(new Error(`${cmd} exited before printing ${re}\nstdout: ${out}\nstderr: ${err}`)),
          );
        }
      };
      const timer = setTimeout(
        () =>
          finish(() =>
            reject(
              new Error(`${cmd} did not print ${re} within ${waitMs} ms\nstdout: ${out}\nstderr: ${err}`),
            ),
          ),
        waitMs,
      );
      const finish = (f: () => void): void => {
        done = true;
        clearTimeout(timer);
        lineWaiters.delete(check);
        f();
      };
      lineWaiters.add(check);
      result.catch((e: Error) => finish(() => reject(e)));
      check();
    });

  return { proc, result, stdout: () => out, stderr: () => err, waitForStdout };
}

/** Runs cmd to completion. Rejects only when the tool is missing or times out; check `code` yourself. */
export function run(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  return start(cmd, args, opts).result;
}

/** Runs cmd and fails unless it exits 0; the message carries the command and its output. */
export async function runOk(cmd: string, args: readonly string[], opts: RunOptions = {}): Promise<RunResult> {
  const r = await run(cmd, args, opts);
  if (r.code !== 0) {
    throw new Error(
      `${cmd} ${args.join(" ")} exited ${r.code ?? r.signal}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`,
    );
  }
  return r;
}

/** A fresh directory under the system temp dir, removed after the test (or suite) that asked for it. */
export function tempDir(t: Pick<TestContext, "after">, prefix = "drivetap-test-"): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/**
 * Runs a server that forks into the background once it is ready and writes its pid to `pidFile`
 * (qemu-nbd --fork, qemu-storage-daemon --daemonize): its return is the readiness, nothing to poll.
 * The server is signalled after the test. Returns its pid.
 */
export async function runForking(
  t: Pick<TestContext, "after">,
  cmd: string,
  args: readonly string[],
  pidFile: string,
  signal: NodeJS.Signals = "SIGTERM",
): Promise<number> {
  await runOk(cmd, args);
  const pid = Number(readFileSync(pidFile, "utf8").trim());
  if (!(pid > 0)) throw new Error(`${cmd} wrote no pid to ${pidFile}`);
  t.after(() => {
    try {
      process.kill(pid, signal);
    } catch {
      // Already gone.
    }
  });
  return pid;
}

/** The system python with the libnbd bindings (a pyenv shim on PATH may lack them). */
export const SYSTEM_PYTHON = "/usr/bin/python3";
