/**
 * journal crashcheck against a real filesystem: a zeroed disk is served with QMP, a sync=stream job
 * journals it, and through the export (nbdfuse exposes it as a file, which is loop-mounted) mkfs.ext4
 * makes a filesystem (before the journal starts: mid-mkfs states are not meant to be consistent), then,
 * journalled, it is mounted and files and directories are written, synced, removed and unmounted. Every flush point of
 * that journal, replayed onto the disk as it was at the start, must pass e2fsck; a failing checker makes
 * crashcheck fail; --max-points bounds the work; the base image is never changed.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { copyFileSync, existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { CLI } from "../helpers/daemon.js";
import { jobEvent, MiB, pollUntil, readFile, serveWithQmp } from "../helpers/jobs.js";
import { run, runOk, start, type RunResult } from "../helpers/run.js";

const DISK = 64 * MiB;
const POINT_LINE = /^\s*(\d+)\s+(\S+)\s+exit\s+(\S+)\s+(PASS|FAIL)\b/;

function crashcheck(journal: string, base: string, fsck: string, extra: string[] = []): Promise<RunResult> {
  return run(process.execPath, [CLI, "journal", "crashcheck", journal, base, "--fsck", fsck, ...extra], {
    timeoutMs: 300_000,
  });
}

function points(r: RunResult): { seq: number; pass: boolean; exit: string }[] {
  return r.stdout
    .split("\n")
    .map((l) => POINT_LINE.exec(l))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => ({ seq: Number(m[1]), exit: m[3], pass: m[4] === "PASS" }));
}

test("journal crashcheck: ext4 made and filled through the export passes e2fsck at every flush point", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: DISK });
  const base = join(d.dir, "base.img");
  const work = mkdtempSync(join(tmpdir(), "drivetap-crashcheck-test-"));
  const fuseDir = join(work, "fuse");
  const mnt = join(work, "mnt");
  mkdirSync(fuseDir);
  mkdirSync(mnt);
  let nbdfuse: ReturnType<typeof start> | null = null;
  t.after(async () => {
    // Unmount before anything removes the directories, even when the test failed half-way.
    await run("umount", ["-l", mnt]).catch(() => undefined);
    await run("umount", ["-l", fuseDir]).catch(() => undefined);
    if (nbdfuse && nbdfuse.proc.exitCode === null && nbdfuse.proc.signalCode === null) {
      nbdfuse.proc.kill("SIGKILL");
      await nbdfuse.result.catch(() => undefined);
    }
    rmSync(work, { recursive: true, force: true });
  });

  nbdfuse = start("nbdfuse", [fuseDir, d.uri], { timeoutMs: 300_000 });
  const dev = join(fuseDir, "nbd");
  await pollUntil("nbdfuse to expose the export", async () => {
    if (nbdfuse!.proc.exitCode !== null) assert.fail(`nbdfuse exited: ${nbdfuse!.stderr()}`);
    return existsSync(dev);
  });

  await runOk("mkfs.ext4", ["-F", "-q", dev]);
  // A crash during mkfs leaves no filesystem to check: the journal starts on the finished one. mkfs
  // ended with a flush and nothing writes now, so the image file is the disk as the journal starts.
  copyFileSync(d.image, base);
  const journal = join(d.dir, "disk.journal");
  await d.qmp.execute("blockdev-add", {
    driver: "journal",
    "node-name": "j",
    filename: journal,
    data: true,
    size: DISK,
  });
  await d.qmp.execute("blockdev-backup", { "job-id": "s", device: "disk0", target: "j", sync: "stream" });

  await runOk("mount", ["-o", "loop", dev, mnt]);
  for (let i = 0; i < 4; i++) {
    const sub = join(mnt, `dir${i}`, "nested");
    mkdirSync(sub, { recursive: true });
    for (let f = 0; f < 8; f++) writeFileSync(join(sub, `file${f}`), Buffer.alloc(4096 * (1 + f * 7), i + f));
    writeFileSync(join(mnt, `dir${i}`, "big"), Buffer.alloc(2 * MiB, 0x40 + i));
    await runOk("sync", ["-f", mnt]);
  }
  rmSync(join(mnt, "dir1"), { recursive: true });
  await runOk("sync", ["-f", mnt]);
  await runOk("umount", [mnt]);
  await runOk("umount", [fuseDir]);
  const fuseEnd = await nbdfuse.result;
  assert.equal(fuseEnd.code, 0, `nbdfuse: ${fuseEnd.stderr}`);

  await d.qmp.execute("block-job-cancel", { device: "s" });
  const cancelled = await d.qmp.waitForEvent(jobEvent("s", "BLOCK_JOB_CANCELLED"));
  assert.equal(cancelled.data.error, undefined);
  const baseBefore = readFile(base);

  const ok = await crashcheck(journal, base, "e2fsck -fn {}");
  const all = points(ok);
  assert.equal(ok.code, 0, `crashcheck failed:\n${ok.stdout}\n${ok.stderr}`);
  assert.ok(all.length >= 3, `at least 3 flush points, got ${all.length}:\n${ok.stdout}`);
  assert.ok(
    all.every((p) => p.pass && p.exit === "0"),
    ok.stdout,
  );
  assert.match(
    ok.stdout,
    new RegExp(`^${all.length} flush points checked: ${all.length} passed, 0 failed$`, "m"),
  );
  // The last flush point is the unmounted filesystem: a full check finds the files.
  const final = join(work, "final.img");
  copyFileSync(base, final);
  await runOk(process.execPath, [CLI, "journal", "replay", journal, final]);
  const listing = await runOk("debugfs", ["-R", "ls -p /dir3/nested", final]);
  assert.match(listing.stdout, /file7/);
  const gone = await runOk("debugfs", ["-R", "ls -p /", final]);
  assert.doesNotMatch(gone.stdout, /dir1/);
  assert.match(gone.stdout, /dir0/);

  // A checker that fails makes crashcheck fail, at every point it ran on.
  const bad = await crashcheck(journal, base, "false {}");
  assert.equal(bad.code, 1);
  const badPoints = points(bad);
  assert.equal(badPoints.length, all.length);
  assert.ok(badPoints.every((p) => !p.pass));
  assert.match(bad.stdout, new RegExp(`: 0 passed, ${all.length} failed$`, "m"));

  // A checker that finds a real inconsistency: the state with its superblock's magic overwritten.
  const corrupt = await crashcheck(
    journal,
    base,
    "printf 'XX' | dd of={} bs=1 seek=1080 conv=notrunc status=none && e2fsck -fn {}",
    ["--max-points", "2"],
  );
  assert.equal(corrupt.code, 1, corrupt.stdout);
  const corruptPoints = points(corrupt);
  assert.equal(corruptPoints.length, 2, "--max-points bounds the points checked");
  assert.ok(
    corruptPoints.every((p) => !p.pass && p.exit !== "0"),
    corrupt.stdout,
  );

  assert.ok(readFile(base).equals(baseBefore), "crashcheck never changes IMAGE");
});
