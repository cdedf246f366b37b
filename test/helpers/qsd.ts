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
import { runOk, tempDir } from "./run.js";

export const QSD = "qemu-storage-daemon";

export async function startQsd(t: Pick<TestContext, "after">): Promise<QmpClient> {
  const dir = tempDir(t, "drivetap-qsd-");
  const socket = join(dir, "qmp.sock");
  const pidfile = join(dir, "qsd.pid");
  await runOk(QSD, [
    "--chardev",
    `socket,path=${socket},server=on,wait=off,id=m`,
    "--monitor",
    "chardev=m",
    "--daemonize",
    "--pidfile",
    pidfile,
  ]);
  const pid = Number(readFileSync(pidfile, "utf8").trim());
  t.after(() => {
    try {
      process.kill(pid, "SIGKILL");
    } catch {
      // Already gone.
    }
  });
  const qmp = await QmpClient.connect(socket);
  t.after(() => qmp.close());
  return qmp;
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
