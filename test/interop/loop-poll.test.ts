/**
 * Adaptive polling of the event loop (`--poll-max-ns`, block/drivers/io-engine/loop-poll.ts and
 * native/loop_poll.c): on by default; a client writing one request at a time (fio QD1 with crc32c
 * verification) is caught by the poll rather than waking a sleeping loop, and every block it wrote
 * reads back right; an idle daemon does not spin; 0 turns it off; bad values are refused, on `serve`
 * and on `storage-daemon`.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { CLI, startDaemon, stopAfter } from "../helpers/daemon.js";
import { connectQmp } from "../helpers/jobs.js";
import { DRIVETAP_STORAGE_DAEMON, startQsd } from "../helpers/qsd.js";
import { run, tempDir } from "../helpers/run.js";

const MiB = 1024 * 1024;
/** Clock ticks per second in /proc/PID/stat (USER_HZ, 100 on Linux). */
const USER_HZ = 100;

interface PollInfo {
  "max-ns": number;
  "window-ns": number;
  spins: number;
  hits: number;
  "spin-ns": number;
  sleeps: number;
}

/** The process's user + system CPU so far, in seconds. */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  // After the command: state is field 3, so utime (14) and stime (15) are at 11 and 12.
  return (Number(fields[11]) + Number(fields[12])) / USER_HZ;
}

async function served(t: Parameters<typeof tempDir>[0], args: readonly string[]) {
  const dir = tempDir(t, "drivetap-poll-");
  const image = join(dir, "disk.img");
  writeFileSync(image, Buffer.alloc(32 * MiB));
  const qmpPath = join(dir, "qmp.sock");
  const daemon = await startDaemon({ image, args: ["--qmp", qmpPath, ...args] });
  stopAfter(t, daemon);
  const qmp = await connectQmp(t, qmpPath);
  return { daemon, dir, qmp };
}

test("polling is on by default: fio's QD1 writes are caught by the poll, verify clean; an idle daemon does not spin", async (t) => {
  const { daemon, dir, qmp } = await served(t, []);
  const before = ((await qmp.execute("x-query-io-engine")) as { poll?: PollInfo }).poll;
  assert.ok(before, "x-query-io-engine shows the poll when it is on");
  assert.equal(before["max-ns"], 65536);

  const out = join(dir, "fio.json");
  const r = await run(
    "fio",
    [
      "--name=qd1",
      "--ioengine=nbd",
      `--uri=${daemon.uri}`,
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=1",
      `--size=${8 * MiB}`,
      "--verify=crc32c",
      "--verify_fatal=1",
      "--do_verify=1",
      "--randrepeat=1",
      "--output-format=json",
      `--output=${out}`,
    ],
    { timeoutMs: 120_000 },
  );
  assert.equal(r.code, 0, r.stderr);
  const job = (
    JSON.parse(readFileSync(out, "utf8")) as { jobs: { error: number; write: { total_ios: number } }[] }
  ).jobs[0]!;
  assert.equal(job.error, 0);
  assert.equal(job.write.total_ios, 2048);

  const after = ((await qmp.execute("x-query-io-engine")) as { poll: PollInfo }).poll;
  // 2048 writes and as many verify reads, one at a time: the window grew and the poll saw requests
  // arrive (without polling, each of them would have been a wake from epoll_wait).
  assert.ok(after.spins > before.spins, `spins ${before.spins} -> ${after.spins}`);
  assert.ok(after.hits > before.hits + 100, `hits ${before.hits} -> ${after.hits}`);
  assert.ok(after["window-ns"] <= after["max-ns"]);

  // Idle: nothing arrives, the window shrinks to 0 after the first long sleep, and the daemon uses
  // (almost) no CPU. Measured over a second: a loop left spinning would use all of it.
  const pid = daemon.proc.pid!;
  const cpu0 = cpuSeconds(pid);
  const t0 = Date.now();
  await new Promise((resolve) => setTimeout(resolve, 1000));
  const used = cpuSeconds(pid) - cpu0;
  const elapsed = (Date.now() - t0) / 1000;
  assert.ok(used < 0.1 * elapsed, `idle daemon used ${used}s of CPU in ${elapsed}s`);
  const idle = ((await qmp.execute("x-query-io-engine")) as { poll: PollInfo }).poll;
  assert.ok(idle.sleeps > after.sleeps, "the idle daemon slept");
});

test("--poll-max-ns 0 turns polling off; a value sets the bound; bad values exit 1 (serve and storage-daemon)", async (t) => {
  const off = await served(t, ["--poll-max-ns", "0"]);
  const offInfo = (await off.qmp.execute("x-query-io-engine")) as { poll?: PollInfo };
  assert.equal(offInfo.poll, undefined);

  const small = await served(t, ["--poll-max-ns", "8000"]);
  const smallInfo = (await small.qmp.execute("x-query-io-engine")) as { poll: PollInfo };
  assert.equal(smallInfo.poll["max-ns"], 8000);
  assert.ok(smallInfo.poll["window-ns"] <= 8000);

  const dir = tempDir(t, "drivetap-poll-");
  const image = join(dir, "x.img");
  writeFileSync(image, Buffer.alloc(MiB));
  for (const value of ["-1", "1e3", "fast", "2000000000"]) {
    const bad = await run(process.execPath, [
      CLI,
      "serve",
      image,
      "--socket",
      join(dir, "s"),
      `--poll-max-ns=${value}`,
    ]);
    assert.equal(bad.code, 1, value);
    assert.match(bad.stderr, /--poll-max-ns.*expected a whole number of ns, 0 to 1000000000/, value);
  }
  const badQsd = await run(process.execPath, [CLI, "storage-daemon", "--poll-max-ns", "soon"]);
  assert.equal(badQsd.code, 1);
  assert.match(badQsd.stderr, /Invalid poll-max-ns 'soon': expected a whole number of ns, 0 to 1000000000/);

  const { qmp } = await startQsd(t, ["--poll-max-ns", "20000"], DRIVETAP_STORAGE_DAEMON);
  const qsdInfo = (await qmp.execute("x-query-io-engine")) as { poll: PollInfo };
  assert.equal(qsdInfo.poll["max-ns"], 20000);
});
