/**
 * A daemon stopping with requests in flight answers every request it carried out before it closes
 * the connection (the replies of its last event-loop turn included). Writes go through a throttle
 * node (50 IOPS), so they are still in flight when SIGTERM comes and finish one per throttle tick
 * during the shutdown.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { NbdConnection } from "../../src/nbd/client/connection.js";
import * as C from "../../src/nbd/protocol/constants.js";
import { startDaemon, stopAfter } from "../helpers/daemon.js";
import { connectQmp } from "../helpers/jobs.js";
import { tempDir } from "../helpers/run.js";

const WRITES = 20;

test("SIGTERM with throttled writes in flight: every write the daemon carried out is answered before it closes", async (t) => {
  const dir = tempDir(t, "drivetap-shutdown-");
  const qmpPath = join(dir, "qmp.sock");
  const socket = join(dir, "nbd.sock");
  const daemon = await startDaemon({ socket, args: ["--qmp", qmpPath] });
  stopAfter(t, daemon);
  const qmp = await connectQmp(t, qmpPath);
  await qmp.execute("object-add", { "qom-type": "throttle-group", id: "slow", limits: { "iops-total": 50 } });
  await qmp.execute("blockdev-add", {
    driver: "throttle",
    "node-name": "slow0",
    "throttle-group": "slow",
    file: { driver: "null-co", size: 64 * 1024 * 1024 },
  });
  await qmp.execute("block-export-add", {
    type: "nbd",
    id: "e",
    "node-name": "slow0",
    name: "slow",
    writable: true,
  });

  const nbd = await NbdConnection.open({ type: "unix", path: socket }, "slow", 10_000);
  const data = Buffer.alloc(4096, 0x5a);
  let answered = 0;
  const writes = Array.from({ length: WRITES }, (_, i) =>
    nbd.request(C.NBD_CMD_WRITE, 0, i * 4096, 4096, [data]).then(
      () => {
        answered++;
        return "ok";
      },
      (err: Error) => err.message,
    ),
  );
  // The first answers have come; the rest are queued in the throttle, admitted and in flight.
  while (answered < 2) await Promise.race(writes);
  assert.equal(await daemon.stop("SIGTERM"), 0, daemon.stderr());
  const outcomes = await Promise.all(writes);
  assert.deepEqual(
    outcomes.filter((o) => o !== "ok"),
    [],
    `every write was answered (${answered} of ${WRITES})`,
  );
  nbd.destroy("test done");
});
