/**
 * The live write feed: `drivetap tap` prints exactly the writes, zeroes, discards and flushes qemu-io
 * sends (offsets, lengths, kinds, FUA), --range filters them, and the tap is removed when it ends. A
 * reader that never reads does not block the disk: fio's writes all complete while the daemon holds at
 * most the reader's ring and one socket buffer for it, drops and counts the rest, and reports the count
 * exactly where the gap is once the reader catches up; a reader that keeps up meanwhile misses nothing.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import * as net from "node:net";
import { join } from "node:path";
import { SINK_BUFFER_BYTES_MAX } from "../../src/io/write-tap.js";
import { CLI } from "../helpers/daemon.js";
import { assertExit, MiB, pollUntil, qemuIo, serveWithQmp, type QmpDaemon } from "../helpers/jobs.js";
import { start, type RunResult } from "../helpers/run.js";

interface TapQuery {
  "node-name": string;
  path: string;
  records: number;
  readers: { sent: number; queued: number; dropped: number; "buffered-bytes": number }[];
}

async function taps(d: QmpDaemon): Promise<TapQuery[]> {
  return (await d.qmp.execute("query-x-taps")) as TapQuery[];
}

function parseLines(text: string): Record<string, unknown>[] {
  return text
    .split("\n")
    .filter((l) => l.length > 0)
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

test("tap: prints each request as it happens, with exact offsets, lengths, kinds and FUA; --range filters", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 16 * MiB });
  const tapArgs = [CLI, "tap", "--socket", d.qmpPath];
  const all = start(process.execPath, tapArgs);
  const ranged = start(process.execPath, [...tapArgs, "--range", "64K:4K"]);
  t.after(() => {
    for (const p of [all, ranged])
      if (p.proc.exitCode === null && p.proc.signalCode === null) p.proc.kill("SIGKILL");
  });
  await pollUntil("both taps to have their reader connected", async () => {
    const q = await taps(d);
    return q.length === 2 && q.every((x) => x.readers.length === 1 && x["node-name"] === "disk0");
  });

  assertExit(
    "qemu-io",
    await qemuIo(d.uri, [
      "write -P 0x11 4096 8192",
      "write -z 65536 4096",
      "discard 131072 65536",
      "write -f -P 0x22 0 512",
      "write -P 0x33 61440 8192",
      "flush",
    ]),
  );
  await all.waitForStdout(/"kind":"flush"/);
  await ranged.waitForStdout(/"kind":"flush"/);
  all.proc.kill("SIGTERM");
  ranged.proc.kill("SIGTERM");
  const [ar, rr]: RunResult[] = await Promise.all([all.result, ranged.result]);
  assert.equal(ar.code, 0, ar.stderr);
  assert.equal(rr.code, 0, rr.stderr);
  assert.deepEqual(await taps(d), [], "the taps were removed when their readers ended");

  const records = parseLines(ar.stdout);
  assert.deepEqual(
    records.map((r) => r.seq),
    records.map((_, i) => i),
    "seq runs 0..n-1: nothing dropped",
  );
  for (const r of records) assert.ok(!Number.isNaN(Date.parse(String(r.time))), "time is ISO 8601");
  const shape = (r: Record<string, unknown>): unknown => ({
    kind: r.kind,
    offset: r.offset,
    length: r.length,
    fua: r.fua,
  });
  const changes = records.filter((r) => r.kind !== "flush").map(shape);
  assert.deepEqual(changes, [
    { kind: "write", offset: 4096, length: 8192, fua: false },
    { kind: "zero", offset: 65536, length: 4096, fua: false },
    { kind: "discard", offset: 131072, length: 65536, fua: false },
    { kind: "write", offset: 0, length: 512, fua: true },
    { kind: "write", offset: 61440, length: 8192, fua: false },
  ]);
  const lastChange = records.map((r) => r.kind).lastIndexOf("write");
  assert.ok(
    records.slice(lastChange + 1).some((r) => r.kind === "flush"),
    "the flush after the last write is reported",
  );

  // --range 64K:4K: the zero at 64K and the write over 60K..68K, plus flushes.
  const inRange = parseLines(rr.stdout);
  assert.deepEqual(inRange.filter((r) => r.kind !== "flush").map(shape), [
    { kind: "zero", offset: 65536, length: 4096, fua: false },
    { kind: "write", offset: 61440, length: 8192, fua: false },
  ]);
  assert.ok(inRange.some((r) => r.kind === "flush"));
});

test("tap: a reader that never reads neither blocks nor bloats the daemon; drops are counted where they happen", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 64 * MiB });
  const RING = 64;
  const stalledPath = join(d.dir, "stalled.sock");
  const fastPath = join(d.dir, "fast.sock");
  await d.qmp.execute("x-tap-add", { "node-name": "disk0", path: stalledPath, "ring-records": RING });
  await d.qmp.execute("x-tap-add", { "node-name": "disk0", path: fastPath, "ring-records": 65536 });

  const connect = (path: string): Promise<net.Socket> =>
    new Promise((resolve, reject) => {
      const s = net.connect(path, () => resolve(s));
      s.once("error", reject);
      t.after(() => void s.destroy());
    });
  const stalled = await connect(stalledPath);
  stalled.pause(); // never reads until told to
  const fast = await connect(fastPath);
  let fastText = "";
  fast.setEncoding("utf8").on("data", (s: string) => (fastText += s));
  await pollUntil("both readers connected", async () => (await taps(d)).every((x) => x.readers.length === 1));

  const IO_BYTES = 32 * MiB;
  const fio = await start(
    "fio",
    [
      "--name=tap",
      "--ioengine=nbd",
      `--uri=${d.uri}`,
      "--rw=randwrite",
      "--bs=4k",
      "--iodepth=32",
      "--size=64M",
      `--io_size=${IO_BYTES}`,
      "--norandommap",
      "--randseed=1",
      "--output-format=terse",
    ],
    { timeoutMs: 120_000 },
  ).result;
  assertExit("fio", fio);

  const afterFio = await taps(d);
  const stalledTap = afterFio.find((x) => x.path === stalledPath)!;
  const fastTap = afterFio.find((x) => x.path === fastPath)!;
  const total = stalledTap.records;
  assert.ok(total >= IO_BYTES / 4096, `every fio write was reported (${total})`);
  const r = stalledTap.readers[0];
  assert.ok(r.queued <= RING, `the stalled reader's ring is bounded: ${r.queued} <= ${RING}`);
  assert.ok(
    r["buffered-bytes"] <= SINK_BUFFER_BYTES_MAX + 1024,
    `the stalled reader's socket buffer is bounded: ${r["buffered-bytes"]}`,
  );
  assert.ok(r.dropped > 0, "records were dropped for the stalled reader");
  assert.equal(r.sent + r.queued + r.dropped, total, "every record was sent, queued or counted as dropped");
  assert.equal(fastTap.readers[0].dropped, 0, "the reader that keeps up lost nothing");

  // The stalled reader catches up: records, then {"dropped":N} where the gap is; seq and counts agree.
  let stalledText = "";
  const accounted = (): number =>
    parseLines(stalledText.slice(0, stalledText.lastIndexOf("\n") + 1)).reduce(
      (n, l) => n + (typeof l.dropped === "number" ? l.dropped : 1),
      0,
    );
  stalled.setEncoding("utf8").on("data", (s: string) => (stalledText += s));
  stalled.resume();
  await pollUntil("the stalled reader to account for every record", async () => accounted() === total);
  let expect = 0;
  let droppedLines = 0;
  for (const l of parseLines(stalledText)) {
    if (typeof l.dropped === "number") {
      droppedLines++;
      expect += l.dropped;
    } else {
      assert.equal(l.seq, expect, "a record follows its predecessor or the dropped count before it");
      expect++;
    }
  }
  assert.equal(expect, total);
  assert.ok(droppedLines >= 1, "the drop was reported");

  await pollUntil(
    "the fast reader to see every record",
    async () => parseLines(fastText.slice(0, fastText.lastIndexOf("\n") + 1)).length === total,
  );
  assert.deepEqual(
    parseLines(fastText).map((l) => l.seq),
    Array.from({ length: total }, (_, i) => i),
  );

  await d.qmp.execute("x-tap-remove", { path: stalledPath });
  await d.qmp.execute("x-tap-remove", { path: fastPath });
  assert.deepEqual(await taps(d), []);
});
