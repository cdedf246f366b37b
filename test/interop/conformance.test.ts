/**
 * The shared NBD conformance battery (qemu-io, qemu-img, nbdcopy, nbdinfo, fio, a libnbd probe and a
 * raw-socket probe) run against `drivetap serve IMAGE --socket`.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync } from "node:fs";
import { join } from "node:path";
import { REPO_ROOT, serveTempImage } from "../helpers/daemon.js";
import { run } from "../helpers/run.js";

const SCRIPT = join(REPO_ROOT, "../shared/tools/nbd-conformance.sh");

test("nbd-conformance.sh passes every check against serve IMAGE --socket", async (t) => {
  assert.ok(existsSync(SCRIPT), `conformance script at ${SCRIPT}`);
  const { daemon } = await serveTempImage(t, 128 * 1024 * 1024);
  const r = await run("bash", [SCRIPT, daemon.socket, ""], { timeoutMs: 180_000 });
  const report = `exit ${r.code}\n${r.stdout}\n${r.stderr}`;
  assert.equal(r.code, 0, report);
  const m = /^(\d+) passed, (\d+) failed$/m.exec(r.stdout);
  assert.ok(m, `summary line in:\n${report}`);
  assert.equal(Number(m[2]), 0, report);
  assert.ok(Number(m[1]) >= 11, `at least 11 checks ran:\n${report}`);
  assert.doesNotMatch(r.stdout, /^FAIL /m, report);
  assert.ok(daemon.alive(), "the daemon survived the battery, raw probe included");
  assert.equal(await daemon.stop("SIGTERM"), 0, daemon.stderr());
});
