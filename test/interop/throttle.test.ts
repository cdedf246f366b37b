/**
 * Throttle groups and the throttle filter through the real daemon: fio over NBD on a throttled node
 * measures a rate inside a band around the limit (the child is null-co, which takes GB/s unthrottled,
 * so a throttle that does nothing fails the upper bound and one that holds back too much the lower),
 * two nodes of one group share its limit, and a group in use cannot be deleted. object-add's checks,
 * qom-get/qom-set of `limits`, blockdev-add of throttle nodes and `secret` objects are compared
 * reply by reply with the real qemu-storage-daemon 7.2.
 */
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test, type TestContext } from "node:test";
import { unixUri } from "../helpers/daemon.js";
import { assertQmpError, MiB, serveWithQmp, type QmpDaemon } from "../helpers/jobs.js";
import { outcome, startQsd } from "../helpers/qsd.js";
import { run } from "../helpers/run.js";
import { assertNothingLeft, pasteIntoShell, readmeSection } from "../helpers/readme.js";
import type { QmpClient } from "../../src/qmp/client.js";

const MEASURE_SECONDS = 4;
/** fio's `bw_bytes` over the run must land within this factor of the limit, either way. */
const BAND = 0.25;

interface FioSide {
  bw_bytes: number;
  iops: number;
  io_bytes: number;
}
interface FioJob {
  jobname: string;
  error: number;
  read: FioSide;
  write: FioSide;
}

/** One fio run with one job per URI, all at once, for MEASURE_SECONDS. */
async function fio(dir: string, uris: readonly string[], rw: string, bs: string): Promise<FioJob[]> {
  const out = join(dir, `fio-${uris.length}-${rw}.json`);
  const args = [
    "--ioengine=nbd",
    `--rw=${rw}`,
    `--bs=${bs}`,
    "--iodepth=8",
    "--size=64M",
    "--time_based=1",
    `--runtime=${MEASURE_SECONDS}`,
    "--output-format=json",
    `--output=${out}`,
    ...uris.flatMap((uri, i) => [`--name=job${i}`, `--uri=${uri}`]),
  ];
  const r = await run("fio", args, { timeoutMs: 60_000 });
  assert.equal(r.code, 0, `fio: ${r.stdout}\n${r.stderr}`);
  const jobs = (JSON.parse(readFileSync(out, "utf8")) as { jobs: FioJob[] }).jobs;
  for (const j of jobs) assert.equal(j.error, 0, `${j.jobname} failed`);
  return jobs;
}

function assertInBand(t: TestContext, what: string, measured: number, limit: number): void {
  t.diagnostic(`${what}: ${measured.toFixed(0)}/s against a limit of ${limit}/s`);
  assert.ok(
    measured >= limit * (1 - BAND) && measured <= limit * (1 + BAND),
    `${what}: measured ${measured.toFixed(0)}/s, limit ${limit}/s (band ±${BAND * 100}%)`,
  );
}

/** A throttle node over an inline null-co child, exported writable under its own name. */
async function throttledExport(d: QmpDaemon, node: string, group: string): Promise<string> {
  await d.qmp.execute("blockdev-add", {
    driver: "throttle",
    "node-name": node,
    "throttle-group": group,
    file: { driver: "null-co", size: 64 * MiB },
  });
  await d.qmp.execute("block-export-add", {
    type: "nbd",
    id: `e-${node}`,
    "node-name": node,
    name: node,
    writable: true,
  });
  return unixUri(d.daemon.socket, node);
}

test("bps-total=20 MiB/s: fio writes through NBD at 15-25 MiB/s; iops-total=400: 300-500 IOPS", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: MiB });
  await d.qmp.execute("object-add", {
    "qom-type": "throttle-group",
    id: "bw",
    limits: { "bps-total": 20 * MiB },
  });
  await d.qmp.execute("object-add", { "qom-type": "throttle-group", id: "ops", "x-iops-total": 400 });
  const bw = await throttledExport(d, "tbw", "bw");
  const ops = await throttledExport(d, "tops", "ops");

  const [w] = await fio(d.dir, [bw], "write", "256k");
  assertInBand(t, "seq write 256k", w.write.bw_bytes, 20 * MiB);
  const [r] = await fio(d.dir, [ops], "randread", "4k");
  assertInBand(t, "rand read 4k", r.read.iops, 400);
});

