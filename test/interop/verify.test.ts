/**
 * x-block-verify and `drivetap verify` against the real daemon:
 * - equal file nodes: nothing reported (QMP and CLI, exit 0);
 * - bytes corrupted in the target file behind the daemon's back: exactly those 4 KiB extents (CLI exit 1),
 *   then --repair, a clean re-verify and `qemu-img compare` finding the images identical;
 * - live: a stream job duplicates fio and qemu-io writes hammering the export while verify runs again
 *   and again: never a false positive, yet a corruption in a region no writer touches is found each time;
 * - with job-id, what the job knows its target misses (target writes failing, job stopped) is pending,
 *   not a mismatch, until the job has resynced it;
 * - bad arguments give GenericError with a sentence.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { closeSync, copyFileSync, openSync, writeSync } from "node:fs";
import { dirname, join } from "node:path";
import type { QmpClient } from "../../src/qmp/client.js";
import { CLI } from "../helpers/daemon.js";
import {
  assertExit,
  assertQmpError,
  connectQmp,
  eventAfter,
  jobEvent,
  KiB,
  MiB,
  prng,
  qemuIo,
  readFile,
  seededBytes,
  serveWithQmp,
  streamPlan,
  testSeed,
  waitInSync,
  type QmpDaemon,
} from "../helpers/jobs.js";
import { run, runOk, start } from "../helpers/run.js";
import type { VerifyReturn } from "../../src/cli/verify-command.js";

const DISK = 64 * MiB;
const T = { timeout: 180_000 };

function verify(qmp: QmpClient, args: Record<string, unknown>): Promise<VerifyReturn> {
  return qmp.execute("x-block-verify", args) as Promise<VerifyReturn>;
}

/** A daemon serving a random disk, and node "t": a raw file node on a copy of it. */
async function withCopy(t: Parameters<typeof serveWithQmp>[0]): Promise<QmpDaemon & { target: string }> {
  const seed = testSeed(t);
  let target = "";
  const d = await serveWithQmp(t, {
    content: seededBytes(seed, DISK),
    prepare: (image) => copyFileSync(image, (target = join(dirname(image), "target.img"))),
  });
  await d.qmp.execute("blockdev-add", {
    driver: "raw",
    "node-name": "t",
    file: { driver: "file", filename: target },
  });
  return { ...d, target };
}

/** Inverts bytes of a file in place, behind the daemon's back. */
function corruptFile(path: string, offset: number, length: number): void {
  const b = readFile(path).subarray(offset, offset + length);
  const flipped = Buffer.from(b.map((x) => x ^ 0xff));
  const fd = openSync(path, "r+");
  try {
    writeSync(fd, flipped, 0, length, offset);
  } finally {
    closeSync(fd);
  }
}

function cli(d: QmpDaemon, ...args: string[]): ReturnType<typeof run> {
  return run(process.execPath, [CLI, "verify", "--socket", d.qmpPath, ...args]);
}

test("equal nodes: no mismatches, CLI exit 0", T, async (t) => {
  const d = await withCopy(t);
  const r = await verify(d.qmp, { source: "disk0", target: "t" });
  assert.equal(r["checked-bytes"], DISK);
  assert.deepEqual(r.mismatches, []);
  assert.deepEqual(r.pending, []);
  assert.equal(r.rechecked, 0);
  const c = await cli(d, "disk0", "t");
  assert.equal(c.code, 0, c.stderr);
  assert.match(
    c.stdout,
    /checked 64\.0 MiB, 0 mismatched extents \(0 B\), 0 chunks re-checked under lock: equal/,
  );
});

