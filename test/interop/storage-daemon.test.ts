/**
 * `drivetap storage-daemon` with qemu-storage-daemon's own command line (the one bench/mirror.ts
 * gives qemu-storage-daemon), and the NBD server's QMP commands: nbd-server-start/-stop/-add/-remove,
 * their errors, authz objects, and BLOCK_EXPORT_DELETED on every path an export goes away.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { TestContext } from "node:test";
import type { QmpEvent } from "../../src/qmp/client.js";
import { CLI, makeImage, unixUri } from "../helpers/daemon.js";
import { assertQmpError, connectQmp, MiB, pollUntil, seededBytes, serveWithQmp } from "../helpers/jobs.js";
import { openExport } from "../helpers/raw-nbd.js";
import { assertNothingLeft, pasteIntoShell, readmeSection } from "../helpers/readme.js";
import { run, runOk, tempDir } from "../helpers/run.js";
import { makePskFile } from "../helpers/tls-certs.js";

const IMAGE_BYTES = 8 * MiB;

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Runs `drivetap storage-daemon ARGS --pidfile P --daemonize`; the parent exits once it is ready. */
async function daemonize(
  t: TestContext,
  dir: string,
  args: readonly string[],
): Promise<{ pid: number; pidfile: string }> {
  const pidfile = join(dir, "qsd.pid");
  const r = await run(process.execPath, [
    CLI,
    "storage-daemon",
    ...args,
    "--pidfile",
    pidfile,
    "--daemonize",
  ]);
  assert.equal(r.code, 0, `storage-daemon --daemonize exits 0 once ready\n${r.stderr}`);
  const pid = Number(readFileSync(pidfile, "utf8"));
  assert.ok(
    Number.isInteger(pid) && pid !== process.pid && isRunning(pid),
    "the pid file names the running daemon",
  );
  t.after(() => {
    if (isRunning(pid)) process.kill(pid, "SIGKILL");
  });
  return { pid, pidfile };
}

function exportDeleted(id: string): (e: QmpEvent) => boolean {
  return (e) => e.event === "BLOCK_EXPORT_DELETED" && e.data.id === id;
}

