/**
 * The journal CLI's stat, export and report on a journal recorded by the real daemon (a sync=stream
 * backup into a journal node, written through NBD by qemu-io, with marks over QMP, one of them named
 * to break out of HTML). stat agrees with show; the dm-log-writes export, read by an independent
 * reader (replay-log is not packaged in Debian), replays onto the starting image to the final disk;
 * and the report page renders in Debian's headless Chromium: exit 0, a real screenshot, no console
 * messages, and the page's own flag (<html data-report>) says every chart was drawn.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, readFileSync, statSync } from "node:fs";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";
import { CLI } from "../helpers/daemon.js";
import { applyDmLog, decodeDmLog } from "../helpers/dm-log-writes.js";
import {
  assertExit,
  jobEvent,
  MiB,
  prng,
  qemuIo,
  qemuIoPlan,
  readFile,
  serveWithQmp,
  testSeed,
} from "../helpers/jobs.js";
import { run, runOk, tempDir } from "../helpers/run.js";

const DISK = 32 * MiB;
const CHROMIUM = "/usr/bin/chromium";
const MARK_HOSTILE = "</script><b>m2&amp;";

/** Headless Chromium from Debian, kept off the network and out of the user's profile. */
function chromium(profile: string, args: readonly string[]): ReturnType<typeof run> {
  return run(
    CHROMIUM,
    [
      "--headless",
      "--no-sandbox", // tests run as root in CI
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
      `--user-data-dir=${profile}`,
      "--enable-logging=stderr",
      "--v=0",
      ...args,
    ],
    { timeoutMs: 90_000 },
  );
}

/** Console messages from the page (Chromium logs them as ":CONSOLE" lines with --enable-logging). */
function consoleLines(stderr: string): string[] {
  return stderr.split("\n").filter((l) => /:CONSOLE[:(]/.test(l));
}

test("journal stat, export and report on a journal recorded by the daemon; the report renders in Chromium", async (t) => {
  const seed = testSeed(t);
  const rnd = prng(seed);
  let start = "";
  const d = await serveWithQmp(t, {
    sizeBytes: DISK,
    prepare: (image) => copyFileSync(image, (start = join(dirname(image), "start.img"))),
  });
  const journal = join(d.dir, "disk.journal");
  await d.qmp.execute("blockdev-add", { driver: "journal", "node-name": "j", filename: journal, size: DISK });
  await d.qmp.execute("blockdev-backup", { "job-id": "s", device: "disk0", target: "j", sync: "stream" });
  assertExit(
    "qemu-io",
    await qemuIo(d.uri, [
      ...qemuIoPlan(rnd, { regionOffset: 0, regionBytes: 8 * MiB, count: 120, lengthMax: 256 * 1024 }),
      "write -P 0x5a -f 16777216 65536",
      "flush",
    ]),
  );
  await d.qmp.execute("journal-mark", { "node-name": "j", name: "m1" });
  assertExit(
    "qemu-io",
    await qemuIo(d.uri, qemuIoPlan(rnd, { regionOffset: 20 * MiB, regionBytes: 12 * MiB, count: 120 })),
  );
  await d.qmp.execute("journal-mark", { "node-name": "j", name: MARK_HOSTILE });
  await d.qmp.execute("block-job-cancel", { device: "s" });
  await d.qmp.waitForEvent(jobEvent("s", "BLOCK_JOB_CANCELLED"));
  const final = readFile(d.image);

  // stat --json agrees with show --json.
  const shown = (await runOk(process.execPath, [CLI, "journal", "show", "--json", journal])).stdout
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as { kind: string; length: number; name?: string });
  const st = JSON.parse(
    (await runOk(process.execPath, [CLI, "journal", "stat", "--json", journal])).stdout,
  ) as {
    entries: number;
    kinds: Record<string, number>;
    fua: number;
    bytes: { written: number };
    marks: { name: string }[];
    hotRegions: { top: { offset: number }[] };
  };
  assert.equal(st.entries, shown.length);
  for (const kind of ["write", "zero", "discard", "flush", "mark"])
    assert.equal(st.kinds[kind], shown.filter((e) => e.kind === kind).length, `${kind} count`);
  assert.equal(
    st.bytes.written,
    shown.filter((e) => e.kind === "write").reduce((n, e) => n + e.length, 0),
  );
  assert.deepEqual(
    st.marks.map((m) => m.name),
    ["m1", MARK_HOSTILE],
  );
  assert.ok(st.fua >= 1, "the FUA write is counted");
  assert.ok(st.hotRegions.top.length > 0 && st.hotRegions.top.length <= 10);
  const table = await runOk(process.execPath, [CLI, "journal", "stat", journal]);
  assert.match(table.stdout, /hottest 1 MiB regions by bytes written/);
  assert.match(table.stdout, new RegExp(`^\\s+${st.entries} entries: `, "m"));

  // export: qemu-io writes whole sectors, so all of it exports; replayed onto the start, it is the end.
  const log = join(d.dir, "disk.dmlog");
  const exported = await runOk(process.execPath, [
    CLI,
    "journal",
    "export",
    journal,
    "--format",
    "dm-log-writes",
    log,
  ]);
  assert.match(exported.stdout, /exported \d+ entries/);
  const decoded = decodeDmLog(readFileSync(log));
  const image = readFile(start);
  applyDmLog(decoded, image);
  assert.ok(image.equals(final), `the exported log replays to the final disk (seed ${seed})`);
  const badFormat = await run(process.execPath, [
    CLI,
    "journal",
    "export",
    journal,
    "--format",
    "qcow2",
    log,
  ]);
  assert.notEqual(badFormat.code, 0);
  assert.match(badFormat.stderr, /dm-log-writes/);

  // report: one self-contained file.
  const html = join(d.dir, "report.html");
  await runOk(process.execPath, [CLI, "journal", "report", journal, "-o", html]);
  const page = readFileSync(html, "utf8");
  assert.doesNotMatch(page, /https?:|<(link|img|iframe)\b|\bsrc=/i, "the page loads nothing from outside");
  assert.match(page, /<title>Journal report: disk\.journal<\/title>/);
  assert.equal(page.match(/<\/script>/g)?.length, 2, "a mark name cannot close the script element");

  const work = tempDir(t, "drivetap-chromium-");
  const png = join(work, "report.png");
  const url = pathToFileURL(html).href;
  const shot = await chromium(join(work, "profile-1"), [
    "--screenshot=" + png,
    "--window-size=1200,900",
    url,
  ]);
  assert.equal(shot.code, 0, `chromium --screenshot failed:\n${shot.stderr}`);
  assert.deepEqual(consoleLines(shot.stderr), [], "the page logs nothing");
  const pngBytes = readFileSync(png);
  assert.ok(pngBytes.subarray(0, 8).equals(Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a])));
  assert.deepEqual([pngBytes.readUInt32BE(16), pngBytes.readUInt32BE(20)], [1200, 900], "IHDR size");
  // A one-colour 1200x900 PNG deflates to a few KiB; the charts make it far larger.
  assert.ok(statSync(png).size > 20 * 1024, `screenshot is ${statSync(png).size} bytes`);

  const dom = await chromium(join(work, "profile-2"), ["--dump-dom", url]);
  assert.equal(dom.code, 0, `chromium --dump-dom failed:\n${dom.stderr}`);
  assert.deepEqual(consoleLines(dom.stderr), [], "the page logs nothing");
  assert.match(dom.stdout, /<html lang="en" data-report="ok">/, "the page drew every chart without an error");
});