test("two nodes in one group share its limit, about half each", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: MiB });
  await d.qmp.execute("object-add", {
    "qom-type": "throttle-group",
    id: "shared",
    limits: { "bps-total": 20 * MiB },
  });
  const a = await throttledExport(d, "ta", "shared");
  const b = await throttledExport(d, "tb", "shared");
  const jobs = await fio(d.dir, [a, b], "write", "128k");
  const rates = jobs.map((j) => j.write.bw_bytes);
  assertInBand(t, "both together", rates[0] + rates[1], 20 * MiB);
  for (const [i, rate] of rates.entries()) {
    // Round-robin per request with equal request sizes: each gets half, give or take.
    assertInBand(t, `node ${i} alone`, rate, 10 * MiB);
  }
});

test("a group in use cannot be deleted; after blockdev-del it can; bad throttle nodes", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: MiB });
  const { qmp: qsd } = await startQsd(t);
  const both = async (command: string, args: Record<string, unknown>): Promise<unknown> => {
    const ours = await outcome(d.qmp, command, args);
    assert.deepEqual(ours, await outcome(qsd, command, args), `${command} ${JSON.stringify(args)}`);
    return ours;
  };
  await both("object-add", { "qom-type": "throttle-group", id: "g", limits: { "iops-total": 100 } });
  const node = { driver: "throttle", "throttle-group": "g", file: { driver: "null-co" } };
  await both("blockdev-add", { ...node, "node-name": "t0" });
  await both("blockdev-add", { ...node, "node-name": "t1", "throttle-group": "nope" });
  await both("blockdev-add", { driver: "throttle", "node-name": "t1", file: { driver: "null-co" } });
  await both("blockdev-add", { driver: "throttle", "node-name": "t1", "throttle-group": "g" });
  await both("blockdev-add", { ...node, "node-name": "t1", limits: {} });
  // QEMU says only that it is in use; drivetap names the user too.
  await assertQmpError(
    d.qmp.execute("object-del", { id: "g" }),
    "GenericError",
    "object 'g' is in use, can not be deleted: used by node t0",
  );
  await assertQmpError(
    qsd.execute("object-del", { id: "g" }),
    "GenericError",
    /^object 'g' is in use, can not be deleted/,
  );
  await both("blockdev-del", { "node-name": "t0" });
  await both("object-del", { id: "g" });
  await both("object-del", { id: "g" });
});

test("object-add of throttle-group: QEMU's checks and texts, reply by reply", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: MiB });
  const { qmp: qsd } = await startQsd(t);
  const cases: Array<Record<string, unknown>> = [
    { limits: { "bps-total": 1000 } },
    { limits: { "bps-total": 1000, "bps-read": 10 } },
    { limits: { "iops-total": 1000, "iops-write": 10 } },
    { limits: { "bps-total-max": 10, "bps-total": 100, "bps-read-max": 200 } },
    { limits: { "bps-total": 1000, "bps-total-max": 10 } },
    { limits: { "bps-total-max": 10 } },
    { limits: { "bps-total": -1 } },
    { limits: { "iops-read": 1_000_000_000_000_001 } },
    { limits: { "bps-total": 1_000_000_000_000_000 } },
    { limits: { "bps-total": 100, "bps-total-max": 200, "bps-total-max-length": 0 } },
    { limits: { "bps-total": 100, "bps-total-max-length": 5 } },
    { limits: { "bps-total": 1e15, "bps-total-max": 1e15, "bps-total-max-length": 2 } },
    { limits: { "bps-total": 1000, "bps-total-max": 2000, "bps-total-max-length": 1_000_000_000_000 } },
    { limits: { "bps-total": 100, "bps-total-max": 200, "bps-total-max-length": 60 } },
    { limits: { "iops-size": 4096 } },
    { limits: { "iops-total": 10, "iops-size": 4096 } },
    { limits: { foo: 1 } },
    { limits: { "bps-total": "x" } },
    { limits: { "bps-total": 1.5 } },
    { limits: 5 },
    { "x-bps-total": 5000 },
    { "x-bps-total": 5000, "x-bps-read": 3 },
    { "x-bps-total-max": 5000 },
    { "x-bps-total": -5 },
    { "x-iops-total": 5, "x-iops-total-max": 3 },
    { "x-bps-total": 2_000_000_000_000_000 },
    { "x-bps-total": "5" },
    { data: "abc" },
    {},
  ];
  for (const [i, extra] of cases.entries()) {
    const args = { "qom-type": "throttle-group", id: `g${i}`, ...extra };
    const ours = await outcome(d.qmp, "object-add", args);
    assert.deepEqual(ours, await outcome(qsd, "object-add", args), JSON.stringify(args));
  }
  const dup = { "qom-type": "throttle-group", id: "g0" };
  assert.deepEqual(await outcome(d.qmp, "object-add", dup), await outcome(qsd, "object-add", dup));
  const badId = { "qom-type": "throttle-group", id: "1bad" };
  assert.deepEqual(await outcome(d.qmp, "object-add", badId), await outcome(qsd, "object-add", badId));
});