test("qemu-storage-daemon's command line: nbdinfo, two monitors, drive-backup and drive-mirror equal the source, quit", async (t) => {
  const dir = tempDir(t, "drivetap-qsd-");
  const image = join(dir, "src.img");
  writeFileSync(image, seededBytes(41, IMAGE_BYTES));
  const nbd = join(dir, "nbd.sock");
  const qmp0 = join(dir, "qmp0.sock");
  const qmp1 = join(dir, "qmp1.sock");
  const { pid, pidfile } = await daemonize(t, dir, [
    "--blockdev",
    `driver=file,node-name=file0,filename=${image},cache.direct=off,aio=threads`,
    "--blockdev",
    "driver=raw,node-name=disk0,file=file0",
    "--nbd-server",
    `addr.type=unix,addr.path=${nbd}`,
    "--export",
    "type=nbd,id=e0,node-name=disk0,name=disk0,writable=on",
    "--chardev",
    `socket,id=qmp0,path=${qmp0},server=on,wait=off`,
    "--monitor",
    "chardev=qmp0",
    "--chardev",
    `socket,id=qmp1,path=${qmp1},server=on,wait=off`,
    "--monitor",
    "qmp1",
  ]);
  const info = JSON.parse((await runOk("nbdinfo", ["--json", unixUri(nbd, "disk0")])).stdout) as {
    exports: Array<{ "export-name": string; "export-size": number; is_read_only: boolean }>;
  };
  assert.equal(info.exports[0]["export-name"], "disk0");
  assert.equal(info.exports[0]["export-size"], IMAGE_BYTES);
  assert.equal(info.exports[0].is_read_only, false);

  const a = await connectQmp(t, qmp0);
  const b = await connectQmp(t, qmp1);
  const nodes = (await b.execute("query-named-block-nodes")) as Array<{ "node-name": string; drv: string }>;
  assert.deepEqual(nodes.map((n) => [n["node-name"], n.drv]).sort(), [
    ["disk0", "raw"],
    ["file0", "file"],
  ]);

  // A write through NBD first, so the copies must carry live data too.
  await runOk("qemu-io", ["-f", "raw", "-c", "write -P 0x77 1M 64k", unixUri(nbd, "disk0")]);
  const backup = join(dir, "backup.img");
  await a.execute("drive-backup", { "job-id": "b0", device: "disk0", target: backup, sync: "full" });
  // Events reach every monitor.
  const done = await b.waitForEvent((e) => e.event === "BLOCK_JOB_COMPLETED" && e.data.device === "b0");
  assert.equal(done.data.error, undefined);
  await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", image, backup]);

  const mirror = join(dir, "mirror.img");
  await a.execute("drive-mirror", {
    "job-id": "m0",
    device: "disk0",
    target: mirror,
    sync: "full",
    format: "raw",
  });
  await a.waitForEvent((e) => e.event === "BLOCK_JOB_READY" && e.data.device === "m0");
  await a.execute("block-job-cancel", { device: "m0" });
  const mirrored = await a.waitForEvent((e) => e.event === "BLOCK_JOB_COMPLETED" && e.data.device === "m0");
  assert.equal(mirrored.data.error, undefined);
  await runOk("qemu-img", ["compare", "-f", "raw", "-F", "raw", image, mirror]);

  await a.execute("quit");
  await a.waitForEvent(exportDeleted("e0"));
  await b.waitForEvent(exportDeleted("e0"));
  await pollUntil("the daemon exits after quit", async () => (isRunning(pid) ? undefined : true));
  assert.equal(existsSync(pidfile), false, "the pid file is removed at exit");
  assert.equal(existsSync(nbd) || existsSync(qmp0) || existsSync(qmp1), false, "its sockets are removed");
});

