/**
 * drive-backup sync=none into a new qcow2 target from a source that has no file of its own (an nbd
 * node, here over qemu-nbd): the target names no backing file. QMP's filename for an nbd node is
 * a URI, which no image header may name as a path.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { startDaemon, stopAfter } from "../helpers/daemon.js";
import { connectQmp } from "../helpers/jobs.js";
import { startQemuNbd } from "../helpers/remote.js";
import { runOk, tempDir } from "../helpers/run.js";

const MiB = 1024 * 1024;

test("drive-backup sync=none format=qcow2 from an nbd node: the new target has no backing file", async (t) => {
  const dir = tempDir(t, "drivetap-backup-nbd-");
  const remoteImage = join(dir, "remote.img");
  writeFileSync(remoteImage, Buffer.alloc(4 * MiB, 0x11));
  const remoteSocket = join(dir, "remote.sock");
  await startQemuNbd(t, remoteImage, remoteSocket);

  const qmpPath = join(dir, "qmp.sock");
  const daemon = await startDaemon({ args: ["--qmp", qmpPath] });
  stopAfter(t, daemon);
  const qmp = await connectQmp(t, qmpPath);
  await qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "remote",
    server: { type: "unix", path: remoteSocket },
    export: "",
  });
  const target = join(dir, "t.qcow2");
  await qmp.execute("drive-backup", {
    "job-id": "b",
    device: "remote",
    sync: "none",
    target,
    format: "qcow2",
  });
  const info = JSON.parse((await runOk("qemu-img", ["info", "--output=json", "-U", target])).stdout) as {
    format: string;
    "backing-filename"?: string;
  };
  assert.equal(info.format, "qcow2");
  assert.equal(info["backing-filename"], undefined, `backing file named: ${info["backing-filename"]}`);
  await qmp.execute("block-job-cancel", { device: "b" });
});