test(
  "corrupted target bytes: exactly those extents, then repair makes qemu-img compare agree",
  T,
  async (t) => {
    const d = await withCopy(t);
    corruptFile(d.target, 3 * MiB + 100, 1); // sub-chunk [3M, 3M+4K)
    corruptFile(d.target, 8 * MiB - 2 * KiB, 4 * KiB); // straddles a chunk boundary: [8M-4K, 8M+4K)
    corruptFile(d.target, 40 * MiB, 64 * KiB);
    corruptFile(d.target, DISK - 1, 1);
    const expected = [
      { offset: 3 * MiB, length: 4 * KiB },
      { offset: 8 * MiB - 4 * KiB, length: 8 * KiB },
      { offset: 40 * MiB, length: 64 * KiB },
      { offset: DISK - 4 * KiB, length: 4 * KiB },
    ];
    const differ = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", d.image, d.target]);
    assert.equal(differ.code, 1, `qemu-img compare sees the corruption: ${differ.stdout}${differ.stderr}`);

    const r = await verify(d.qmp, { source: "disk0", target: "t" });
    assert.deepEqual(r.mismatches, expected);
    assert.equal(r["mismatch-bytes"], 80 * KiB);
    assert.equal(r.rechecked, 5, "five chunks differ: the second extent spans two");
    // A window: offset and length clip the report.
    const w = await verify(d.qmp, { source: "disk0", target: "t", offset: 8 * MiB, length: 1 * MiB });
    assert.deepEqual(w.mismatches, [{ offset: 8 * MiB, length: 4 * KiB }]);
    assert.equal(w["checked-bytes"], 1 * MiB);

    const c = await cli(d, "disk0", "t");
    assert.equal(c.code, 1, `exit 1 while mismatches remain: ${c.stderr}`);
    assert.match(
      c.stdout,
      new RegExp(`^mismatch +offset ${40 * MiB} +length ${64 * KiB} \\(64\\.0 KiB\\)$`, "m"),
    );
    assert.match(c.stdout, /4 mismatched extents \(80\.0 KiB\).*: 81920 bytes differ$/m);

    const fix = await cli(d, "disk0", "t", "--repair", "--json");
    assert.equal(fix.code, 0, `exit 0 once repaired: ${fix.stdout}${fix.stderr}`);
    const fixed = JSON.parse(fix.stdout) as VerifyReturn;
    assert.deepEqual(
      fixed.mismatches,
      expected.map((e) => ({ ...e, repaired: true })),
    );
    assert.equal(fixed["repaired-bytes"], 80 * KiB);

    const again = await verify(d.qmp, { source: "disk0", target: "t", granularity: 64 * KiB });
    assert.deepEqual(again.mismatches, []);
    const same = await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", d.image, d.target]);
    assert.match(same.stdout, /Images are identical/);
  },
);

test(
  "live: no false positives while fio and qemu-io write through a stream job; a real corruption is still found",
  T,
  async (t) => {
    const seed = testSeed(t);
    const d = await withCopy(t);
    await d.qmp.execute("blockdev-backup", { "job-id": "s", device: "disk0", target: "t", sync: "stream" });
    // Writers stay below 48 MiB; the corruption is above, where nothing writes.
    const WRITTEN = 48 * MiB;
    const bad = { offset: 60 * MiB + 12 * KiB, length: 8 * KiB };
    corruptFile(d.target, bad.offset + 10, bad.length - 20);

    const fio = start("fio", [
      "--name=verify-load",
      "--ioengine=nbd",
      `--uri=${d.uri}`,
      "--rw=randwrite",
      "--bsrange=4k-256k",
      "--iodepth=32",
      `--size=${WRITTEN}`,
      `--randseed=${seed}`,
      "--norandommap",
      "--time_based",
      "--runtime=6",
      "--output-format=terse",
    ]);
    let fioDone = false;
    let writersStop = false;
    const fioResult = fio.result.finally(() => (fioDone = true));
    const rnd = prng(seed);
    const qemuIoRuns = (async () => {
      let runs = 0;
      do {
        assertExit("qemu-io", await qemuIo(d.uri, streamPlan(rnd, 24 * MiB, 40 * MiB)));
        runs++;
      } while (!writersStop);
      return runs;
    })();

    // A second QMP connection: the first one stays free for the job.
    const qmp2 = await connectQmp(t, d.qmpPath);
    let runs = 0;
    let rechecked = 0;
    let jobRuns = 0;
    // Until fio ends, and then (qemu-io still writing) until a write in flight has made the lock-free
    // pass differ at least once, so the test has seen the race it is about.
    const deadline = Date.now() + 60_000;
    while (!fioDone || (rechecked === runs && Date.now() < deadline)) {
      const byJob = runs % 3 === 2;
      // Larger chunks every other run: a longer window for a write to land between the two reads.
      const args = byJob ? { "job-id": "s" } : { source: "disk0", target: "t" };
      const r = await verify(qmp2, { ...args, granularity: runs % 2 === 0 ? 1 * MiB : 16 * MiB });
      assert.deepEqual(r.mismatches, [bad], `run ${runs}: exactly the corrupted extent, no false positive`);
      assert.deepEqual(r.pending, [], `run ${runs}: the job has nothing to resync`);
      rechecked += r.rechecked;
      runs++;
      if (byJob) jobRuns++;
    }
    const fr = await fioResult;
    assertExit("fio", fr);
    writersStop = true;
    const qemuRuns = await qemuIoRuns;
    t.diagnostic(
      `${runs} verify runs (${jobRuns} by job-id), ${rechecked} chunks re-checked, ${qemuRuns} qemu-io runs`,
    );
    assert.ok(runs >= 3 && jobRuns >= 1, `verify ran ${runs} times during the load`);
    assert.ok(
      rechecked > runs,
      `writes in flight made the lock-free pass differ beyond the corrupted chunk (${rechecked} re-checks in ${runs} runs)`,
    );

    // The load is over: the job is in sync, so only the corruption differs; repair it.
    await waitInSync(d.qmp, "s");
    const fixed = await verify(d.qmp, { "job-id": "s", repair: true });
    assert.deepEqual(fixed.mismatches, [{ ...bad, repaired: true }]);
    const mark = d.qmp.events.length;
    await d.qmp.execute("block-job-cancel", { device: "s" });
    await eventAfter(d.qmp, mark, jobEvent("s", "BLOCK_JOB_CANCELLED"));
    const same = await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", d.image, d.target]);
    assert.match(same.stdout, /Images are identical/);
  },
);