test("qom-get and qom-set of a group's limits, and qom-list, as QEMU answers them", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: MiB });
  const { qmp: qsd } = await startQsd(t);
  const steps: Array<[string, Record<string, unknown>]> = [
    [
      "object-add",
      {
        "qom-type": "throttle-group",
        id: "g",
        "x-bps-total": 7,
        limits: { "bps-total": 1000, "iops-total": 3 },
      },
    ],
    ["qom-get", { path: "/objects/g", property: "limits" }],
    ["qom-get", { path: "g", property: "x-bps-total" }],
    ["qom-set", { path: "/objects/g", property: "limits", value: { "iops-total": 77 } }],
    ["qom-get", { path: "/objects/g", property: "limits" }],
    ["qom-set", { path: "/objects/g", property: "limits", value: { "iops-total": 77, "iops-read": 3 } }],
    ["qom-set", { path: "/objects/g", property: "limits", value: { "bps-total": -1 } }],
    ["qom-set", { path: "/objects/g", property: "limits", value: { nope: 1 } }],
    ["qom-set", { path: "/objects/g", property: "limits", value: 5 }],
    ["qom-set", { path: "/objects/g", property: "x-iops-total", value: 55 }],
    ["qom-set", { path: "/objects/g", property: "type", value: "x" }],
    ["qom-set", { path: "/objects/g", property: "nope", value: 1 }],
    ["qom-get", { path: "/objects/g", property: "limits" }],
    ["qom-get", { path: "/objects/g", property: "type" }],
    ["qom-get", { path: "/objects/g", property: "nope" }],
    ["qom-get", { path: "/objects/nope", property: "limits" }],
    ["qom-get", { path: "/objects", property: "type" }],
  ];
  for (const [command, args] of steps) {
    assert.deepEqual(
      await outcome(d.qmp, command, args),
      await outcome(qsd, command, args),
      `${command} ${JSON.stringify(args)}`,
    );
  }
  const names = async (q: QmpClient, path: string): Promise<string[]> =>
    ((await q.execute("qom-list", { path })) as Array<{ name: string; type: string }>)
      .map((p) => `${p.name}:${p.type}`)
      .sort();
  assert.deepEqual(await names(d.qmp, "/objects/g"), await names(qsd, "/objects/g"));
  assert.ok((await names(d.qmp, "/objects")).includes("g:child<throttle-group>"));
});

test("new limits apply to a node at once: qom-set from 4 MiB/s to 40 MiB/s", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: MiB });
  await d.qmp.execute("object-add", {
    "qom-type": "throttle-group",
    id: "g",
    limits: { "bps-total": 4 * MiB },
  });
  const uri = await throttledExport(d, "t", "g");
  await d.qmp.execute("qom-set", {
    path: "/objects/g",
    property: "limits",
    value: { "bps-total": 40 * MiB },
  });
  const [w] = await fio(d.dir, [uri], "write", "256k");
  assertInBand(t, "after qom-set", w.write.bw_bytes, 40 * MiB);
});

