/**
 * nbdinfo (libnbd) against the daemon: what the handshake advertises (size, flags, block sizes, names,
 * descriptions), export listing, block status maps, read-only exports, TCP and the memory disk.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { serveTempImage, startDaemon, stopAfter, unixUri } from "../helpers/daemon.js";
import { run, runOk } from "../helpers/run.js";

const MiB = 1024 * 1024;

interface ExportInfo {
  "export-name": string;
  description?: string;
  "export-size": number;
  contexts?: string[];
  is_read_only: boolean;
  block_size_minimum: number;
  block_size_preferred: number;
  block_size_maximum: number;
  [key: string]: unknown;
}

interface MapEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

async function infoJson(
  uri: string,
): Promise<{ exports: ExportInfo[]; structured: boolean; protocol: string }> {
  const r = await runOk("nbdinfo", ["--json", uri]);
  return JSON.parse(r.stdout);
}

const CAN = ["flush", "fua", "trim", "zero", "cache", "multi-conn", "df", "fast-zero"] as const;

test("nbdinfo --json: size, can_* flags, block sizes 1/4096/32M, export name and description", async (t) => {
  const { daemon } = await serveTempImage(t, 48 * MiB, {
    args: ["--export-name", "vol1", "--description", "scratch volume"],
  });
  const info = await infoJson(daemon.uri);
  assert.equal(info.protocol, "newstyle-fixed");
  assert.equal(info.structured, true);
  assert.equal(info.exports.length, 1);
  const e = info.exports[0];
  assert.equal(e["export-name"], "vol1");
  assert.equal(e.description, "scratch volume");
  assert.equal(e["export-size"], 48 * MiB);
  assert.equal(e.is_read_only, false);
  for (const f of [
    "can_cache",
    "can_df",
    "can_fast_zero",
    "can_flush",
    "can_fua",
    "can_multi_conn",
    "can_trim",
    "can_zero",
  ]) {
    assert.equal(e[f], true, f);
  }
  assert.deepEqual([e.block_size_minimum, e.block_size_preferred, e.block_size_maximum], [1, 4096, 32 * MiB]);
  assert.deepEqual(e.contexts, ["base:allocation"]);
});

test("nbdinfo --can: every capability the server advertises answers yes; --is read-only answers no", async (t) => {
  const { daemon } = await serveTempImage(t, 8 * MiB);
  for (const what of [...CAN, "write"]) {
    const r = await run("nbdinfo", ["--can", what, daemon.uri]);
    assert.equal(r.code, 0, `--can ${what}: exit ${r.code} ${r.stderr}`);
  }
  const ro = await run("nbdinfo", ["--is", "read-only", daemon.uri]);
  assert.equal(ro.code, 2, `--is read-only on a writable export: ${ro.stderr}`);
});

test("nbdinfo on a --read-only export: --can write and trim say no, --is read-only says yes", async (t) => {
  const { daemon } = await serveTempImage(t, 8 * MiB, { args: ["--read-only"] });
  assert.match(daemon.stdout(), /read-only/);
  for (const what of ["write", "trim", "zero", "fast-zero"]) {
    const r = await run("nbdinfo", ["--can", what, daemon.uri]);
    assert.equal(r.code, 2, `--can ${what} on a read-only export: exit ${r.code} ${r.stderr}`);
  }
  for (const what of ["flush", "cache", "multi-conn"]) {
    const r = await run("nbdinfo", ["--can", what, daemon.uri]);
    assert.equal(r.code, 0, `--can ${what} on a read-only export: exit ${r.code} ${r.stderr}`);
  }
  const ro = await run("nbdinfo", ["--is", "read-only", daemon.uri]);
  assert.equal(ro.code, 0, `--is read-only: ${ro.stderr}`);
  const info = await infoJson(daemon.uri);
  assert.equal(info.exports[0].is_read_only, true);
});

test("nbdinfo --list shows the export and its description", async (t) => {
  const { daemon } = await serveTempImage(t, 8 * MiB, {
    args: ["--export-name", "listed", "--description", "one of one"],
  });
  const r = await runOk("nbdinfo", ["--list", "--json", `nbd+unix://?socket=${daemon.socket}`]);
  const info = JSON.parse(r.stdout) as { exports: ExportInfo[] };
  assert.deepEqual(
    info.exports.map((e) => [e["export-name"], e.description, e["export-size"]]),
    [["listed", "one of one", 8 * MiB]],
  );
});

test("nbdinfo --map: holes where nothing was written, data where it was", async (t) => {
  const { daemon } = await serveTempImage(t, 16 * MiB);
  await runOk("qemu-io", ["-f", "raw", daemon.uri, "-c", "write -P 1 1M 1M", "-c", "write -P 2 8M 2M"]);
  const r = await runOk("nbdinfo", ["--map", "--json", daemon.uri]);
  const map = JSON.parse(r.stdout) as MapEntry[];
  assert.deepEqual(
    map.map((m) => [m.offset, m.length, m.type]),
    [
      [0, 1 * MiB, 3],
      [1 * MiB, 1 * MiB, 0],
      [2 * MiB, 6 * MiB, 3],
      [8 * MiB, 2 * MiB, 0],
      [10 * MiB, 6 * MiB, 3],
    ],
  );
  assert.equal(map[0].description, "hole,zero");
  assert.equal(map[1].description, "data");
});

test("export names: the printed URI encodes the name; other names are refused", async (t) => {
  const { daemon } = await serveTempImage(t, 4 * MiB, { args: ["--export-name", "disk one"] });
  assert.equal(daemon.uri, unixUri(daemon.socket, "disk one"));
  assert.match(daemon.uri, /disk%20one/);
  const info = await infoJson(daemon.uri);
  assert.equal(info.exports[0]["export-name"], "disk one");

  for (const other of ["", "disk"]) {
    const r = await run("nbdinfo", ["--size", unixUri(daemon.socket, other)]);
    assert.notEqual(r.code, 0, `export "${other}" must not exist`);
    assert.equal(r.code, 1);
    assert.match(r.stderr, /server has no export named/);
  }
});

test("TCP: --port 0 --bind 127.0.0.1 prints the real port and serves on it", async (t) => {
  const daemon = await startDaemon({
    tcp: true,
    args: ["--port", "0", "--bind", "127.0.0.1", "--size", "32M"],
  });
  stopAfter(t, daemon);
  const m = /^nbd:\/\/127\.0\.0\.1:(\d+)\/$/.exec(daemon.uri);
  assert.ok(m, `TCP URI: ${daemon.uri}`);
  assert.ok(Number(m[1]) > 0, "a real port, not 0");
  const info = await infoJson(daemon.uri);
  assert.equal(info.exports[0]["export-size"], 32 * MiB);
  await runOk("qemu-io", [
    "-f",
    "raw",
    daemon.uri,
    "-c",
    "write -P 0x5a 1M 64k",
    "-c",
    "read -P 0x5a 1M 64k",
  ]);
  assert.equal(await daemon.stop(), 0);
});

test("the default memory disk (no IMAGE) with --size: size, description, sparse map, data round trip", async (t) => {
  const daemon = await startDaemon({ args: ["--size", "256M"] });
  stopAfter(t, daemon);
  assert.match(daemon.stdout(), /memory disk/);
  const info = await infoJson(daemon.uri);
  assert.equal(info.exports[0]["export-size"], 256 * MiB);
  assert.match(info.exports[0].description ?? "", /memory/);

  const empty = JSON.parse((await runOk("nbdinfo", ["--map", "--json", daemon.uri])).stdout) as MapEntry[];
  assert.deepEqual(
    empty.map((m) => [m.offset, m.length, m.type]),
    [[0, 256 * MiB, 3]],
  );
  await runOk("qemu-io", [
    "-f",
    "raw",
    daemon.uri,
    "-c",
    "write -P 0x77 128M 1M",
    "-c",
    "read -P 0x77 128M 1M",
  ]);
  const map = JSON.parse((await runOk("nbdinfo", ["--map", "--json", daemon.uri])).stdout) as MapEntry[];
  const data = map.filter((m) => (m.type & 1) === 0);
  assert.deepEqual(
    data.map((m) => [m.offset, m.length]),
    [[128 * MiB, MiB]],
  );
});
