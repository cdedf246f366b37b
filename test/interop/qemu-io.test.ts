/**
 * qemu-io against the real daemon serving a raw temp image. A sniffing proxy between the two records
 * the requests qemu-io sends, so the tests can check FUA, flush, zero and trim on the wire as well as
 * the bytes that end up in the image file.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { statSync } from "node:fs";
import * as C from "../../src/nbd/protocol/constants.js";
import { readImage, serveTempImage, unixUri } from "../helpers/daemon.js";
import { startSniffingProxy, type SniffedRequest, type SniffingProxy } from "../helpers/raw-nbd.js";
import { run, runOk } from "../helpers/run.js";
import type { TestContext } from "node:test";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 64 * MiB;

async function setup(
  t: TestContext,
): Promise<{ image: string; proxy: SniffingProxy; uri: string; direct: string }> {
  const { daemon, dir, image } = await serveTempImage(t, IMAGE_BYTES);
  const proxy = await startSniffingProxy(daemon.socket, dir);
  t.after(() => proxy.close());
  return { image, proxy, uri: unixUri(proxy.socket), direct: daemon.uri };
}

function qemuIo(uri: string, commands: readonly string[], opts: { writeback?: boolean } = {}) {
  const args = ["-f", "raw", ...(opts.writeback ? ["-t", "writeback"] : []), uri];
  for (const c of commands) args.push("-c", c);
  return runOk("qemu-io", args);
}

function ofType(requests: readonly SniffedRequest[], type: number): SniffedRequest[] {
  return requests.filter((r) => r.type === type);
}

function assertBytes(image: string, offset: number, length: number, byte: number, what: string): void {
  const got = readImage(image, offset, length);
  const bad = got.findIndex((b) => b !== byte);
  assert.equal(bad, -1, `${what}: image byte at ${offset + bad} is ${got[bad]}, expected ${byte}`);
}

test("qemu-io: patterns written are read back, and qemu-io's default cache mode sets FUA on every write", async (t) => {
  const { image, proxy, uri } = await setup(t);
  const r = await qemuIo(uri, [
    "write -P 0xab 0 1M",
    "write -P 0xcd 4M 64k",
    "write -P 0xef 32M 4M",
    "read -P 0xab 0 1M",
    "read -P 0xcd 4M 64k",
    "read -P 0xef 32M 4M",
    "read -P 0 1M 3M",
  ]);
  assert.doesNotMatch(r.stdout, /fail/i);

  const writes = ofType(proxy.requests, C.NBD_CMD_WRITE);
  assert.equal(writes.length, 3);
  for (const w of writes) assert.ok(w.flags & C.NBD_CMD_FLAG_FUA, `write at ${w.offset} carries FUA`);

  assertBytes(image, 0, MiB, 0xab, "first pattern");
  assertBytes(image, 4 * MiB, 64 * 1024, 0xcd, "second pattern");
  assertBytes(image, 32 * MiB, 4 * MiB, 0xef, "third pattern");
  assertBytes(image, MiB, 3 * MiB, 0, "untouched range");

  // The check itself can fail: a wrong pattern makes qemu-io report it and exit non-zero.
  const wrong = await run("qemu-io", ["-f", "raw", uri, "-c", "read -P 0xcd 0 1M"]);
  assert.notEqual(wrong.code, 0);
  assert.match(wrong.stdout + wrong.stderr, /Pattern verification failed/);
});

test("qemu-io -t writeback: writes go without FUA, flush sends NBD_CMD_FLUSH, write -f sets FUA", async (t) => {
  const { image, proxy, uri } = await setup(t);
  await qemuIo(
    uri,
    ["write -P 0x11 0 64k", "write -P 0x12 1M 64k", "flush", "write -f -P 0x13 2M 4k", "read -P 0x13 2M 4k"],
    { writeback: true },
  );
  const writes = ofType(proxy.requests, C.NBD_CMD_WRITE);
  assert.deepEqual(
    writes.map((w) => [w.offset, w.flags & C.NBD_CMD_FLAG_FUA]),
    [
      [0, 0],
      [MiB, 0],
      [2 * MiB, C.NBD_CMD_FLAG_FUA],
    ],
  );
  const flushes = ofType(proxy.requests, C.NBD_CMD_FLUSH);
  assert.ok(flushes.length >= 1, "at least one NBD_CMD_FLUSH");
  for (const f of flushes) assert.deepEqual([f.offset, f.length, f.flags], [0, 0, 0]);
  // The explicit flush comes after the first two writes.
  const firstFlush = proxy.requests.findIndex((r) => r.type === C.NBD_CMD_FLUSH);
  const secondWrite = proxy.requests.findIndex((r) => r.type === C.NBD_CMD_WRITE && r.offset === MiB);
  assert.ok(firstFlush > secondWrite, "flush follows the writes it covers");

  assertBytes(image, 0, 64 * 1024, 0x11, "writeback write 1");
  assertBytes(image, MiB, 64 * 1024, 0x12, "writeback write 2");
  assertBytes(image, 2 * MiB, 4096, 0x13, "FUA write");
});

test("qemu-io: aio_write and aio_flush", async (t) => {
  const { image, proxy, uri } = await setup(t);
  await qemuIo(
    uri,
    [
      "aio_write -P 0x22 16M 512",
      "aio_write -P 0x23 17M 64k",
      "aio_write -P 0x24 20M 1M",
      "aio_flush",
      "read -P 0x22 16M 512",
      "read -P 0x23 17M 64k",
      "read -P 0x24 20M 1M",
    ],
    { writeback: true },
  );
  assert.equal(ofType(proxy.requests, C.NBD_CMD_WRITE).length, 3);
  assert.ok(ofType(proxy.requests, C.NBD_CMD_FLUSH).length >= 1, "aio_flush sends a flush");
  assertBytes(image, 16 * MiB, 512, 0x22, "aio write 1");
  assertBytes(image, 16 * MiB + 512, 4096, 0, "after aio write 1");
  assertBytes(image, 17 * MiB, 64 * 1024, 0x23, "aio write 2");
  assertBytes(image, 20 * MiB, MiB, 0x24, "aio write 3");
});

test("qemu-io: write -z zeroes with NBD_CMD_WRITE_ZEROES (NO_HOLE), write -z -u allows a hole", async (t) => {
  const { image, proxy, uri } = await setup(t);
  await qemuIo(uri, [
    "write -P 0x55 0 8M",
    "write -z 1M 1M",
    "write -z -u 4M 1M",
    "read -P 0 1M 1M",
    "read -P 0 4M 1M",
    "read -P 0x55 0 1M",
    "read -P 0x55 2M 2M",
    "read -P 0x55 5M 3M",
  ]);
  const zeroes = ofType(proxy.requests, C.NBD_CMD_WRITE_ZEROES);
  assert.deepEqual(
    zeroes.map((z) => [z.offset, z.length, z.flags & C.NBD_CMD_FLAG_NO_HOLE]),
    [
      [MiB, MiB, C.NBD_CMD_FLAG_NO_HOLE],
      [4 * MiB, MiB, 0],
    ],
  );
  assertBytes(image, MiB, MiB, 0, "write -z range");
  assertBytes(image, 4 * MiB, MiB, 0, "write -z -u range");
  assertBytes(image, 2 * MiB, 2 * MiB, 0x55, "between the zeroed ranges");
  assertBytes(image, 5 * MiB, 3 * MiB, 0x55, "after the zeroed ranges");
});

test("qemu-io: discard sends NBD_CMD_TRIM, the range reads as zeros and the file gets a hole", async (t) => {
  const { image, proxy, uri } = await setup(t);
  await qemuIo(uri, ["write -P 0x66 0 8M"]);
  const blocksBefore = statSync(image).blocks;
  await qemuIo(uri, ["discard 2M 2M", "read -P 0 2M 2M", "read -P 0x66 0 2M", "read -P 0x66 4M 4M"]);
  const trims = ofType(proxy.requests, C.NBD_CMD_TRIM);
  assert.deepEqual(
    trims.map((r) => [r.offset, r.length]),
    [[2 * MiB, 2 * MiB]],
  );
  assertBytes(image, 2 * MiB, 2 * MiB, 0, "discarded range");
  assertBytes(image, 4 * MiB, 4 * MiB, 0x66, "after the discarded range");
  const freed512 = blocksBefore - statSync(image).blocks;
  assert.ok(freed512 >= (2 * MiB) / 512, `discard freed ${freed512 * 512} bytes of the file, expected 2 MiB`);
});

test("qemu-io: unaligned writes go out unaligned (block size minimum 1) and leave neighbours intact", async (t) => {
  const { image, proxy, uri } = await setup(t);
  await qemuIo(uri, [
    "write -P 0xab 0 64k",
    "write -P 0x33 1000 3000",
    "write -P 0x44 4097 1",
    "write -P 0x45 65535 2",
    "read -P 0xab 0 1000",
    "read -P 0x33 1000 3000",
    "read -P 0xab 4000 97",
    "read -P 0x44 4097 1",
    "read -P 0xab 4098 61437",
    "read -P 0x45 65535 2",
    "read -P 0 65537 4095",
  ]);
  const writes = ofType(proxy.requests, C.NBD_CMD_WRITE).map((w) => [w.offset, w.length]);
  assert.deepEqual(writes, [
    [0, 65536],
    [1000, 3000],
    [4097, 1],
    [65535, 2],
  ]);
  assertBytes(image, 0, 1000, 0xab, "before the unaligned write");
  assertBytes(image, 1000, 3000, 0x33, "unaligned write");
  assertBytes(image, 4000, 97, 0xab, "between");
  assertBytes(image, 4097, 1, 0x44, "one-byte write");
  assertBytes(image, 4098, 65535 - 4098, 0xab, "after the one-byte write");
  assertBytes(image, 65535, 2, 0x45, "write across 64k");
  assertBytes(image, 65537, 4095, 0, "after the write across 64k");
});
