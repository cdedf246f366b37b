/**
 * The drivetap command line as a user meets it: help, argument errors, --read-only, and shutdown on
 * SIGTERM / SIGINT while clients are writing (exit 0, and every write the client saw acknowledged is in
 * the image file afterwards).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import * as C from "../../src/nbd/protocol/constants.js";
import { CLI, readImage, serveTempImage } from "../helpers/daemon.js";
import { EofError, openExport } from "../helpers/raw-nbd.js";
import { SYSTEM_PYTHON, run, start, tempDir } from "../helpers/run.js";

const MiB = 1024 * 1024;
const KiB = 1024;

function drivetap(args: readonly string[]) {
  return run(process.execPath, [CLI, ...args], { timeoutMs: 15_000 });
}

test("drivetap --help and serve --help exit 0 and describe the options", async () => {
  const top = await drivetap(["--help"]);
  assert.equal(top.code, 0, top.stderr);
  assert.match(top.stdout, /Usage: drivetap/);
  assert.match(top.stdout, /serve/);
  const serve = await drivetap(["serve", "--help"]);
  assert.equal(serve.code, 0, serve.stderr);
  for (const opt of [
    "--socket",
    "--port",
    "--bind",
    "--export-name",
    "--node-name",
    "--read-only",
    "--size",
    "--verbose",
  ]) {
    assert.ok(serve.stdout.includes(opt), `serve --help mentions ${opt}`);
  }
});

test("bad arguments exit non-zero with a clear message", async (t) => {
  const dir = tempDir(t);
  const cases: Array<[string[], RegExp]> = [
    [["serve", "--port", "abc"], /not a port: abc/],
    [["serve", "--port", "70000"], /not a port: 70000/],
    [["serve", "--size", "1Q", "--socket", join(dir, "a.sock")], /not a size/],
    [
      ["serve", join(dir, "missing.img"), "--socket", join(dir, "b.sock")],
      /drivetap serve: .*no such file.*missing\.img/i,
    ],
    [["serve", dir, "--socket", join(dir, "c.sock")], /EISDIR|not a regular file/],
    [["serve", "--socket", join(dir, "d.sock"), "--port", "10999"], /--socket or --port, not both/],
    [["serve", "--bogus"], /unknown option '--bogus'/],
  ];
  for (const [args, message] of cases) {
    const r = await drivetap(args);
    assert.notEqual(r.code, 0, `drivetap ${args.join(" ")} must fail`);
    assert.match(r.stderr, message, `drivetap ${args.join(" ")}`);
    assert.doesNotMatch(r.stdout, /ready at/, "nothing was served");
  }
  for (const s of ["a.sock", "b.sock", "c.sock", "d.sock"])
    assert.ok(!existsSync(join(dir, s)), `${s} not left behind`);
});

test("--read-only: qemu-io cannot write, the server answers writes with EPERM, reads work", async (t) => {
  const content = Buffer.alloc(1 * MiB, 0x42);
  const { daemon, image } = await serveTempImage(t, 8 * MiB, { args: ["--read-only"], content });

  const rw = await run("qemu-io", ["-f", "raw", daemon.uri, "-c", "write -P 0x99 0 4k"]);
  assert.notEqual(rw.code, 0, "qemu-io write on a read-only export fails");
  assert.match(rw.stderr, /Permission denied|read-only/i);
  const ro = await run("qemu-io", [
    "-r",
    "-f",
    "raw",
    daemon.uri,
    "-c",
    "read -P 0x42 0 1M",
    "-c",
    "read -P 0 1M 1M",
  ]);
  assert.equal(ro.code, 0, ro.stdout + ro.stderr);

  // libnbd with strict mode off sends the write anyway: the refusal must come from the server.
  const py = [
    "import nbd, sys",
    "h = nbd.NBD()",
    "h.set_strict_mode(0)",
    "h.connect_uri(sys.argv[1])",
    "print('read-only', h.is_read_only())",
    "for name, op in [('write', lambda: h.pwrite(b'x' * 4096, 0)), ('zero', lambda: h.zero(4096, 0)), ('trim', lambda: h.trim(4096, 0))]:",
    "    try:",
    "        op(); print(name, 'NOERR')",
    "    except nbd.Error as e:",
    "        print(name, e.errno)",
    "h.shutdown()",
  ].join("\n");
  const r = await run(SYSTEM_PYTHON, ["-c", py, daemon.uri]);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stdout, /^read-only True$/m);
  assert.match(r.stdout, /^write EPERM$/m);
  assert.match(r.stdout, /^zero EPERM$/m);
  assert.match(r.stdout, /^trim EPERM$/m);

  assert.ok(readImage(image, 0, MiB).equals(content), "image unchanged");
  assert.equal(await daemon.stop(), 0);
});

test("SIGTERM while qemu-io writes: exit 0, every write qemu-io saw complete is in the file", async (t) => {
  const { daemon, image } = await serveTempImage(t, 64 * MiB);
  const writes = 1000;
  const commands: string[] = [];
  // 64 KiB each at distinct offsets, pattern (i % 255) + 1; qemu-io's default cache mode sets FUA.
  for (let i = 0; i < writes; i++) commands.push("-c", `write -P ${(i % 255) + 1} ${i * 64 * KiB} 64k`);
  const qemu = start("qemu-io", ["-f", "raw", daemon.uri, ...commands], { timeoutMs: 60_000 });
  t.after(() => {
    if (qemu.proc.exitCode === null) qemu.proc.kill("SIGKILL");
  });
  // qemu-io's stdout is block-buffered into the pipe: the first line arrives after some dozens of writes.
  await qemu.waitForStdout(/^wrote 65536\/65536 bytes at offset/);
  assert.equal(await daemon.stop("SIGTERM"), 0, daemon.stderr());
  const result = await qemu.result;

  const acked = [...result.stdout.matchAll(/^wrote 65536\/65536 bytes at offset (\d+)$/gm)].map((m) =>
    Number(m[1]),
  );
  t.diagnostic(`qemu-io completed ${acked.length} of ${writes} writes before the daemon stopped`);
  assert.ok(acked.length > 0, "some writes completed");
  assert.ok(acked.length < writes, `the signal came in the middle (${acked.length}/${writes} done)`);
  assert.notEqual(result.code, 0, "qemu-io saw the server go away");
  for (const offset of acked) {
    const i = offset / (64 * KiB);
    const got = readImage(image, offset, 64 * KiB);
    assert.ok(
      got.every((b) => b === (i % 255) + 1),
      `acknowledged write ${i} at ${offset} is on disk`,
    );
  }
});

test("SIGINT while a client keeps 32 writes in flight: exit 0, every acknowledged write is on disk", async (t) => {
  const slotBytes = 64 * KiB;
  const slots = 1024;
  const { daemon, image } = await serveTempImage(t, slots * slotBytes);
  const { client } = await openExport(daemon.socket);
  t.after(() => client.destroy());
  const pattern = (i: number): number => (i % 251) + 1;
  let next = 0;
  const sendOne = (): void => {
    const i = next++;
    client.sendRequest({
      type: C.NBD_CMD_WRITE,
      flags: i % 2 ? C.NBD_CMD_FLAG_FUA : 0,
      offset: i * slotBytes,
      length: slotBytes,
      cookie: i + 1,
      payload: Buffer.alloc(slotBytes, pattern(i)),
    });
  };
  for (let k = 0; k < 32; k++) sendOne();
  const acked: number[] = [];
  let signalledAt = -1;
  for (;;) {
    let reply;
    try {
      reply = await client.readSimpleReply(20_000);
    } catch (err) {
      if (!(err instanceof EofError)) throw err;
      assert.equal(err.received, 0, "the server never cuts a reply short");
      break;
    }
    assert.equal(reply.error, 0, `write ${reply.cookie - 1} succeeded`);
    acked.push(reply.cookie - 1);
    if (signalledAt < 0 && acked.length === 50) {
      signalledAt = acked.length;
      daemon.proc.kill("SIGINT");
    }
    if (next < slots) sendOne();
  }
  t.diagnostic(`${acked.length} writes acknowledged, ${next} sent, SIGINT after ${signalledAt}`);
  assert.ok(signalledAt > 0, "the signal was sent while writing");
  assert.equal(await daemon.exited, 0, daemon.stderr());
  assert.ok(acked.length >= 50 && acked.length < slots, `stopped mid-run after ${acked.length} writes`);
  const file = readFileSync(image);
  for (const i of acked) {
    const region = file.subarray(i * slotBytes, (i + 1) * slotBytes);
    assert.ok(
      region.every((b) => b === pattern(i)),
      `acknowledged write ${i} is on disk`,
    );
  }
});

test("SIGINT while fio runs a QD32 random-write load: the daemon exits 0 and fio ends", async (t) => {
  const { daemon } = await serveTempImage(t, 64 * MiB, { args: ["--verbose"] });
  const fio = start(
    "fio",
    [
      "--name=load",
      "--ioengine=nbd",
      `--uri=${daemon.uri}`,
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=32",
      "--size=64m",
      "--time_based",
      "--runtime=60",
      "--status-interval=1",
    ],
    { timeoutMs: 60_000 },
  );
  t.after(() => {
    if (fio.proc.exitCode === null) fio.proc.kill("SIGKILL");
  });
  // The first periodic status report means fio has been writing for a second.
  await fio.waitForStdout(/write: IOPS=/, 20_000);
  assert.equal(await daemon.stop("SIGINT"), 0, daemon.stderr());
  const r = await fio.result;
  assert.notEqual(r.code, 0, "fio noticed the server going away before its 60 s runtime");
  assert.match(daemon.stderr(), /"signal":"SIGINT"/);
});
