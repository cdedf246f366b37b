/**
 * The CLI commands that drive a running daemon over QMP (`drivetap qmp`, `backup`, `jobs`), run as a user
 * runs them: the real daemon with --qmp, the CLI binary as a child process, qemu-io writing through NBD,
 * cmp comparing files. Last, the README's seed scenario is pasted into an interactive shell, so the README
 * stays true.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { QmpClient, type QmpEvent } from "../../src/qmp/client.js";
import { CLI, makeImage, serveTempImage, type ServedImage } from "../helpers/daemon.js";
import { assertNothingLeft, pasteIntoShell, readmeSection } from "../helpers/readme.js";
import { run, runOk, start, tempDir, type RunResult } from "../helpers/run.js";

const MiB = 1024 * 1024;
const CLI_TIMEOUT_MS = 60_000;

/** The environment without $DRIVETAP_QMP, so every socket the CLI uses is the one a test chose. */
function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...extra };
  if (!("DRIVETAP_QMP" in extra)) delete env.DRIVETAP_QMP;
  return env;
}

function drivetap(
  args: readonly string[],
  opts: { env?: Record<string, string>; cwd?: string } = {},
): Promise<RunResult> {
  return run(process.execPath, [CLI, ...args], {
    timeoutMs: CLI_TIMEOUT_MS,
    env: cleanEnv(opts.env),
    cwd: opts.cwd,
  });
}