test("secret objects: data or file, raw or base64, QEMU's refusals; keyid is refused (no master key)", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: MiB });
  const { qmp: qsd } = await startQsd(t);
  const file = join(d.dir, "secret.txt");
  writeFileSync(file, "c2VjcmV0Cg==");
  const key = join(d.dir, "key");
  writeFileSync(key, Buffer.alloc(32, 7));
  const cases: Array<Record<string, unknown>> = [
    { data: "abc" },
    { data: "YWJj", format: "base64" },
    { data: "!!!", format: "base64" },
    { data: "YW Jj", format: "base64" },
    { data: "YWJj\n", format: "base64" },
    { data: "abc", iv: "AAAAAAAAAAAAAAAAAAAAAA==" },
    { file, format: "base64" },
    { file, data: "x" },
    {},
    { data: "abc", format: "hex" },
    { data: "abc", loaded: true },
    { data: "abc", bogus: 1 },
    { data: "abc", keyid: "s0" },
    { data: "abc", keyid: "nokey" },
    { file: key },
    { data: "abc", keyid: "s14" },
    { limits: {} },
  ];
  for (const [i, extra] of cases.entries()) {
    const args = { "qom-type": "secret", id: `s${i}`, ...extra };
    assert.deepEqual(
      await outcome(d.qmp, "object-add", args),
      await outcome(qsd, "object-add", args),
      JSON.stringify(args),
    );
  }
  for (const [id, property] of [
    ["s0", "data"],
    ["s0", "format"],
    ["s1", "format"],
    ["s6", "file"],
    ["s4", "loaded"],
    ["s0", "keyid"],
  ]) {
    const args = { path: `/objects/${id}`, property };
    assert.deepEqual(
      await outcome(d.qmp, "qom-get", args),
      await outcome(qsd, "qom-get", args),
      JSON.stringify(args),
    );
  }
  // QEMU would decrypt with the 32-byte key in secret s14; drivetap has no master key and says so.
  await assertQmpError(
    d.qmp.execute("object-add", {
      "qom-type": "secret",
      id: "enc",
      data: "abc",
      keyid: "s14",
      iv: "AAAAAAAAAAAAAAAAAAAAAA==",
    }),
    "GenericError",
    /drivetap has no master key to decrypt secrets with \('keyid' 's14'\)/,
  );
  await assertQmpError(
    d.qmp.execute("object-add", { "qom-type": "secret", id: "missing", file: join(d.dir, "nope") }),
    "GenericError",
    /^Unable to read .*nope: .*no such file or directory/i,
  );
  await assertQmpError(
    d.qmp.execute("object-add", { "qom-type": "secret", id: "dir", file: d.dir }),
    "GenericError",
    `Unable to read ${d.dir}: Is a directory`,
  );
  const big = join(d.dir, "big");
  writeFileSync(big, Buffer.alloc(65 * 1024));
  await assertQmpError(
    d.qmp.execute("object-add", { "qom-type": "secret", id: "big", file: big }),
    "GenericError",
    /a secret is at most 65536 bytes/,
  );
  for (const q of [d.qmp, qsd]) {
    await q.execute("object-del", { id: "s0" });
    await assertQmpError(q.execute("object-del", { id: "s0" }), "GenericError", "object 's0' not found");
  }
});

test("README: the throttling example runs as pasted and the bench takes about 3 s", async (t) => {
  const { dir, out, r } = await pasteIntoShell(t, readmeSection("## Throttling I/O (throttle groups)"));
  assert.equal(r.code, 0, `${out}\n${r.stderr}`);
  const m = /Run completed in (\d+(?:\.\d+)?) seconds/.exec(out);
  assert.ok(m, out);
  // 30 MiB at 10 MiB/s, less the 1 MiB bucket: 2.9 s. Unthrottled it takes a few ms.
  const seconds = Number(m[1]);
  t.diagnostic(`qemu-img bench: ${seconds} s`);
  assert.ok(seconds >= 2.2 && seconds <= 3.6, `bench took ${seconds} s`);
  assert.match(out, /"bps-total": 0/);
  await assertNothingLeft(dir);
});
