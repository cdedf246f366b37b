/**
 * Image locks in QEMU's scheme, checked against QEMU's own tools, and unix sockets that one daemon
 * cannot steal from another or delete under it.
 *
 * - The lock bytes drivetap holds are read from outside with F_OFD_GETLK: 100 + bit for each held
 *   permission, 200 + bit for each permission not shared (QEMU 7.2's layout and bits).
 * - While drivetap serves an image writable, qemu-io, qemu-img and qemu-nbd refuse to open it for
 *   writing with QEMU's "Failed to get "write" lock" and read it with -U; a second drivetap refuses it
 *   (exit code 1); drivetap refuses an image that qemu-nbd or qemu-io holds for writing.
 * - A read-only drivetap lets other readers in and keeps writers out.
 * - A second daemon on a live --socket or --qmp path is refused and the first keeps serving; a
 *   daemon's stop leaves a socket it no longer owns alone; a stale socket is replaced; a file that
 *   is not a socket is neither used nor deleted.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { closeSync, existsSync, openSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { imageLockingAvailable } from "../../src/block/drivers/image-lock.js";
import { LOCK_NONE, LOCK_WRITE, native } from "../../src/block/drivers/native.js";
import { QmpClient } from "../../src/qmp/client.js";
import { CLI, startDaemon, stopAfter, type RunningDaemon } from "../helpers/daemon.js";
import { run, runForking, runOk, tempDir, type RunResult } from "../helpers/run.js";

const SIZE_BYTES = 1024 * 1024;
const CLI_TIMEOUT_MS = 20_000;
const LOCK_BYTES = [100, 101, 102, 103, 200, 201, 202, 203];

function pattern(): Buffer {
  const b = Buffer.alloc(SIZE_BYTES);
  for (let i = 0; i < b.length; i++) b[i] = 1 + ((i * 13) % 251);
  return b;
}

function imageIn(t: TestContext): { dir: string; image: string; original: Buffer } {
  const dir = tempDir(t, "drivetap-lock-");
  const image = join(dir, "disk.img");
  const original = pattern();
  writeFileSync(image, original);
  return { dir, image, original };
}

/** The lock bytes some other open file description holds on the image, probed from this process. */
function heldLockBytes(image: string): number[] {
  const fd = openSync(image, "r");
  try {
    return LOCK_BYTES.filter((byte) => {
      const r = native!.ofdTestLock!(fd, byte, 1, LOCK_WRITE);
      assert.ok(r >= 0, `F_OFD_GETLK on byte ${byte}: ${r}`);
      return r !== LOCK_NONE;
    });
  } finally {
    closeSync(fd);
  }
}

async function serve(t: TestContext, image: string, args: string[] = []): Promise<RunningDaemon> {
  const daemon = await startDaemon({ image, args });
  stopAfter(t, daemon);
  return daemon;
}

/** Runs `drivetap serve` expecting it to refuse: it must exit on its own (not serve) within the timeout. */
function serveRefused(args: string[]): Promise<RunResult> {
  return run(process.execPath, [CLI, "serve", ...args], { timeoutMs: CLI_TIMEOUT_MS });
}

/** The daemon's export still answers and serves `expected` at offset 0. */
async function assertServes(daemon: RunningDaemon, expected: Buffer, what: string): Promise<void> {
  const byte = `0x${expected[0].toString(16)}`;
  const r = await run("qemu-io", ["-f", "raw", "-r", daemon.uri, "-c", `read -P ${byte} 0 1`]);
  assert.equal(r.code, 0, `${what}: ${r.stdout} ${r.stderr}`);
  assert.doesNotMatch(r.stdout, /Pattern verification failed/, what);
}

const WRITE_LOCK = /Failed to get "write" lock/;
const ANOTHER_PROCESS = /Is another process using the image/;

test("the native addon with OFD locks is built", () => {
  assert.ok(imageLockingAvailable(), "native addon with ofdSetLock/ofdTestLock; run npm install");
});

test("lock bytes: QEMU's layout for writable, read-only and force-share serving", async (t) => {
  const { image } = imageIn(t);
  const cases: Array<[string[], number[]]> = [
    // consistent read + write held; write and resize not shared
    [[], [100, 101, 201, 203]],
    // consistent read held; write and resize not shared
    [["--read-only"], [100, 201, 203]],
    // consistent read held; everything shared
    [["--read-only", "--force-share"], [100]],
  ];
  for (const [args, bytes] of cases) {
    const daemon = await serve(t, image, args);
    assert.deepEqual(heldLockBytes(image), bytes, `drivetap serve ${args.join(" ")}`);
    assert.equal(await daemon.stop(), 0);
    assert.deepEqual(heldLockBytes(image), [], `after stopping drivetap serve ${args.join(" ")}`);
  }
});

