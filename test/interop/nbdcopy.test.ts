/**
 * nbdcopy (libnbd) copies 64 MiB of random data into the export and back out, with one connection and
 * with four (multi-conn: the daemon advertises CAN_MULTI_CONN, so nbdcopy spreads requests over them).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { serveTempImage } from "../helpers/daemon.js";
import { runOk } from "../helpers/run.js";

const MiB = 1024 * 1024;
const COPY_BYTES = 64 * MiB;

function sha256(b: Buffer): string {
  return createHash("sha256").update(b).digest("hex");
}

function countMatches(text: string, re: RegExp): number {
  return text.match(new RegExp(re.source, "g"))?.length ?? 0;
}

test("nbdcopy a 64 MiB random file into the export and out again", async (t) => {
  const { daemon, dir, image } = await serveTempImage(t, COPY_BYTES);
  const ref = randomBytes(COPY_BYTES);
  const refPath = join(dir, "ref.bin");
  writeFileSync(refPath, ref);

  await runOk("nbdcopy", ["--connections=1", "--flush", refPath, daemon.uri]);
  assert.equal(sha256(readFileSync(image)), sha256(ref), "image file equals the source after nbdcopy in");

  const outPath = join(dir, "out.bin");
  await runOk("nbdcopy", ["--connections=1", daemon.uri, outPath]);
  const out = readFileSync(outPath);
  assert.equal(out.length, COPY_BYTES);
  assert.equal(sha256(out), sha256(ref), "copied out equals the source");
});

test("nbdcopy --connections=4 uses four connections each way and the copy is exact", async (t) => {
  const { daemon, dir, image } = await serveTempImage(t, COPY_BYTES, { args: ["--verbose"] });
  const ref = randomBytes(COPY_BYTES);
  // A zero run, so nbdcopy's sparse detection sends zero requests among the writes.
  ref.fill(0, 16 * MiB, 20 * MiB);
  const refPath = join(dir, "ref.bin");
  writeFileSync(refPath, ref);
  const transmissions = (): number => countMatches(daemon.stderr(), /"msg":"transmission"/);

  await runOk("nbdcopy", ["--connections=4", "--threads=4", "--flush", refPath, daemon.uri]);
  await daemon.waitForStderr(() => transmissions() >= 4);
  const afterIn = transmissions();
  assert.equal(sha256(readFileSync(image)), sha256(ref), "image file equals the source after nbdcopy in");

  const outPath = join(dir, "out.bin");
  await runOk("nbdcopy", ["--connections=4", "--threads=4", daemon.uri, outPath]);
  await daemon.waitForStderr(() => transmissions() >= afterIn + 4);
  assert.equal(sha256(readFileSync(outPath)), sha256(ref), "copied out equals the source");
});
