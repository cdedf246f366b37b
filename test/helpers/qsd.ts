/**
 * The real qemu-storage-daemon (7.2), for tests that compare drivetap's QMP replies with QEMU's.
 * It is started with --daemonize, whose parent exits only once the monitor socket listens, so there
 * is nothing to poll for; the daemon is killed by the pid it wrote when the test ends.
 */
import { readFileSync } from "node:fs";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { QmpClient } from "../../src/qmp/client.js";
import { QmpError } from "../../src/qmp/errors.js";
import { CLI } from "./daemon.js";
import { runOk, tempDir } from "./run.js";

export const QSD = "/usr/bin/qemu-storage-daemon";
/** drivetap's qemu-storage-daemon command line, to be started exactly as QSD is. */
export const DRIVETAP_STORAGE_DAEMON: readonly string[] = [process.execPath, CLI, "storage-daemon"];

/**
 * Starts qemu-storage-daemon (or `command`, taking its command line) with a QMP monitor at `socket`
 * and `extraArgs`; --daemonize returns once its sockets listen. Killed after the test. QSD's monitor
 * takes one client at a time: a test that speaks raw QMP connects to `socket` itself.
 */
export async function startQsdProcess(
  t: Pick<TestContext, "after">,
  extraArgs: readonly string[] = [],
  command: readonly string[] = [QSD],
): Promise<{ socket: string; dir: string; pid: number }> {
  const dir = tempDir(t, "drivetap-qsd-");
  const socket = join(dir, "qmp.sock");
  const pidfile = join(dir, "qsd.pid");
  await runOk(command[0], [
    ...command.slice(1),
    "--chardev",
    `socket,path=${socket},server=on,wait=off,id=m0`,
    "--monitor",
    "chardev=m0",
    ...extraArgs,
    "--pidfile",
    pidfile,
    "--daemonize",
  ]);
  const pid = Number(readFileSync(pidfile, "utf8"));
  t.after(() => {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // Already gone.
    }
  });
  return { socket, dir, pid };
}

/** startQsdProcess, with a QMP client connected to its monitor. */
export async function startQsd(
  t: Pick<TestContext, "after">,
  extraArgs: readonly string[] = [],
  command: readonly string[] = [QSD],
): Promise<{ qmp: QmpClient; dir: string }> {
  const { socket, dir } = await startQsdProcess(t, extraArgs, command);
  const qmp = await QmpClient.connect(socket);
  t.after(() => qmp.close());
  return { qmp, dir };
}

/** A command's reply as data: `{return}` or `{error: {class, desc}}`, so two servers' can be compared. */
export async function outcome(
  qmp: QmpClient,
  command: string,
  args?: Record<string, unknown>,
): Promise<unknown> {
  try {
    return { return: await qmp.execute(command, args) };
  } catch (err) {
    if (err instanceof QmpError) return { error: { class: err.errorClass, desc: err.message } };
    throw err;
  }
}
