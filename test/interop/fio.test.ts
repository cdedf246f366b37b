/**
 * fio's nbd engine with crc32c verification: every block written is read back and checked, at 4k and at
 * mixed sizes from 512 bytes to 256 KiB, 32 requests deep. A second verify-only pass re-checks the data
 * through a new connection, and a block corrupted behind the daemon's back must make it fail. The
 * 4k run goes through the io_uring and the sync engines; the mixed run through io_uring.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { closeSync, openSync, readFileSync, writeSync } from "node:fs";
import { join } from "node:path";
import { serveTempImage } from "../helpers/daemon.js";
import { run } from "../helpers/run.js";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 128 * MiB;

interface FioJob {
  error: number;
  write: { io_bytes: number; total_ios: number };
  read: { io_bytes: number; total_ios: number };
}

async function fio(
  uri: string,
  outPath: string,
  extra: readonly string[],
): Promise<{ code: number | null; job: FioJob | null; text: string; stderr: string }> {
  const args = [
    "--name=verify",
    "--ioengine=nbd",
    `--uri=${uri}`,
    "--rw=randwrite",
    `--size=${IMAGE_BYTES}`,
    "--iodepth=32",
    "--verify=crc32c",
    "--verify_fatal=1",
    "--verify_state_save=0",
    "--randrepeat=1",
    "--output-format=json",
    `--output=${outPath}`,
    ...extra,
  ];
  const r = await run("fio", args, { timeoutMs: 120_000 });
  let job: FioJob | null = null;
  try {
    job = (JSON.parse(readFileSync(outPath, "utf8")) as { jobs: FioJob[] }).jobs[0];
  } catch {
    // fio failed before writing its report; the exit code and text say why.
  }
  return { code: r.code, job, text: `${r.stdout}\n${r.stderr}`, stderr: r.stderr };
}

// The io_uring engine and the synchronous one (the default).
for (const engine of ["io_uring", "sync"])
  test(`fio randwrite bs=4k iodepth=32 with crc32c verify, I/O engine ${engine}`, async (t) => {
    const { daemon, dir } = await serveTempImage(t, IMAGE_BYTES, { args: ["--io-engine", engine] });
    assert.match(daemon.stdout(), new RegExp(`I/O engine ${engine}\\b`));
    const r = await fio(daemon.uri, join(dir, "fio.json"), ["--bs=4k", "--do_verify=1"]);
    assert.equal(r.code, 0, r.text);
    assert.ok(r.job);
    assert.equal(r.job.error, 0);
    assert.equal(r.job.write.io_bytes, IMAGE_BYTES, "fio wrote the whole image");
    assert.equal(r.job.write.total_ios, IMAGE_BYTES / 4096);
    assert.equal(r.job.read.io_bytes, IMAGE_BYTES, "and read all of it back to verify");
  });

test("fio randwrite bsrange=512-256k iodepth=32 verify on io_uring, then a verify_only pass; corruption is caught", async (t) => {
  const { daemon, dir, image } = await serveTempImage(t, IMAGE_BYTES, { args: ["--io-engine", "io_uring"] });
  const write = await fio(daemon.uri, join(dir, "write.json"), ["--bsrange=512-256k", "--do_verify=1"]);
  assert.equal(write.code, 0, write.text);
  assert.ok(write.job);
  assert.equal(write.job.error, 0);
  assert.equal(write.job.write.io_bytes, IMAGE_BYTES);
  assert.equal(write.job.read.io_bytes, IMAGE_BYTES);

  const again = await fio(daemon.uri, join(dir, "verify.json"), ["--bsrange=512-256k", "--verify_only=1"]);
  assert.equal(again.code, 0, again.text);
  assert.ok(again.job);
  assert.equal(again.job.error, 0);
  assert.equal(again.job.read.io_bytes, IMAGE_BYTES, "verify_only read everything back");
  assert.equal(again.job.read.total_ios, write.job.write.total_ios, "same blocks as the write pass");

  // The checks bite: garbage written into the file behind the daemon makes the same pass fail.
  const fd = openSync(image, "r+");
  try {
    writeSync(fd, Buffer.alloc(4096, 0x5c), 0, 4096, 64 * MiB);
  } finally {
    closeSync(fd);
  }
  const corrupt = await fio(daemon.uri, join(dir, "corrupt.json"), ["--bsrange=512-256k", "--verify_only=1"]);
  assert.notEqual(corrupt.code, 0, "verify_only must fail on corrupted data");
  assert.match(corrupt.stderr, /verify: bad|verify failed/);
});