function assertExit(r: RunResult, code: number, what: string): void {
  assert.equal(r.code, code, `${what}: exit ${r.code ?? r.signal}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
}

interface QmpServed extends ServedImage {
  /** The daemon's QMP socket. */
  readonly qmp: string;
}

/** A raw image of sizeBytes served with --qmp; everything is stopped and removed after the test. */
async function serveWithQmp(t: TestContext, sizeBytes: number, content?: Buffer): Promise<QmpServed> {
  const qmpDir = mkdtempSync(join(tmpdir(), "drivetap-cliqmp-"));
  const qmp = join(qmpDir, "qmp.sock");
  try {
    const served = await serveTempImage(t, sizeBytes, { args: ["--qmp", qmp], content });
    // Registered after the daemon's stop, so it runs after it.
    t.after(() => rmSync(qmpDir, { recursive: true, force: true }));
    return { ...served, qmp };
  } catch (err) {
    rmSync(qmpDir, { recursive: true, force: true });
    throw err;
  }
}

/** A QMP client for watching events, closed after the test. */
async function watcher(t: TestContext, qmp: string): Promise<QmpClient> {
  const client = await QmpClient.connect(qmp);
  t.after(() => client.close());
  return client;
}

function jobEvent(event: string, device: string): (e: QmpEvent) => boolean {
  return (e) => e.event === event && e.data.device === device;
}

async function jobsJson(qmp: string): Promise<Array<Record<string, unknown>>> {
  const r = await drivetap(["jobs", "--json", "--socket", qmp]);
  assertExit(r, 0, "drivetap jobs --json");
  return JSON.parse(r.stdout) as Array<Record<string, unknown>>;
}

test("qmp query-version prints the return value as JSON; the socket comes from --socket or $DRIVETAP_QMP", async (t) => {
  const { qmp } = await serveWithQmp(t, 16 * MiB);

  const bySocket = await drivetap(["qmp", "--socket", qmp, "query-version"]);
  assertExit(bySocket, 0, "qmp --socket query-version");
  const version = JSON.parse(bySocket.stdout) as { qemu: { major: number }; package: string };
  assert.equal(typeof version.qemu.major, "number");
  assert.match(version.package, /drivetap/);
  assert.match(bySocket.stdout, /^\{\n {2}"/, "pretty-printed");
  assert.equal(bySocket.stderr, "");

  const byEnv = await drivetap(["qmp", "query-version"], { env: { DRIVETAP_QMP: qmp } });
  assertExit(byEnv, 0, "DRIVETAP_QMP=... qmp query-version");
  assert.deepEqual(JSON.parse(byEnv.stdout), version);

  const help = await drivetap(["qmp", "--help"]);
  assertExit(help, 0, "qmp --help");
  assert.match(help.stdout, /key=value/);
  assert.match(help.stdout, /Examples:[\s\S]*drivetap qmp block-job-cancel device=/);
  assert.match(help.stdout, /DRIVETAP_QMP[\s\S]*\/tmp\/drivetap-qmp\.sock/);
});

test("a socket that is missing or not QMP: exit 1 with a message naming it", async (t) => {
  const dir = tempDir(t);
  const missing = join(dir, "missing.sock");
  const r = await drivetap(["qmp", "--socket", missing, "query-version"]);
  assertExit(r, 1, "qmp on a missing socket");
  assert.match(r.stderr, /^drivetap qmp: cannot connect to the QMP socket .*missing\.sock: no such socket/);
  assert.equal(r.stdout, "");

  // The NBD socket by mistake: it never sends a QMP greeting.
  const { daemon } = await serveWithQmp(t, 16 * MiB);
  const nbd = await drivetap(["jobs", "--socket", daemon.socket]);
  assertExit(nbd, 1, "jobs on the NBD socket");
  assert.match(nbd.stderr, /^drivetap jobs: no QMP greeting on .*nbd\.sock .*not its NBD socket\?/);
});

test("key=value pairs (dotted keys nest, JSON values) and one JSON object become QMP arguments", async (t) => {
  const { qmp, dir } = await serveWithQmp(t, 16 * MiB);
  const other = makeImage(join(dir, "other.img"), 4 * MiB);
  const q = (...args: string[]): Promise<RunResult> => drivetap(["qmp", "--socket", qmp, ...args]);

  const nested = await q(
    "blockdev-add",
    "driver=raw",
    "node-name=other",
    "file.driver=file",
    `file.filename=${other}`,
  );
  assertExit(nested, 0, "blockdev-add with dotted keys");
  assert.deepEqual(JSON.parse(nested.stdout), {});
  const json = await q(
    "blockdev-add",
    JSON.stringify({ driver: "memory", "node-name": "scratch", size: MiB }),
  );
  assertExit(json, 0, "blockdev-add with a JSON object");
  const number = await q("blockdev-add", "driver=memory", "node-name=m2", `size=${2 * MiB}`);
  assertExit(number, 0, "size=N is a number");
  // A quoted value stays a string, which the schema refuses for an int.
  const quoted = await q("blockdev-add", "driver=memory", "node-name=m3", `size="${2 * MiB}"`);
  assertExit(quoted, 1, 'size="N" is a string');
  assert.match(quoted.stderr, /^drivetap qmp: GenericError: .*size/);

  const nodes = await q("query-named-block-nodes");
  assertExit(nodes, 0, "query-named-block-nodes");
  const sizes = new Map(
    (JSON.parse(nodes.stdout) as Array<{ "node-name": string; image: { "virtual-size": number } }>).map(
      (n) => [n["node-name"], n.image["virtual-size"]],
    ),
  );
  assert.equal(sizes.get("other"), 4 * MiB);
  assert.equal(sizes.get("scratch"), MiB);
  assert.equal(sizes.get("m2"), 2 * MiB);
  assert.equal(sizes.has("m3"), false);

  // force=true is a boolean: the schema accepts it and the command fails only on the missing job.
  const bool = await q("block-job-cancel", "device=nojob", "force=true");
  assertExit(bool, 1, "block-job-cancel force=true");
  assert.match(bool.stderr, /^drivetap qmp: DeviceNotActive: /);
  const asString = await q("block-job-cancel", "device=nojob", "force=yes");
  assertExit(asString, 1, "force=yes is a string");
  assert.match(asString.stderr, /^drivetap qmp: GenericError: .*force/);

  for (const [args, message] of [
    [["query-version", "oops"], /expected key=value or one JSON object, got 'oops'/],
    [["blockdev-add", "a=1", "a.b=2"], /'a' is given both as a value and as an object/],
    [["blockdev-add", "a=1", "a=2"], /'a' is given twice/],
    [["blockdev-add", "{not json"], /not valid JSON/],
    [["blockdev-add", "[1]"], /expected key=value/],
    [["blockdev-add", '{"driver":"memory"}', "size=1"], /either one JSON object or key=value pairs/],
  ] as const) {
    const r = await q(...args);
    assertExit(r, 1, `qmp ${args.join(" ")}`);
    assert.match(r.stderr, message, `qmp ${args.join(" ")}`);
    assert.equal(r.stdout, "");
  }
});

test("a QMP error exits 1 and prints its class and description on stderr", async (t) => {
  const { qmp } = await serveWithQmp(t, 16 * MiB);
  const noJob = await drivetap(["qmp", "--socket", qmp, "block-job-cancel", "device=nope"]);
  assertExit(noJob, 1, "block-job-cancel of a missing job");
  assert.equal(noJob.stderr, "drivetap qmp: DeviceNotActive: Block job 'nope' not found\n");
  assert.equal(noJob.stdout, "");
  const unknown = await drivetap(["qmp", "--socket", qmp, "no-such-command"]);
  assertExit(unknown, 1, "an unknown command");
  assert.match(unknown.stderr, /^drivetap qmp: CommandNotFound: .*no-such-command/);
  const badBackup = await drivetap([
    "backup",
    "--socket",
    qmp,
    "--sync",
    "full",
    "--target",
    "/x",
    "--device",
    "nope",
  ]);
  assertExit(badBackup, 1, "backup of a missing device");
  assert.match(badBackup.stderr, /^drivetap backup: GenericError: Cannot find device='nope'/);
});

test("backup --sync full: progress on stderr, 'backup complete', the target equals the source", async (t) => {
  const content = randomBytes(16 * MiB);
  const { qmp, dir, image } = await serveWithQmp(t, 16 * MiB, content);
  const target = join(dir, "full.img");
  // A speed limit makes the job last long enough to report progress more than once.
  const r = await drivetap([
    "backup",
    "--socket",
    qmp,
    "--sync",
    "full",
    "--target",
    target,
    "--speed",
    "12M",
  ]);
  assertExit(r, 0, "backup --sync full");
  assert.equal(r.stdout, `backup complete: ${16 * MiB} bytes\n`);
  const lines = r.stderr.trimEnd().split("\n");
  assert.ok(lines.length >= 2, `progress lines:\n${r.stderr}`);
  for (const line of lines) assert.match(line, /^backup disk0: \d+% [\d.]+ (B|KiB|MiB) of 16\.0 MiB/);
  assert.match(lines[lines.length - 1], /^backup disk0: 100% 16\.0 MiB of 16\.0 MiB/);
  await runOk("cmp", [image, target]);
  assert.deepEqual(await jobsJson(qmp), [], "the job is gone");

  // --detach returns at once; a relative target is taken from the CLI's directory, not the daemon's.
  const events = await watcher(t, qmp);
  const detached = await drivetap(
    ["backup", "--socket", qmp, "--sync", "top", "--target", "top.img", "--job-id", "top1", "--detach"],
    { cwd: dir },
  );
  assertExit(detached, 0, "backup --sync top --detach");
  assert.equal(
    detached.stdout,
    `job top1 started (sync top); follow with: drivetap jobs --socket ${qmp}; ` +
      `cancel with: drivetap qmp --socket ${qmp} block-job-cancel device=top1\n`,
  );
  const done = await events.waitForEvent(jobEvent("BLOCK_JOB_COMPLETED", "top1"));
  assert.equal(done.data.error, undefined);
  await runOk("cmp", [image, join(dir, "top.img")]);
});

test("Ctrl-C during backup --sync full cancels the job and exits 130", async (t) => {
  const { qmp, dir } = await serveWithQmp(t, 16 * MiB, randomBytes(MiB));
  const events = await watcher(t, qmp);
  const backup = start(
    process.execPath,
    [CLI, "backup", "--socket", qmp, "--sync", "full", "--target", join(dir, "slow.img"), "--speed", "1M"],
    { env: cleanEnv(), timeoutMs: CLI_TIMEOUT_MS },
  );
  t.after(() => {
    if (backup.proc.exitCode === null && backup.proc.signalCode === null) backup.proc.kill("SIGKILL");
  });
  // The CLI handles SIGINT from before it starts the job, so once the job runs the signal cancels it.
  await events.waitForEvent(
    (e) => e.event === "JOB_STATUS_CHANGE" && e.data.id === "disk0" && e.data.status === "running",
  );
  backup.proc.kill("SIGINT");
  const r = await backup.result;
  assertExit(r, 130, "backup after SIGINT");
  assert.match(r.stderr, /cancelling job disk0/);
  assert.match(r.stderr, /drivetap backup: job disk0 cancelled\n$/);
  assert.equal(r.stdout, "");
  const cancelled = await events.waitForEvent(jobEvent("BLOCK_JOB_CANCELLED", "disk0"));
  assert.ok(Number(cancelled.data.offset) < 16 * MiB, "cancelled before the end");
  assert.deepEqual(await jobsJson(qmp), []);
});

test("backup --sync stream: starts and returns, jobs lists it, cancel leaves target == source after qemu-io writes", async (t) => {
  const { qmp, dir, image, daemon } = await serveWithQmp(t, 16 * MiB);
  const target = join(dir, "stream.img");
  const events = await watcher(t, qmp);

  const started = await drivetap([
    "backup",
    "--socket",
    qmp,
    "--sync",
    "stream",
    "--target",
    target,
    "--job-id",
    "s0",
  ]);
  assertExit(started, 0, "backup --sync stream");
  assert.equal(
    started.stdout,
    `job s0 started (sync stream); cancel with: drivetap qmp --socket ${qmp} block-job-cancel device=s0\n`,
  );

  const listed = await jobsJson(qmp);
  assert.equal(listed.length, 1);
  assert.equal(listed[0].device, "s0");
  assert.equal(listed[0].type, "backup");
  assert.equal(listed[0].status, "running");

  await runOk("qemu-io", [
    "-f",
    "raw",
    daemon.uri,
    "-c",
    "write -P 0xab 0 1M",
    "-c",
    "write -P 0xcd 4M 2M",
    "-c",
    "write -z 5M 256k",
    "-c",
    "discard 5632k 64k",
    "-c",
    "aio_write -P 0xef 512k 1M",
    "-c",
    "aio_write -P 0x12 1M 64k",
    "-c",
    "aio_write -P 0x34 1088k 4k",
    "-c",
    "aio_flush",
  ]);

  const table = await drivetap(["jobs", "--socket", qmp]);
  assertExit(table, 0, "drivetap jobs");
  const [header, ...rows] = table.stdout.trimEnd().split("\n");
  assert.match(header, /^ID\s+TYPE\s+STATUS\s+PROGRESS\s+SPEED\s+IO-STATUS$/);
  assert.equal(rows.length, 1);
  assert.match(rows[0], /^s0\s+backup\s+running\s+[\d.]+ MiB\/[\d.]+ MiB \d+%\s+unlimited\s+ok$/);
  const [afterWrites] = await jobsJson(qmp);
  assert.ok(Number(afterWrites.offset) >= 3 * MiB, `progress counts duplicated bytes: ${afterWrites.offset}`);

  const cancel = await drivetap(["qmp", "--socket", qmp, "block-job-cancel", "device=s0"]);
  assertExit(cancel, 0, "block-job-cancel");
  assert.deepEqual(JSON.parse(cancel.stdout), {});
  const end = await events.waitForEvent(
    (e) => (e.event === "BLOCK_JOB_CANCELLED" || e.event === "BLOCK_JOB_COMPLETED") && e.data.device === "s0",
  );
  assert.equal(end.event, "BLOCK_JOB_CANCELLED", JSON.stringify(end.data));
  assert.deepEqual(await jobsJson(qmp), []);
  const empty = await drivetap(["jobs", "--socket", qmp]);
  assert.equal(empty.stdout, "no block jobs\n");

  const source = readFileSync(image);
  assert.equal(source[0], 0xab, "the writes reached the source");
  assert.equal(source[4 * MiB], 0xcd);
  await runOk("cmp", [image, target]);
});

// ---- the README ----------------------------------------------------------------------------------------

const SEED_HEADING = "## The seed scenario: stream a disk to a file";

const MIRROR_HEADING = "## Mirror to a remote NBD server, survive its outages, move the disk";

test("the README's seed scenario, pasted into an interactive shell, prints 'identical'", async (t) => {
  const script = readmeSection(SEED_HEADING);
  for (const must of [
    "npx drivetap serve",
    "--qmp /tmp/drivetap-qmp.sock",
    "npx drivetap backup --sync stream --target /tmp/stream-copy.img",
    "qemu-io",
    "block-job-cancel device=",
    "cmp /tmp/disk.img /tmp/stream-copy.img && echo identical",
    "qmp --socket /tmp/drivetap-qmp.sock quit",
  ]) {
    assert.ok(script.includes(must), `the seed scenario has ${JSON.stringify(must)}`);
  }

  const { dir, out, r } = await pasteIntoShell(t, script);
  assertExit(r, 0, `the pasted scenario\n${out}`);
  assert.ok(out.split("\n").includes("identical"), `"identical" printed on its own line:\n${out}`);
  assert.match(out, /job disk0 started \(sync stream\)/);
  assert.match(out, /^disk0\s+backup\s+running\s/m, "jobs lists the stream job");
  await runOk("cmp", [join(dir, "disk.img"), join(dir, "stream-copy.img")]);
  // `quit` stopped the daemon.
  await assertNothingLeft(dir);
});

test("the README's mirror example, pasted into a shell, survives the target's kill and ends identical", async (t) => {
  const script = readmeSection(MIRROR_HEADING);
  for (const must of ["blockdev-add driver=nbd", "blockdev-mirror", "kill -9 %1", "qemu-img compare"]) {
    assert.ok(script.includes(must), `the mirror example has ${JSON.stringify(must)}`);
  }
  const { dir, out, r } = await pasteIntoShell(t, script);
  assertExit(r, 0, `the pasted example\n${out}\n${r.stderr}`);
  assert.match(out, /"x-degraded": true/, "query-block-jobs showed the outage");
  assert.match(out, /Images are identical\./);
  await assertNothingLeft(dir);
});

test("the README's TLS mirror example, pasted into a shell, mirrors to a qemu-nbd requiring TLS", async (t) => {
  const script = readmeSection("## Mirror to a qemu-nbd that requires TLS");
  for (const must of [
    "openssl req -x509",
    "qemu-nbd --object tls-creds-x509,id=tls0,dir=/tmp/tls/server,endpoint=server --tls-creds tls0",
    "npx drivetap mirror --target 'nbds+unix:///?socket=/tmp/tls-remote.sock' --tls-creds /tmp/tls/client",
    "qemu-img compare",
  ]) {
    assert.ok(script.includes(must), `the TLS example has ${JSON.stringify(must)}`);
  }
  const { dir, out, r } = await pasteIntoShell(t, script);
  assertExit(r, 0, `the pasted example\n${out}\n${r.stderr}`);
  assert.match(out, /mirror disk0 ready/);
  assert.match(out, /Images are identical\./);
  await assertNothingLeft(dir);
});

test("the README's pull-mode incremental example, pasted into a shell, maps exactly the written cluster", async (t) => {
  const script = readmeSection("## Dirty bitmaps and incremental backup");
  assert.ok(script.includes("nbdinfo --map=qemu:dirty-bitmap:b0"));
  const { dir, out, r } = await pasteIntoShell(t, script);
  assertExit(r, 0, `the pasted example\n${out}\n${r.stderr}`);
  const dirty = out
    .split("\n")
    .filter((l) => /\bdirty$/.test(l.trim()))
    .map((l) => l.trim().split(/\s+/).slice(0, 2).map(Number));
  assert.deepEqual(dirty, [[1048576, 65536]], `only the written cluster is dirty:\n${out}`);
  await assertNothingLeft(dir);
});