test(
  "job-id: what the job knows its target misses is pending, not a mismatch, until resynced",
  T,
  async (t) => {
    const seed = testSeed(t);
    let target = "";
    const d = await serveWithQmp(t, {
      content: seededBytes(seed, DISK),
      prepare: (image) => copyFileSync(image, (target = join(dirname(image), "target.img"))),
    });
    await d.qmp.execute("blockdev-add", {
      driver: "error-inject",
      "node-name": "bad",
      file: { driver: "file", filename: target },
    });
    await d.qmp.execute("blockdev-backup", {
      "job-id": "s",
      device: "disk0",
      target: "bad",
      sync: "stream",
      "on-target-error": "stop",
    });
    await d.qmp.execute("x-error-inject", { "node-name": "bad", "fail-writes": true });
    const mark = d.qmp.events.length;
    // The guest's writes succeed; the target misses them and the job stops.
    assertExit("qemu-io", await qemuIo(d.uri, ["write -P 0x33 1M 8K", "write -P 0x44 5M 64K"]));
    await eventAfter(
      d.qmp,
      mark,
      jobEvent("s", "BLOCK_JOB_ERROR", (e) => e.data.action === "stop"),
    );

    const r = await verify(d.qmp, { "job-id": "s", repair: true });
    assert.deepEqual(r.mismatches, []);
    assert.deepEqual(r.pending, [
      { offset: 1 * MiB, length: 8 * KiB },
      { offset: 5 * MiB, length: 64 * KiB },
    ]);
    assert.equal(r["repaired-bytes"], 0, "pending ranges are left to the job");
    // Without the job, the same differences are plain mismatches.
    const plain = await verify(d.qmp, { source: "disk0", target: "bad" });
    assert.deepEqual(plain.mismatches, r.pending);
    const c = await run(process.execPath, [CLI, "verify", "--socket", d.qmpPath, "--job-id", "s"]);
    assert.equal(c.code, 0, `pending alone is exit 0: ${c.stderr}`);
    assert.match(c.stdout, /^pending +offset 1048576 +length 8192 /m);

    await d.qmp.execute("x-error-inject", { "node-name": "bad", "fail-writes": false });
    await d.qmp.execute("block-job-resume", { device: "s" });
    await waitInSync(d.qmp, "s");
    const after = await verify(d.qmp, { "job-id": "s" });
    assert.deepEqual([after.mismatches, after.pending], [[], []]);
  },
);

test("bad arguments give GenericError with a sentence", T, async (t) => {
  const d = await withCopy(t);
  await d.qmp.execute("blockdev-add", { driver: "memory", "node-name": "small", size: 1 * MiB });
  await assertQmpError(
    verify(d.qmp, { source: "disk0", target: "nope" }),
    "GenericError",
    "Cannot find device='nope' nor node-name='nope'",
  );
  await assertQmpError(
    verify(d.qmp, { source: "disk0", target: "small" }),
    "GenericError",
    `Source 'disk0' has ${DISK} bytes but target 'small' has ${MiB}: nodes of different sizes cannot be compared`,
  );
  await assertQmpError(
    verify(d.qmp, { source: "disk0", target: "t", offset: DISK + 512 }),
    "GenericError",
    `Offset ${DISK + 512} is beyond the end of 'disk0' (${DISK} bytes)`,
  );
  await assertQmpError(
    verify(d.qmp, { source: "disk0", target: "t", offset: MiB, length: DISK }),
    "GenericError",
    `Range ${MiB}+${DISK} goes beyond the end of 'disk0' (${DISK} bytes)`,
  );
  await assertQmpError(
    verify(d.qmp, { source: "disk0", target: "disk0" }),
    "GenericError",
    "Source and target are the same node 'disk0'",
  );
  await assertQmpError(
    verify(d.qmp, { source: "disk0" }),
    "GenericError",
    "Give 'source' and 'target', or 'job-id'",
  );
  await assertQmpError(
    verify(d.qmp, { source: "disk0", target: "t", granularity: 3 * KiB }),
    "GenericError",
    /^Parameter 'granularity' expects a value between 4096 and 16777216$/,
  );
  await assertQmpError(
    verify(d.qmp, { source: "disk0", target: "t", granularity: 96 * KiB }),
    "GenericError",
    "Granularity 98304 must be a power of two between 4096 and 16777216",
  );
  await assertQmpError(verify(d.qmp, { "job-id": "none" }), "DeviceNotActive", "Block job 'none' not found");
  const c = await cli(d, "disk0", "nope");
  assert.equal(c.code, 2, "an error is exit 2");
  assert.match(c.stderr, /^drivetap verify: GenericError: Cannot find device='nope' nor node-name='nope'\n$/);
});