test("storage-daemon command-line errors: QSD's texts, exit 1, nothing opened or created", async (t) => {
  const dir = tempDir(t, "drivetap-qsd-err-");
  const image = makeImage(join(dir, "disk.img"), MiB);
  const nbd = join(dir, "nbd.sock");
  const q = join(dir, "q.sock");
  const target = join(dir, "journal.jnl");
  const serverAndMonitor = [
    "--nbd-server",
    `addr.type=unix,addr.path=${nbd}`,
    "--chardev",
    `socket,id=m,path=${q},server=on,wait=off`,
    "--monitor",
    "m",
  ];
  const cases: Array<[string[], string]> = [
    [[...serverAndMonitor, "--bogus"], "drivetap storage-daemon: unrecognized option '--bogus'"],
    [[...serverAndMonitor, "extra"], "drivetap storage-daemon: extra: Unexpected argument"],
    [
      [...serverAndMonitor, "--blockdev"],
      "drivetap storage-daemon: option '--blockdev' requires an argument",
    ],
    [
      [
        ...serverAndMonitor,
        "--blockdev",
        `driver=journal,node-name=j,filename=${target}`,
        "--blockdev",
        "driver=file,x",
      ],
      "drivetap storage-daemon: --blockdev driver=file,x: Expected '=' after parameter 'x'",
    ],
    [
      [
        ...serverAndMonitor,
        "--blockdev",
        `driver=journal,node-name=j,filename=${target}`,
        "--blockdev",
        "driver=qcow9,node-name=n",
      ],
      "drivetap storage-daemon: --blockdev driver=qcow9,node-name=n: Parameter 'driver' does not accept value 'qcow9'",
    ],
    [
      [
        ...serverAndMonitor,
        "--blockdev",
        `driver=raw,node-name=r,file.driver=file,file.filename=${image},read-only=maybe`,
      ],
      `drivetap storage-daemon: --blockdev driver=raw,node-name=r,file.driver=file,file.filename=${image},read-only=maybe: Parameter 'read-only' expects 'on' or 'off'`,
    ],
    [
      [...serverAndMonitor, "--export", "type=nbd,id=e0,node-name=x,bogus=1"],
      "drivetap storage-daemon: --export type=nbd,id=e0,node-name=x,bogus=1: Parameter 'bogus' is unexpected",
    ],
    [
      [...serverAndMonitor, "--monitor", "chardev=nope"],
      'drivetap storage-daemon: --monitor chardev=nope: chardev "nope" not found',
    ],
    [
      [
        ...serverAndMonitor,
        "--object",
        "authz-list,id=a,rules.0.match=x,rules.0.policy=allow,rules.2.match=y",
      ],
      "drivetap storage-daemon: --object authz-list,id=a,rules.0.match=x,rules.0.policy=allow,rules.2.match=y: Parameter 'rules.1' missing",
    ],
  ];
  const before = readdirSync(dir).sort();
  for (const [args, message] of cases) {
    const r = await run(process.execPath, [
      CLI,
      "storage-daemon",
      "--pidfile",
      join(dir, "pid"),
      "--daemonize",
      ...args,
    ]);
    assert.equal(r.code, 1, `${args.join(" ")}: exit 1\n${r.stderr}`);
    assert.equal(r.stderr.trim(), message);
    assert.deepEqual(
      readdirSync(dir).sort(),
      before,
      `${args.at(-1)}: no socket, pid file or target created`,
    );
  }
  // A failure while running the options (after the checks) closes what earlier options opened.
  const r = await run(process.execPath, [
    CLI,
    "storage-daemon",
    ...serverAndMonitor,
    "--blockdev",
    `driver=file,node-name=f,filename=${join(dir, "missing.img")}`,
  ]);
  assert.equal(r.code, 1);
  assert.match(
    r.stderr,
    /--blockdev driver=file,node-name=f,filename=\S+missing\.img: Could not open '\S+missing\.img': No such file or directory/,
  );
  assert.deepEqual(
    readdirSync(dir).sort(),
    before,
    "the NBD and QMP sockets opened before the failure are gone",
  );

  const help = await runOk(process.execPath, [CLI, "storage-daemon", "-h"]);
  assert.match(help.stdout, /--nbd-server addr\.type=unix/);
  const version = await runOk(process.execPath, [CLI, "storage-daemon", "-V"]);
  assert.match(version.stdout, /^drivetap storage-daemon \d+\.\d+\.\d+/);
});