test("QEMU's tools refuse to write an image drivetap serves writable, and read it with -U", async (t) => {
  const { dir, image, original } = imageIn(t);
  const daemon = await serve(t, image);
  const other = join(dir, "other.img");
  writeFileSync(other, Buffer.alloc(SIZE_BYTES, 0xee));

  const writers: Array<[string, string, string[]]> = [
    ["qemu-io write", "qemu-io", ["-f", "raw", image, "-c", "write -P 0xee 0 4096"]],
    ["qemu-img convert -n onto it", "qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", other, image]],
    ["qemu-img resize", "qemu-img", ["resize", "-f", "raw", image, "2M"]],
    ["qemu-nbd", "qemu-nbd", ["-t", "-f", "raw", "-k", join(dir, "qemu-nbd.sock"), image]],
  ];
  for (const [what, cmd, args] of writers) {
    const r = await run(cmd, args, { timeoutMs: CLI_TIMEOUT_MS });
    assert.notEqual(r.code, 0, `${what} is refused: ${r.stdout}`);
    assert.match(r.stderr, WRITE_LOCK, what);
    assert.match(r.stderr, ANOTHER_PROCESS, what);
  }
  assert.ok(readFileSync(image).equals(original), "the image is unchanged");

  const byte = `0x${original[4096].toString(16)}`;
  const read = await runOk("qemu-io", ["-f", "raw", "-r", "-U", image, "-c", `read -P ${byte} 4096 1`]);
  assert.doesNotMatch(read.stdout, /Pattern verification failed/);
  await assertServes(daemon, original, "drivetap still serves");
});

test("a read-only drivetap lets readers in and keeps writers out", async (t) => {
  const { image, original } = imageIn(t);
  const daemon = await serve(t, image, ["--read-only"]);
  const byte = `0x${original[0].toString(16)}`;
  // No -U: a reader is compatible with a read-only server.
  await runOk("qemu-io", ["-f", "raw", "-r", image, "-c", `read -P ${byte} 0 1`]);
  const w = await run("qemu-io", ["-f", "raw", image, "-c", "write -P 0xee 0 4096"]);
  assert.notEqual(w.code, 0, `qemu-io write is refused: ${w.stdout}`);
  assert.match(w.stderr, WRITE_LOCK);

  const reader = await serve(t, image, ["--read-only"]);
  await assertServes(reader, original, "a second read-only drivetap");
  const writer = await serveRefused([image, "--socket", join(tempDir(t), "w.sock")]);
  assert.equal(writer.code, 1, `a writable drivetap is refused: ${writer.stdout}`);
  assert.match(writer.stderr, WRITE_LOCK);
  assert.ok(readFileSync(image).equals(original), "the image is unchanged");
  await assertServes(daemon, original, "the first read-only drivetap");
});

test("a second drivetap serve on one image is refused with exit code 1; --force-share needs --read-only", async (t) => {
  const { image, original } = imageIn(t);
  const first = await serve(t, image);
  const sockets = tempDir(t);
  const second = await serveRefused([image, "--socket", join(sockets, "second.sock")]);
  assert.equal(second.code, 1, `second daemon: ${second.stdout}`);
  assert.match(second.stderr, /drivetap serve: Failed to get "write" lock/);
  assert.match(second.stderr, ANOTHER_PROCESS);
  assert.ok(!existsSync(join(sockets, "second.sock")), "the refused daemon left no socket");

  const forced = await serveRefused([image, "--force-share", "--socket", join(sockets, "forced.sock")]);
  assert.equal(forced.code, 1, `--force-share without --read-only: ${forced.stdout}`);
  assert.match(forced.stderr, /--force-share needs --read-only/);
  await assertServes(first, original, "the first daemon still serves");
});

test("drivetap refuses an image that qemu-nbd or qemu-io holds for writing", async (t) => {
  const { dir, image } = imageIn(t);
  const pidFile = join(dir, "qemu-nbd.pid");
  // --fork returns once the socket is ready and the image open (and locked).
  await runForking(
    t,
    "qemu-nbd",
    ["--fork", "--pid-file", pidFile, "-t", "-f", "raw", "-k", join(dir, "q.sock"), image],
    pidFile,
  );
  const underNbd = await serveRefused([image, "--socket", join(dir, "a.sock")]);
  assert.equal(underNbd.code, 1, `drivetap next to qemu-nbd: ${underNbd.stdout}`);
  assert.match(underNbd.stderr, /Failed to get shared "write" lock/);

  // qemu-io, interactive, with another image open for writing until its stdin ends.
  const second = join(dir, "second.img");
  writeFileSync(second, pattern());
  const io = spawn("qemu-io", ["-f", "raw", second], { stdio: ["pipe", "pipe", "pipe"] });
  t.after(() => io.kill("SIGKILL"));
  const exited = new Promise<void>((resolve) => io.on("exit", () => resolve()));
  let out = "";
  const wrote = new Promise<void>((resolve, reject) => {
    io.stdout.setEncoding("utf8").on("data", (s: string) => {
      out += s;
      if (/wrote 512\/512/.test(out)) resolve();
    });
    io.on("exit", () => reject(new Error(`qemu-io exited early: ${out}`)));
  });
  io.stdin.write("write -P 0x5a 0 512\n");
  await wrote;
  const underIo = await serveRefused([second, "--socket", join(dir, "b.sock")]);
  assert.equal(underIo.code, 1, `drivetap next to qemu-io: ${underIo.stdout}`);
  assert.match(underIo.stderr, /Failed to get shared "write" lock/);
  io.stdin.end("quit\n");
  await exited;
});

