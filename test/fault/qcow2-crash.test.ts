/**
 * kill -9 of `drivetap serve` on a qcow2 image while a client writes: rounds of concurrent writes and
 * zeroes each end in a flush, and the last round is cut by SIGKILL with requests in flight. Afterwards
 * `qemu-img check` may find leaked clusters (the write-back order allows that) but no corruption, and
 * every byte the flushed rounds wrote (and no later round touched) reads back. drivetap then opens the
 * dirty image writable again and leaves it clean. The daemon runs on the io_uring engine.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { NbdDriver } from "../../src/nbd/client/nbd-driver.js";
import { startDaemon, stopAfter, untilImageUnlocked, type RunningDaemon } from "../helpers/daemon.js";
import { KiB, MiB, prng, seededBytes, testSeed } from "../helpers/jobs.js";
import { dirtyFlag, qemuImgCreate } from "../helpers/qcow2.js";
import { run, runOk, tempDir } from "../helpers/run.js";

const DISK_BYTES = 32 * MiB;
const ROUNDS = 5;
const REQUESTS_PER_ROUND = 48;
/** qemu-img check exit codes: 0 clean, 3 leaks only (2 would be corruption). */
const CHECK_CLEAN = 0;
const CHECK_LEAKS = 3;

async function connect(daemon: RunningDaemon): Promise<NbdDriver> {
  return NbdDriver.open({
    server: { type: "unix", path: daemon.socket },
    exportName: "",
    reconnectDelayMs: 0,
    requestTimeoutMs: 10_000,
    openTimeoutMs: 10_000,
  });
}

interface Request {
  readonly offset: number;
  readonly length: number;
  /** undefined: write zeroes. */
  readonly data?: Buffer;
}

function round(rnd: () => number, seed: number): Request[] {
  return Array.from({ length: REQUESTS_PER_ROUND }, (_, i) => {
    const length = 512 * (1 + Math.floor(rnd() * (rnd() < 0.7 ? 16 : 512)));
    const offset = 512 * Math.floor(rnd() * ((DISK_BYTES - length) / 512));
    return rnd() < 0.15 ? { offset, length } : { offset, length, data: seededBytes(seed * 1000 + i, length) };
  });
}

function send(client: NbdDriver, r: Request): Promise<void> {
  return r.data
    ? client.pwrite(r.offset, [r.data], {})
    : client.pwriteZeroes(r.offset, r.length, { mayTrim: true });
}

for (const cluster of ["4k", "64k"]) {
  test(`kill -9 under a writing client (${cluster} clusters): qemu-img check finds no corruption, every flushed write reads back`, async (t) => {
    const seed = testSeed(t);
    const rnd = prng(seed);
    const dir = tempDir(t, "drivetap-qcow2-crash-");
    const image = join(dir, "crash.qcow2");
    await qemuImgCreate(image, DISK_BYTES, { options: [`cluster_size=${cluster}`] });
    // On io_uring: writes acknowledged from the ring's completions and flushes as IORING_OP_FSYNC
    // must leave the same guarantees as synchronous calls when the process dies with ops in flight.
    const daemon = await startDaemon({ image, args: ["--io-engine", "io_uring"] });
    stopAfter(t, daemon);
    assert.match(daemon.stdout(), /I\/O engine io_uring/, "the image's file node runs on io_uring");
    const client = await connect(daemon);
    const flushed = Buffer.alloc(DISK_BYTES);
    const unknown = new Uint8Array(DISK_BYTES / 512);
    for (let r = 0; r < ROUNDS; r++) {
      // Requests of one round may overlap: apply them in order to a copy only after all are answered,
      // and only to bytes no other request of the round touched (their order on disk is undefined).
      const reqs = round(rnd, seed + r);
      await Promise.all(reqs.map((q) => send(client, q)));
      await client.flush();
      const owners = new Int32Array(DISK_BYTES / 512).fill(-1);
      reqs.forEach((q, i) => {
        for (let s = q.offset / 512; s < (q.offset + q.length) / 512; s++)
          owners[s] = owners[s] === -1 ? i : -2;
      });
      for (let s = 0; s < owners.length; s++) {
        const i = owners[s];
        if (i === -1) continue;
        if (i === -2) continue;
        const q = reqs[i];
        const at = s * 512 - q.offset;
        if (q.data) q.data.copy(flushed, s * 512, at, at + 512);
        else flushed.fill(0, s * 512, (s + 1) * 512);
      }
      unknownSectors(owners, unknown);
    }
    // The last round: the kill lands once the first request is answered, with the rest in flight.
    const last = round(rnd, seed + ROUNDS);
    const inFlight = last.map((q) => send(client, q).catch(() => undefined));
    await Promise.race(inFlight);
    daemon.proc.kill("SIGKILL");
    await daemon.exited;
    await untilImageUnlocked(image);
    await Promise.all(inFlight);
    await client.close().catch(() => undefined);
    for (const q of last) for (let s = q.offset / 512; s < (q.offset + q.length) / 512; s++) unknown[s] = 1;

    const check = await run("qemu-img", ["check", image]);
    assert.ok(
      check.code === CHECK_CLEAN || check.code === CHECK_LEAKS,
      `qemu-img check exit ${check.code} (seed ${seed}):\n${check.stdout}${check.stderr}`,
    );
    assert.doesNotMatch(check.stdout, /ERROR/, `seed ${seed}`);
    const raw = join(dir, "after.raw");
    await runOk("qemu-img", ["convert", "-O", "raw", image, raw]);
    const got = readFileSync(raw);
    for (let s = 0; s < unknown.length; s++) {
      if (unknown[s]) continue;
      const a = got.subarray(s * 512, (s + 1) * 512);
      const b = flushed.subarray(s * 512, (s + 1) * 512);
      if (!a.equals(b))
        assert.fail(`seed ${seed}: flushed sector ${s} (offset ${s * 512}) does not read back`);
    }

    // The dirty image (no lazy refcounts) opens writable again and is clean after a clean stop.
    const again = await startDaemon({ image, args: ["--io-engine", "io_uring"] });
    stopAfter(t, again);
    const c2 = await connect(again);
    await c2.pwrite(0, [Buffer.alloc(64 * KiB, 0x5c)], {});
    await c2.flush();
    await c2.close();
    assert.equal(await again.stop(), 0);
    const after = await run("qemu-img", ["check", image]);
    assert.ok(after.code === CHECK_CLEAN || after.code === CHECK_LEAKS, after.stdout + after.stderr);
    assert.equal(await dirtyFlag(image), false);
  });
}

/** Sectors several requests of one round touched have no defined content: mark them unknown. */
function unknownSectors(owners: Int32Array, into: Uint8Array): void {
  for (let s = 0; s < owners.length; s++) {
    if (owners[s] === -2) into[s] = 1;
    else if (owners[s] >= 0) into[s] = 0;
  }
}