test("nbd-server-start/-stop/-add/-remove: QEMU's arguments and errors, BLOCK_EXPORT_DELETED on every path", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: MiB });
  const q = d.qmp;
  const other = await connectQmp(t, d.qmpPath);
  const sock = join(d.dir, "second.sock");
  const addr = { type: "unix", data: { path: sock } };
  await assertQmpError(q.execute("nbd-server-start", { addr }), "GenericError", "NBD server already running");
  await q.execute("nbd-server-stop");
  await q.waitForEvent(exportDeleted("export0"));
  await other.waitForEvent(exportDeleted("export0"));
  await assertQmpError(q.execute("nbd-server-stop"), "GenericError", "NBD server not running");
  await assertQmpError(
    q.execute("nbd-server-add", { device: "disk0" }),
    "GenericError",
    "NBD server not running",
  );
  await assertQmpError(
    q.execute("block-export-add", { type: "nbd", id: "e", "node-name": "disk0" }),
    "GenericError",
    "NBD server not running",
  );
  await assertQmpError(
    q.execute("nbd-server-start", { addr: { type: "unix", path: sock } }),
    "GenericError",
    "Parameter 'addr.data' is missing",
  );
  await assertQmpError(
    q.execute("nbd-server-start", { addr: { type: "inet", data: { host: "127.0.0.1", port: 10809 } } }),
    "GenericError",
    "Invalid parameter type for 'addr.data.port', expected: string",
  );
  await assertQmpError(
    q.execute("nbd-server-start", { addr, "max-connections": -1 }),
    "GenericError",
    /max-connections/,
  );
  await assertQmpError(
    q.execute("nbd-server-start", { addr, "tls-creds": "nope" }),
    "GenericError",
    "No TLS credentials with id 'nope'",
  );
  assert.equal(existsSync(sock), false, "no failed start left a socket");

  await q.execute("nbd-server-start", { addr, "max-connections": 2 });
  await q.execute("nbd-server-add", { device: "disk0" });
  await assertQmpError(
    q.execute("nbd-server-add", { device: "disk0" }),
    "GenericError",
    "Block export id 'disk0' is already in use",
  );
  await assertQmpError(
    q.execute("nbd-server-add", { device: "nope" }),
    "GenericError",
    "Cannot find device='nope' nor node-name='nope'",
  );
  await q.execute("nbd-server-add", { device: "disk0", name: "rw", writable: true, description: "second" });
  const listed = await runOk("nbdinfo", ["--list", "--json", unixUri(sock)]);
  assert.deepEqual(
    (JSON.parse(listed.stdout) as { exports: Array<{ "export-name": string }> }).exports
      .map((e) => e["export-name"])
      .sort(),
    ["disk0", "rw"],
  );
  await assertQmpError(
    q.execute("nbd-server-remove", { name: "nope" }),
    "GenericError",
    "Export 'nope' is not found",
  );

  // safe refuses while a client is connected; hard closes it, and the export shuts down first.
  const { client } = await openExport(sock, { name: "rw" });
  await assertQmpError(
    q.execute("nbd-server-remove", { name: "rw" }),
    "GenericError",
    /^export 'rw' still in use/,
  );
  await assertQmpError(
    q.execute("block-export-del", { id: "rw" }),
    "GenericError",
    /^export 'rw' still in use/,
  );
  await q.execute("nbd-server-remove", { name: "rw", mode: "hard" });
  await client.whenClosed();
  await other.waitForEvent(exportDeleted("rw"));
  assert.deepEqual((await q.execute("query-block-exports")) as unknown[], [
    { type: "nbd", id: "disk0", "node-name": "disk0", "shutting-down": false },
  ]);

  // max-connections: the third connection is refused.
  const c1 = await openExport(sock, { name: "disk0" });
  const c2 = await openExport(sock, { name: "disk0" });
  const r = await run("nbdinfo", [unixUri(sock, "disk0")]);
  assert.notEqual(r.code, 0, "a connection past max-connections is refused");
  await d.daemon.waitForStderr(/max-connections reached/);
  await c1.client.disconnect();
  await c2.client.disconnect();

  await q.execute("block-export-add", { type: "nbd", id: "e2", "node-name": "disk0", name: "e2" });
  await q.execute("block-export-del", { id: "e2" });
  await other.waitForEvent(exportDeleted("e2"));
  // nbd-server-stop removes what is left; shutdown (SIGTERM) after a new start sends the rest.
  await q.execute("nbd-server-stop");
  await other.waitForEvent(exportDeleted("disk0"));
  await q.execute("nbd-server-start", { addr });
  await q.execute("nbd-server-add", { device: "disk0", name: "last" });
  const exited = d.daemon.stop("SIGTERM");
  await other.waitForEvent(exportDeleted("last"));
  assert.equal(await exited, 0);
});

