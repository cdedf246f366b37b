/**
 * A real Linux guest uses drivetap as its disk. QEMU (TCG) boots a Debian kernel whose /init makes an
 * ext4 on the virtio-blk disk that drivetap's NBD export backs, fills it with files of known content,
 * deletes half, runs fstrim, runs fio 4 KiB random writes at iodepth 32 with crc32c verification,
 * runs e2fsck -fn and re-reads the kept files after a remount, then powers off.
 *
 * - stream: a sync=stream job duplicates every guest write to a file; afterwards the file equals the
 *   disk and e2fsck -fn finds both clean.
 * - mirror: a write-blocking mirror to a default qemu-nbd (which ignores TRIM) is killed with kill -9
 *   while fio runs and restarted; the job degrades and resyncs by itself, the guest notices nothing.
 *   After a cancel the target must equal the source. Where it does not, the failure says which of the
 *   differing blocks the guest last discarded, so a target that kept data the guest trimmed is named
 *   as such.
 * - qcow2 overlay: the disk is a qcow2 overlay (`drivetap create -b base.raw -F raw`) on a raw base
 *   holding an ext4 over patterned bytes, and QEMU drops the guest's discards, so mkfs, fio and the
 *   fill write 4 KiB blocks into 64 KiB clusters whose rest is copied from the base. A stream job
 *   into a copy of the base records what the guest expects; afterwards the overlay reads the same,
 *   `qemu-img check` is clean and the base is unchanged.
 * - stall: a guest whose writes the server holds (the mirror target is frozen with SIGSTOP) is
 *   reported as a stall with the server's unanswered requests, not as a bare timeout.
 */
import assert from "node:assert/strict";
import * as net from "node:net";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { createHash } from "node:crypto";
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { CLI, makeImage } from "../helpers/daemon.js";
import {
  assertFsckClean,
  assertGuestOk,
  describeRun,
  guestImage,
  startGuest,
  type RunningGuest,
} from "../helpers/guest.js";
import {
  blockJob,
  jobEvent,
  MiB,
  pollUntil,
  seededBytes,
  serveWithQmp,
  type QmpDaemon,
} from "../helpers/jobs.js";
import { assertIdentical, cancelInSync, startQemuNbd, type RemoteTarget } from "../helpers/remote.js";
import { assertChecks } from "../helpers/qcow2.js";
import { run, runOk } from "../helpers/run.js";

const DISK_BYTES = 256 * MiB;
/** A test's own limit: the image build (first run: download), a guest run, the checks. */
const TEST_TIMEOUT_MS = 6 * 60_000;
/** Differences are classified per sector: ext4 on a 256 MiB disk uses 1 KiB blocks, at 1 KiB offsets. */
const BLOCK_BYTES = 512;

function bootGuest(
  d: QmpDaemon,
  extra: { stallMs?: number; discard?: "unmap" | "ignore" } = {},
): Promise<RunningGuest> {
  return startGuest({ socket: d.daemon.socket, qmpPath: d.qmpPath, dir: d.dir, ...extra });
}

/**
 * qemu-nbd as it comes (no --discard=unmap): it accepts TRIM and keeps the data, so a mirror target
 * that must end equal to its source cannot rely on the target's discard.
 */
function startDefaultQemuNbd(t: TestContext, image: string, socket: string): Promise<RemoteTarget> {
  return startQemuNbd(t, image, socket, { discard: "ignore" });
}

async function mirrorTo(d: QmpDaemon, socket: string, extra: Record<string, unknown> = {}): Promise<void> {
  await d.qmp.execute("blockdev-add", {
    driver: "nbd",
    "node-name": "tgt",
    server: { type: "unix", path: socket },
    ...extra,
  });
  await d.qmp.execute("blockdev-mirror", {
    "job-id": "m0",
    device: "disk0",
    target: "tgt",
    sync: "full",
    "copy-mode": "write-blocking",
  });
  await d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_READY"), 60_000);
}

// ---- the write tap: what the guest did to each block, for explaining differences -----------------------

interface TapRecord {
  seq: number;
  kind: "write" | "zero" | "discard" | "flush";
  offset: number;
  length: number;
}

interface TapLog {
  readonly records: TapRecord[];
  dropped: number;
}

