/**
 * A FIFO where an image is expected, named directly or as a qcow2 image's backing file (a header
 * is the image's own text, so a hostile image can name one): opening it for reading would block
 * the event loop until some writer appeared. It is refused as not a regular file, and the daemon
 * keeps answering QMP.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { QmpError } from "../../src/qmp/errors.js";
import { CLI, startDaemon, stopAfter } from "../helpers/daemon.js";
import { connectQmp } from "../helpers/jobs.js";
import { run, runOk, tempDir } from "../helpers/run.js";

const TIMEOUT_MS = 20_000;

test("a FIFO as an image or as a qcow2 backing file is refused, without blocking the daemon", async (t) => {
  const dir = tempDir(t, "drivetap-fifo-");
  const fifo = join(dir, "pipe");
  await runOk("mkfifo", [fifo]);
  const top = join(dir, "top.qcow2");
  // -u: qemu-img does not open the backing file either.
  await runOk("qemu-img", ["create", "-q", "-f", "qcow2", "-u", "-b", fifo, "-F", "raw", top, "1M"]);

  const qmpPath = join(dir, "qmp.sock");
  const daemon = await startDaemon({ args: ["--qmp", qmpPath] });
  stopAfter(t, daemon);
  const qmp = await connectQmp(t, qmpPath);
  for (const args of [
    { driver: "file", "node-name": "f", filename: fifo, "read-only": true },
    { driver: "qcow2", "node-name": "q", "read-only": true, file: { driver: "file", filename: top } },
  ]) {
    await assert.rejects(
      qmp.execute("blockdev-add", args),
      (err: unknown) => err instanceof QmpError && /not a regular file/.test(err.message),
      JSON.stringify(args),
    );
  }
  assert.ok(await qmp.execute("query-version"), "the daemon still answers");

  const served = await run(process.execPath, [CLI, "serve", top, "--read-only", "--socket", join(dir, "s")], {
    timeoutMs: TIMEOUT_MS,
  });
  assert.equal(served.code, 1, served.stderr);
  assert.match(served.stderr, /not a regular file/);
});
