/**
 * qemu-img against the daemon: convert a reference file into the export, compare both ways, and read the
 * allocation map that qemu builds from base:allocation block status.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { randomBytes } from "node:crypto";
import { join } from "node:path";
import { NATIVE_ADDON, serveTempImage } from "../helpers/daemon.js";
import { run, runOk } from "../helpers/run.js";

const MiB = 1024 * 1024;

interface MapEntry {
  start: number;
  length: number;
  zero: boolean;
  data: boolean;
}

/** The map entries that cover [start, start+length), merged by (zero, data). */
function kindAt(map: readonly MapEntry[], offset: number): { zero: boolean; data: boolean } {
  const e = map.find((m) => m.start <= offset && offset < m.start + m.length);
  assert.ok(e, `map covers offset ${offset}`);
  return { zero: e.zero, data: e.data };
}

test("qemu-img convert into the export, then compare equal; one changed byte is found", async (t) => {
  const size = 32 * MiB;
  const { daemon, dir, image } = await serveTempImage(t, size);
  // Random data with a zero run in the middle, so convert's zero detection is exercised too.
  const ref = randomBytes(size);
  ref.fill(0, 8 * MiB, 12 * MiB);
  const refPath = join(dir, "ref.img");
  writeFileSync(refPath, ref);

  await runOk("qemu-img", ["convert", "-n", "-f", "raw", "-O", "raw", refPath, daemon.uri]);
  const same = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", refPath, daemon.uri]);
  assert.equal(same.code, 0, `compare: ${same.stdout} ${same.stderr}`);
  assert.match(same.stdout, /Images are identical/);
  assert.ok(readFileSync(image).equals(ref), "the image file holds exactly the reference");

  const changedAt = 5 * MiB + 123;
  await runOk("qemu-io", [
    "-f",
    "raw",
    daemon.uri,
    "-c",
    `write -P ${(ref[changedAt] ^ 0xff) & 0xff} ${changedAt} 1`,
  ]);
  const differ = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", refPath, daemon.uri]);
  assert.equal(differ.code, 1, `compare after a one-byte change: ${differ.stdout} ${differ.stderr}`);
  // qemu-img compare reports the 512-byte sector where the first difference is.
  const sector = Math.floor(changedAt / 512) * 512;
  assert.match(differ.stdout, new RegExp(`Content mismatch at offset ${sector}!`));
  const onDisk = readFileSync(image);
  assert.equal(onDisk[changedAt], (ref[changedAt] ^ 0xff) & 0xff, "the changed byte is in the image");
  onDisk[changedAt] = ref[changedAt];
  assert.ok(onDisk.equals(ref), "nothing else changed");
});

test("qemu-img map shows holes after write -z and discard, data elsewhere", async (t) => {
  assert.ok(existsSync(NATIVE_ADDON), `the native addon is built (${NATIVE_ADDON}); run npm install`);
  const { daemon } = await serveTempImage(t, 16 * MiB);
  await runOk("qemu-io", [
    "-f",
    "raw",
    daemon.uri,
    "-c",
    "write -P 0x55 0 16M",
    "-c",
    "write -z 2M 1M",
    "-c",
    "write -z -u 5M 1M",
    "-c",
    "discard 8M 1M",
  ]);
  const r = await runOk("qemu-img", ["map", "--output=json", "-f", "raw", daemon.uri]);
  const map = JSON.parse(r.stdout) as MapEntry[];
  // The map covers the whole disk without gaps.
  let pos = 0;
  for (const e of map) {
    assert.equal(e.start, pos, "map entries are contiguous");
    pos += e.length;
  }
  assert.equal(pos, 16 * MiB);

  const hole = { zero: true, data: false };
  const data = { zero: false, data: true };
  for (const at of [2 * MiB, 3 * MiB - 1, 5 * MiB, 6 * MiB - 1, 8 * MiB, 9 * MiB - 1]) {
    assert.deepEqual(kindAt(map, at), hole, `hole at ${at}`);
  }
  for (const at of [0, 2 * MiB - 1, 3 * MiB, 5 * MiB - 1, 6 * MiB, 8 * MiB - 1, 9 * MiB, 16 * MiB - 1]) {
    assert.deepEqual(kindAt(map, at), data, `data at ${at}`);
  }
});