/** A tap on disk0 read by this process; it records every write, zero and discard the guest makes. */
async function recordTap(t: TestContext, d: QmpDaemon): Promise<TapLog> {
  const path = join(d.dir, "tap.sock");
  await d.qmp.execute("x-tap-add", { "node-name": "disk0", path, "ring-records": 65536 });
  const log: TapLog = { records: [], dropped: 0 };
  const socket = net.createConnection(path);
  t.after(() => socket.destroy());
  let pending = "";
  socket.setEncoding("utf8").on("data", (s: string) => {
    pending += s;
    let nl: number;
    while ((nl = pending.indexOf("\n")) >= 0) {
      const line = JSON.parse(pending.slice(0, nl)) as Record<string, unknown>;
      pending = pending.slice(nl + 1);
      if (typeof line.dropped === "number") log.dropped += line.dropped;
      else log.records.push(line as unknown as TapRecord);
    }
  });
  socket.on("error", () => undefined);
  await pollUntil("the tap reader connected", async () => {
    const taps = (await d.qmp.execute("query-x-taps")) as Array<{ readers: unknown[] }>;
    return taps.length === 1 && taps[0].readers.length === 1;
  });
  return log;
}

const KINDS = ["none", "write", "zero", "discard"] as const;

/**
 * Where target and source differ (512-byte sectors, merged into ranges), and per range what the guest's
 * last request on those blocks was. The known TRIM bug shows as differences only where the last
 * request was a discard the target ignored.
 */
function explainDifferences(source: Buffer, target: Buffer, tap: TapLog): string {
  const blocks = Math.ceil(source.length / BLOCK_BYTES);
  const last = new Uint8Array(blocks);
  for (const r of [...tap.records].sort((a, b) => a.seq - b.seq)) {
    const code = KINDS.indexOf(r.kind as (typeof KINDS)[number]);
    if (code <= 0) continue;
    const end = Math.ceil((r.offset + r.length) / BLOCK_BYTES);
    for (let b = Math.floor(r.offset / BLOCK_BYTES); b < end; b++) last[b] = code;
  }
  const ranges: Array<{ start: number; end: number; kind: number; sourceZero: boolean }> = [];
  const bytesByKind = new Map<string, number>();
  for (let b = 0; b < blocks; b++) {
    const s = source.subarray(b * BLOCK_BYTES, (b + 1) * BLOCK_BYTES);
    if (s.equals(target.subarray(b * BLOCK_BYTES, (b + 1) * BLOCK_BYTES))) continue;
    const kind = last[b];
    bytesByKind.set(KINDS[kind], (bytesByKind.get(KINDS[kind]) ?? 0) + BLOCK_BYTES);
    const sourceZero = s.every((x) => x === 0);
    const prev = ranges[ranges.length - 1];
    if (prev && prev.end === b && prev.kind === kind && prev.sourceZero === sourceZero) prev.end = b + 1;
    else ranges.push({ start: b, end: b + 1, kind, sourceZero });
  }
  const total = [...bytesByKind.values()].reduce((a, b) => a + b, 0);
  const onlyDiscards = total > 0 && bytesByKind.size === 1 && bytesByKind.has("discard");
  const lines = [
    `target differs from source in ${total / 1024} KiB, ${ranges.length} ranges; by the guest's last request on those blocks: ` +
      [...bytesByKind].map(([k, n]) => `${k} ${n / 1024} KiB`).join(", "),
    onlyDiscards
      ? "EVERY difference is in blocks the guest last discarded (fstrim): the target kept data the guest trimmed (the known TRIM bug: a default qemu-nbd ignores NBD_CMD_TRIM)"
      : "NOT only discards: some differing blocks were last written or zeroed, so the cause is not (only) the TRIM bug",
    `tap: ${tap.records.length} records, ${tap.dropped} dropped${tap.dropped > 0 ? " (the classification may be incomplete)" : ""}`,
  ];
  for (const r of ranges.slice(0, 12)) {
    const at = r.start * BLOCK_BYTES;
    const history = tap.records
      .filter((x) => x.kind !== "flush" && x.offset < at + BLOCK_BYTES && at < x.offset + x.length)
      .slice(-3)
      .map((x) => `#${x.seq} ${x.kind} ${x.offset}+${x.length}`)
      .join(", ");
    lines.push(
      `  bytes ${at}-${r.end * BLOCK_BYTES - 1}: last ${KINDS[r.kind]}, source ${r.sourceZero ? "zeros" : "data"}; requests on its first block: ${history}`,
    );
  }
  if (ranges.length > 12) lines.push(`  ... ${ranges.length - 12} more ranges`);
  return lines.join("\n");
}