test("authz-simple and authz-list gate the NBD server's TLS peers; objects in use cannot be deleted", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: MiB });
  const q = d.qmp;
  const keys = join(d.dir, "psk");
  mkdirSync(keys);
  const aliceKey = makePskFile(join(d.dir, "alice.psk"), "alice");
  const bobFile = join(d.dir, "bob.psk");
  const bobKey = makePskFile(bobFile, "bob");
  writeFileSync(join(keys, "keys.psk"), `alice:${aliceKey}\nbob:${bobKey}\n`);
  const aliceFile = join(d.dir, "alice.psk");

  await q.execute("object-add", { "qom-type": "tls-creds-psk", id: "tls0", dir: keys, endpoint: "server" });
  await q.execute("object-add", {
    "qom-type": "tls-creds-psk",
    id: "client0",
    dir: keys,
    endpoint: "client",
    username: "alice",
  });
  await assertQmpError(
    q.execute("object-add", { "qom-type": "authz-simple", id: "a1" }),
    "GenericError",
    "Parameter 'identity' is missing",
  );
  await assertQmpError(
    q.execute("object-add", { "qom-type": "authz-list", id: "a2", rules: [{ match: "x" }] }),
    "GenericError",
    "Parameter 'rules[0].policy' is missing",
  );
  await q.execute("object-add", { "qom-type": "authz-simple", id: "only-alice", identity: "alice" });
  await q.execute("object-add", {
    "qom-type": "authz-list",
    id: "b-names",
    policy: "deny",
    rules: [{ match: "b*", policy: "allow", format: "glob" }],
  });

  await q.execute("nbd-server-stop");
  const sock = join(d.dir, "tls.sock");
  const addr = { type: "unix", data: { path: sock } };
  await assertQmpError(
    q.execute("nbd-server-start", { addr, "tls-creds": "client0" }),
    "GenericError",
    "Expected TLS credentials for a server endpoint",
  );
  await assertQmpError(
    q.execute("nbd-server-start", { addr, "tls-creds": "tls0", "tls-authz": "nope" }),
    "GenericError",
    "Cannot find QAuthZ object 'nope'",
  );
  const uri = (who: string, file: string): string =>
    `nbds+unix://${who}@/disk0?socket=${sock}&tls-psk-file=${file}`;

  for (const [authz, allowed, refused] of [
    ["only-alice", ["alice", aliceFile], ["bob", bobFile]],
    ["b-names", ["bob", bobFile], ["alice", aliceFile]],
  ] as const) {
    await q.execute("nbd-server-start", { addr, "tls-creds": "tls0", "tls-authz": authz });
    await q.execute("nbd-server-add", { device: "disk0" });
    await assertQmpError(
      q.execute("object-del", { id: authz }),
      "GenericError",
      new RegExp(`^object '${authz}' is in use, can not be deleted: used by the NBD server`),
    );
    await assertQmpError(
      q.execute("object-del", { id: "tls0" }),
      "GenericError",
      /is in use, can not be deleted/,
    );
    await runOk("nbdinfo", [uri(allowed[0], allowed[1])]);
    const r = await run("nbdinfo", [uri(refused[0], refused[1])]);
    assert.notEqual(r.code, 0, `${refused[0]} is refused by ${authz}`);
    await d.daemon.waitForStderr(new RegExp(`PSK identity '${refused[0]}' is not in `));
    // Plaintext is refused: credentials make TLS required, as in QEMU.
    assert.notEqual((await run("nbdinfo", [unixUri(sock, "disk0")])).code, 0);
    await q.execute("nbd-server-stop");
  }
  // Stopped: nothing holds the objects any more.
  await q.execute("object-del", { id: "only-alice" });
  await q.execute("object-del", { id: "b-names" });
  await q.execute("object-del", { id: "tls0" });
});

test("the README's qemu-storage-daemon example, pasted into a shell, backs up an equal copy and stops", async (t) => {
  const script = readmeSection("## Coming from qemu-storage-daemon");
  assert.ok(script.includes("npx drivetap storage-daemon"));
  const { dir, out, r } = await pasteIntoShell(t, script);
  assert.equal(r.code, 0, `the pasted example\n${out}\n${r.stderr}`);
  assert.match(out, /Images are identical\./);
  await assertNothingLeft(dir);
  assert.equal(existsSync(join(dir, "qsd.pid")), false, "quit removed the pid file");
});