async function qmpAnswers(path: string): Promise<boolean> {
  const qmp = await QmpClient.connect(path);
  try {
    const v = (await qmp.execute("query-version")) as Record<string, unknown>;
    return typeof v.package === "string";
  } finally {
    qmp.close();
  }
}

test("a second daemon on a live --socket or --qmp path is refused, and the first keeps them", async (t) => {
  const dir = tempDir(t, "drivetap-sock-");
  const a = imageIn(t);
  const b = imageIn(t);
  const socket = join(dir, "nbd.sock");
  const qmp = join(dir, "qmp.sock");
  const first = await startDaemon({ image: a.image, socket, args: ["--qmp", qmp] });
  stopAfter(t, first);

  const sameSocket = await serveRefused([b.image, "--socket", socket]);
  assert.equal(sameSocket.code, 1, `same --socket: ${sameSocket.stdout}`);
  assert.match(sameSocket.stderr, new RegExp(`socket ${socket} is in use by a running server`));

  const sameQmp = await serveRefused([b.image, "--socket", join(dir, "other.sock"), "--qmp", qmp]);
  assert.equal(sameQmp.code, 1, `same --qmp: ${sameQmp.stdout}`);
  assert.match(sameQmp.stderr, new RegExp(`socket ${qmp} is in use by a running server`));
  assert.ok(!existsSync(join(dir, "other.sock")), "the refused daemon removed its own NBD socket");

  await assertServes(first, a.original, "the first daemon's NBD socket");
  assert.ok(await qmpAnswers(qmp), "the first daemon's QMP socket answers");
});

test("a daemon's stop leaves alone the sockets another daemon took over", async (t) => {
  const dir = tempDir(t, "drivetap-sock-");
  const a = imageIn(t);
  const b = imageIn(t);
  const socket = join(dir, "nbd.sock");
  const qmp = join(dir, "qmp.sock");
  const first = await startDaemon({ image: a.image, socket, args: ["--qmp", qmp] });
  stopAfter(t, first);
  // Someone removed the first daemon's socket files; a second daemon then took the paths.
  rmSync(socket);
  rmSync(qmp);
  const second = await startDaemon({ image: b.image, socket, args: ["--qmp", qmp] });
  stopAfter(t, second);

  assert.equal(await first.stop(), 0, `first daemon stops cleanly: ${first.stderr()}`);
  assert.ok(existsSync(socket), "the second daemon's NBD socket is still there");
  assert.ok(existsSync(qmp), "the second daemon's QMP socket is still there");
  await assertServes(second, b.original, "the second daemon");
  assert.ok(await qmpAnswers(qmp), "the second daemon's QMP socket answers");

  assert.equal(await second.stop(), 0);
  assert.ok(!existsSync(socket) && !existsSync(qmp), "a daemon removes its own sockets at stop");
});

test("a stale socket is replaced; a file that is not a socket is refused and kept", async (t) => {
  const dir = tempDir(t, "drivetap-sock-");
  const a = imageIn(t);
  const socket = join(dir, "nbd.sock");
  const qmp = join(dir, "qmp.sock");
  const killed = await startDaemon({ image: a.image, socket, args: ["--qmp", qmp] });
  stopAfter(t, killed);
  await killed.stop("SIGKILL");
  assert.ok(existsSync(socket) && existsSync(qmp), "a killed daemon leaves stale socket files");

  const next = await startDaemon({ image: a.image, socket, args: ["--qmp", qmp] });
  stopAfter(t, next);
  await assertServes(next, a.original, "the daemon on the replaced stale socket");
  assert.ok(await qmpAnswers(qmp), "QMP on the replaced stale socket");

  const plain = join(dir, "plain");
  writeFileSync(plain, "not a socket\n");
  const r = await serveRefused([a.image, "--read-only", "--force-share", "--socket", plain]);
  assert.equal(r.code, 1, `socket path is a regular file: ${r.stdout}`);
  assert.match(r.stderr, /exists and is not a socket/);
  assert.equal(readFileSync(plain, "utf8"), "not a socket\n", "the file is untouched");
});