async function readBoth(a: string, b: string): Promise<[Buffer, Buffer]> {
  const { readFile } = await import("node:fs/promises");
  return Promise.all([readFile(a), readFile(b)]);
}

// ---- the tests ---------------------------------------------------------------------------------------

test(
  "guest: ext4, fill, delete, fstrim, fio QD32 on drivetap under a stream job; target == source, e2fsck clean",
  { timeout: TEST_TIMEOUT_MS },
  async (t) => {
    await guestImage(); // before the daemon starts: a first build (download) is not part of the run
    const d = await serveWithQmp(t, { sizeBytes: DISK_BYTES });
    const target = makeImage(join(d.dir, "stream.img"), DISK_BYTES);
    await streamTo(d, target);

    const guest = await bootGuest(d);
    const r = await guest.done;
    t.diagnostic(describeRun(r));
    assertGuestOk(r);
    await endStream(d);
    await assertIdentical(d.image, target);
    await assertFsckClean(d.image);
    await assertFsckClean(target);
  },
);

/** A stream job from disk0 into `target` (a raw file the size of the disk), started before the guest. */
async function streamTo(d: QmpDaemon, target: string): Promise<void> {
  await d.qmp.execute("blockdev-add", {
    driver: "raw",
    "node-name": "copy",
    file: { driver: "file", filename: target },
  });
  await d.qmp.execute("blockdev-backup", { "job-id": "s0", device: "disk0", target: "copy", sync: "stream" });
}

/** Cancels the stream job s0 once the guest is done; it must end without an error. */
async function endStream(d: QmpDaemon): Promise<void> {
  const job = await blockJob(d.qmp, "s0");
  assert.equal(job.status, "running", `the stream job is still running: ${JSON.stringify(job)}`);
  await d.qmp.execute("block-job-cancel", { device: "s0" });
  const cancelled = await d.qmp.waitForEvent(jobEvent("s0", "BLOCK_JOB_CANCELLED"), 60_000);
  assert.equal(cancelled.data.error, undefined, JSON.stringify(cancelled.data));
}

function sha(path: string): string {
  return createHash("sha256").update(readFileSync(path)).digest("hex");
}

test(
  "guest: ext4, fill, fio QD32 on a qcow2 overlay over a raw base (partial clusters copied from the base); overlay == what the guest wrote, qemu-img check clean, base unchanged",
  { timeout: TEST_TIMEOUT_MS },
  async (t) => {
    await guestImage();
    let base = "";
    let expected = "";
    const d = await serveWithQmp(t, {
      make: async (dir) => {
        // The base: patterned bytes everywhere (so a cluster copied from it is visible), and a host-made
        // ext4 with a file over them (mkfs without discard keeps the pattern in its free space).
        base = join(dir, "base.raw");
        const chunk = seededBytes(13, 1 * MiB);
        writeFileSync(base, Buffer.alloc(0));
        for (let at = 0; at < DISK_BYTES; at += chunk.length) writeFileSync(base, chunk, { flag: "a" });
        const content = join(dir, "content");
        mkdirSync(content);
        writeFileSync(join(content, "base.dat"), seededBytes(14, 3 * MiB));
        await runOk("mkfs.ext4", ["-q", "-F", "-E", "nodiscard", "-d", content, base]);
        expected = join(dir, "expected.raw");
        copyFileSync(base, expected);
        const overlay = join(dir, "overlay.qcow2");
        await runOk(process.execPath, [CLI, "create", "-f", "qcow2", "-b", base, "-F", "raw", overlay]);
        return overlay;
      },
    });
    const baseSha = sha(base);
    await streamTo(d, expected);

    const guest = await bootGuest(d, { discard: "ignore" });
    const r = await guest.done;
    t.diagnostic(describeRun(r));
    assertGuestOk(r);
    await endStream(d);
    assert.equal(await d.daemon.stop(), 0);

    assert.equal(sha(base), baseSha, "the base is unchanged");
    await assertChecks(d.image);
    const cmp = await run("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", d.image, expected]);
    assert.match(cmp.stdout, /Images are identical/, cmp.stdout + cmp.stderr);
    await assertFsckClean(expected);
  },
);

