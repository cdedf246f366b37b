/**
 * Choosing the file driver's I/O engine: `--io-engine` on `drivetap serve` and `drivetap
 * storage-daemon`, blockdev-add's `aio` (QEMU's option, compared with qemu-storage-daemon 7.2 where
 * QEMU refuses), the engine in the ready line, query-named-block-nodes (x-io-engine) and
 * x-query-io-engine; bad values end the command with a clear message.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { CLI, serveTempImage } from "../helpers/daemon.js";
import { assertExit, qemuIo } from "../helpers/jobs.js";
import { DRIVETAP_STORAGE_DAEMON, outcome, startQsd } from "../helpers/qsd.js";
import { run, start, tempDir } from "../helpers/run.js";

const MiB = 1024 * 1024;
/** No --io-engine: what a user gets (DRIVETAP_IO_ENGINE is not set in CI). */
const DRIVETAP_IO_ENGINE_UNSET: string[] = [];

test("drivetap serve --io-engine: each engine serves and says so in the ready lines; a bad value exits 1", async (t) => {
  for (const engine of ["threads", "sync", "io_uring"]) {
    const { daemon } = await serveTempImage(t, 8 * MiB, { args: ["--io-engine", engine] });
    assert.match(daemon.stdout(), new RegExp(`^drivetap: serving .*I/O engine ${engine}\\)$`, "m"));
    assertExit("qemu-io", await qemuIo(daemon.uri, ["write -P 0x3c 0 64k", "read -P 0x3c 0 64k", "flush"]));
  }
  // The default (auto) is the synchronous engine: the one measured faster here (ARCHITECTURE.md).
  const plain = await serveTempImage(t, 8 * MiB, { args: DRIVETAP_IO_ENGINE_UNSET });
  assert.match(plain.daemon.stdout(), /^drivetap: serving .*I\/O engine sync\)$/m);
  const dir = tempDir(t, "drivetap-io-engine-");
  const image = join(dir, "x.img");
  writeFileSync(image, Buffer.alloc(MiB));
  const bad = await run(process.execPath, [
    CLI,
    "serve",
    image,
    "--socket",
    join(dir, "s"),
    "--io-engine",
    "aio",
  ]);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /--io-engine.*expected one of auto, io_uring, sync, threads/);
});

test("storage-daemon --io-engine, blockdev-add aio: the node's engine in x-io-engine; aio=native without cache.direct refused as QEMU refuses it", async (t) => {
  const bad = await run(process.execPath, [CLI, "storage-daemon", "--io-engine", "fast"]);
  assert.equal(bad.code, 1);
  assert.match(bad.stderr, /Invalid io-engine 'fast': expected one of auto, io_uring, sync, threads/);

  const { qmp, dir } = await startQsd(t, ["--io-engine", "sync"], DRIVETAP_STORAGE_DAEMON);
  const image = join(dir, "d.img");
  writeFileSync(image, Buffer.alloc(MiB));
  const add = (name: string, extra: Record<string, unknown>) =>
    outcome(qmp, "blockdev-add", {
      driver: "file",
      "node-name": name,
      filename: image,
      "read-only": true,
      ...extra,
    });
  assert.deepEqual(await add("plain", {}), { return: {} });
  assert.deepEqual(await add("ring", { aio: "io_uring" }), { return: {} });
  assert.deepEqual(await add("pool", { aio: "threads" }), { return: {} });
  assert.deepEqual(await add("direct", { aio: "native", cache: { direct: true } }), { return: {} });
  const refused = await add("native", { aio: "native" });
  const engines = Object.fromEntries(
    ((await qmp.execute("query-named-block-nodes")) as { "node-name": string; "x-io-engine"?: string }[]).map(
      (n) => [n["node-name"], n["x-io-engine"]],
    ),
  );
  assert.deepEqual(engines, { plain: "sync", ring: "io_uring", pool: "sync", direct: "io_uring" });
  const info = (await qmp.execute("x-query-io-engine")) as Record<string, unknown>;
  assert.deepEqual(
    { engine: info.engine, "io-uring": info["io-uring"] },
    { engine: "sync", "io-uring": { submits: 0, sqes: 0, "in-flight": 0, fallbacks: 0, resubmits: 0 } },
  );

  // QEMU's answer to aio=native without cache.direct=on, word for word.
  const qsd = await startQsd(t);
  const want = await outcome(qsd.qmp, "blockdev-add", {
    driver: "file",
    "node-name": "native",
    filename: image,
    "read-only": true,
    aio: "native",
  });
  assert.deepEqual(refused, want);
  assert.deepEqual(refused, {
    error: {
      class: "GenericError",
      desc: "aio=native was specified, but it requires cache.direct=on, which was not specified.",
    },
  });
});

test("where io_uring cannot be used (here: no native addon), auto serves on sync and --io-engine io_uring says why it cannot", async (t) => {
  const dir = tempDir(t, "drivetap-io-engine-");
  const image = join(dir, "x.img");
  writeFileSync(image, Buffer.alloc(MiB));
  const env = { ...process.env, DRIVETAP_NO_NATIVE: "1" };
  const refused = await run(
    process.execPath,
    [CLI, "serve", image, "--socket", join(dir, "a"), "--io-engine", "io_uring"],
    { env },
  );
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /Unable to use io_uring: the native addon is not built/);
  const auto = start(
    process.execPath,
    [CLI, "serve", image, "--socket", join(dir, "b"), "--io-engine", "auto"],
    {
      env,
    },
  );
  t.after(() => auto.proc.kill("SIGKILL"));
  assert.match(await auto.waitForStdout(/^drivetap: serving /), /I\/O engine sync\)$/);
  auto.proc.kill("SIGTERM");
  assert.equal((await auto.result).code, 0);
});