test(
  "guest: write-blocking mirror to a default qemu-nbd killed with -9 under fio and restarted; resync, target == source",
  { timeout: TEST_TIMEOUT_MS },
  async (t) => {
    await guestImage();
    const d = await serveWithQmp(t, { sizeBytes: DISK_BYTES });
    const targetImage = makeImage(join(d.dir, "target.img"), DISK_BYTES);
    const remote = await startDefaultQemuNbd(t, targetImage, join(d.dir, "target.sock"));
    await mirrorTo(d, remote.socket);
    const tap = await recordTap(t, d);

    const guest = await bootGuest(d);
    // Kill the target once fio is under way: after its start marker, at the next heartbeat.
    await guest.waitForConsole(/^DRIVETAP-GUEST: step fio/);
    await guest.waitForConsole(/^DRIVETAP-GUEST: hb /, { from: guest.console().length });
    await remote.kill();
    const degraded = await d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_DEGRADED"), 30_000);
    t.diagnostic(`degraded: ${JSON.stringify(degraded.data)}`);
    const resynced = d.qmp.waitForEvent(jobEvent("m0", "BLOCK_JOB_RESYNCED"), 120_000);
    await remote.restart();

    const r = await guest.done;
    t.diagnostic(describeRun(r));
    assertGuestOk(r);
    await resynced;
    const job = (await blockJob(d.qmp, "m0")) as unknown as Record<string, unknown>;
    assert.equal(job["x-degraded"], false, JSON.stringify(job));
    assert.equal(job.status, "ready", JSON.stringify(job));
    await cancelInSync(d, "m0");

    const cmp = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", d.image, targetImage]);
    if (cmp.code !== 0 || !/Images are identical/.test(cmp.stdout)) {
      const [source, target] = await readBoth(d.image, targetImage);
      assert.fail(
        `qemu-img compare: ${(cmp.stdout + cmp.stderr).trim()}\n${explainDifferences(source, target, tap)}`,
      );
    }
    await assertFsckClean(d.image);
    await assertFsckClean(targetImage);
  },
);

test(
  "guest: a stall in the server (its mirror target frozen) is reported with the server's unanswered requests",
  { timeout: TEST_TIMEOUT_MS },
  async (t) => {
    await guestImage();
    const d = await serveWithQmp(t, { sizeBytes: DISK_BYTES });
    const targetImage = makeImage(join(d.dir, "target.img"), DISK_BYTES);
    const remote = await startDefaultQemuNbd(t, targetImage, join(d.dir, "target.sock"));
    // A frozen target holds each request until this timeout: the guest's writes wait in the server.
    await mirrorTo(d, remote.socket, { "x-request-timeout": 600 });

    const guest = await bootGuest(d, { stallMs: 8_000 });
    await guest.waitForConsole(/^DRIVETAP-GUEST: step fio/);
    await guest.waitForConsole(/^DRIVETAP-GUEST: hb /, { from: guest.console().length });
    const frozen = remote.running!.proc;
    frozen.kill("SIGSTOP");
    try {
      const err = await guest.done.then(
        (r) => assert.fail(`the guest finished although the server held its writes: ${r.markers.join("; ")}`),
        (e: Error) => e,
      );
      for (const line of err.message.split("--- guest console")[0].trimEnd().split("\n")) t.diagnostic(line);
      assert.match(
        err.message,
        /^guest stalled: (no request on disk0 completed for \d+ ms|the guest has had requests in flight and seen none complete for [\d.]+ s)/,
      );
      // The guest's own heartbeat shows its writes outstanding.
      assert.match(err.message, /guest view: DRIVETAP-GUEST: hb uptime [\d.]+ inflight \d+ [1-9]\d* /);
      assert.match(
        err.message,
        /verdict: SERVER STALL: the server has received \d+ requests it has not answered, the oldest \d+ ms ago/,
      );
      assert.match(err.message, /^ {4}write offset \d+ length 4096 age \d+ ms$/im);
    } finally {
      // Let the held writes go (the mirror degrades), so the daemon can stop.
      await remote.kill();
    }
  },
);
