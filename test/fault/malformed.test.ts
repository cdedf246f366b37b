/**
 * Malformed and hostile clients on raw sockets. Each case gets the answer the NBD spec asks for (an
 * error reply, or a closed connection), and in every case a second client that was connected before
 * the bad one acted still completes a write + read round trip afterwards, on the same daemon, which
 * must still be running. The suite ends by checking the daemon logged no internal error and exits 0.
 */
import { after, before, describe, test } from "node:test";
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as C from "../../src/nbd/protocol/constants.js";
import {
  encodeClientFlags,
  encodeExportRequest,
  encodeMetaContextRequest,
  encodeOption,
} from "../../src/nbd/protocol/codec.js";
import {
  CONNECTIONS_MAX,
  HANDSHAKE_TIMEOUT_MS,
  OPTION_BYTES_MAX,
  OPTIONS_PER_CONNECTION_MAX,
  REQUEST_BYTES_MAX,
} from "../../src/nbd/server/limits.js";
import { makeImage, readImage, serveTempImage, startDaemon, type RunningDaemon } from "../helpers/daemon.js";
import { RawNbd, assertRoundTrip, openExport } from "../helpers/raw-nbd.js";

const MiB = 1024 * 1024;
const IMAGE_BYTES = 64 * MiB;
/** Witness round trips use 4 KiB slots in the last 16 MiB; the cases use the space below. */
const WITNESS_BASE = 48 * MiB;

const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const EOVERFLOW = 75;

let daemon: RunningDaemon;
let image: string;
let witnessSlot = 0;

function nextWitnessOffset(): number {
  const offset = WITNESS_BASE + (witnessSlot++ % 4096) * 4096;
  return offset;
}

/**
 * Connects a well-behaved client, proves it works, runs the bad client's case, then proves the
 * well-behaved client still works and the daemon is alive.
 */
async function withWitness(badCase: () => Promise<void>, on: RunningDaemon = daemon): Promise<void> {
  const { client: witness } = await openExport(on.socket);
  try {
    await assertRoundTrip(witness, nextWitnessOffset());
    await badCase();
    await assertRoundTrip(witness, nextWitnessOffset());
    assert.ok(on.alive(), "the daemon is still running");
    await witness.disconnect();
  } finally {
    witness.destroy();
  }
}

async function connectBad(): Promise<RawNbd> {
  const c = await RawNbd.connect(daemon.socket);
  cleanupLater.push(c);
  return c;
}

const cleanupLater: RawNbd[] = [];

describe("malformed NBD clients", () => {
  let dir: string;
  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "drivetap-malformed-"));
    image = makeImage(join(dir, "disk.img"), IMAGE_BYTES);
    daemon = await startDaemon({ image });
  });
  after(async () => {
    for (const c of cleanupLater) c.destroy();
    if (daemon) await daemon.cleanup();
    rmSync(dir, { recursive: true, force: true });
  });

  // ---- handshake -------------------------------------------------------------------------------------

  test("bad option magic: the connection is closed", async () => {
    await withWitness(async () => {
      const bad = await connectBad();
      await bad.handshake();
      const h = encodeOption(C.NBD_OPT_LIST);
      h.writeBigUInt64BE(0xdeadbeefn, 0);
      bad.send(h);
      assert.equal((await bad.expectEof()).length, 0, "no reply, just a close");
    });
  });

  test("unknown option: NBD_REP_ERR_UNSUP and the handshake continues", async () => {
    await withWitness(async () => {
      const bad = await connectBad();
      await bad.handshake();
      bad.sendOption(0x1234, Buffer.from("whatever"));
      const r = await bad.readOptionReply();
      assert.equal(r.option, 0x1234);
      assert.equal(r.type >>> 0, C.NBD_REP_ERR_UNSUP);
      bad.sendOption(C.NBD_OPT_STARTTLS);
      assert.equal((await bad.readOptionReply()).type >>> 0, C.NBD_REP_ERR_UNSUP, "STARTTLS unsupported");
      const go = await bad.go("");
      assert.equal(go.size, IMAGE_BYTES);
      await assertRoundTrip(bad, 0);
      await bad.disconnect();
    });
  });

  test("unknown client flags, or no FIXED_NEWSTYLE: the connection is closed", async () => {
    await withWitness(async () => {
      for (const flags of [C.NBD_FLAG_C_FIXED_NEWSTYLE | 0x80, C.NBD_FLAG_C_FIXED_NEWSTYLE | (1 << 31), 0]) {
        const bad = await connectBad();
        await bad.readGreeting();
        bad.send(encodeClientFlags(flags));
        bad.sendOption(C.NBD_OPT_LIST);
        assert.equal(
          (await bad.expectEof()).length,
          0,
          `client flags ${flags >>> 0}: closed without a reply`,
        );
      }
    });
  });

  test("LIST with data: NBD_REP_ERR_INVALID, then a proper LIST and GO work", async () => {
    await withWitness(async () => {
      const bad = await connectBad();
      await bad.handshake();
      bad.sendOption(C.NBD_OPT_LIST, Buffer.from("junk"));
      const r = await bad.readOptionReply();
      assert.equal(r.option, C.NBD_OPT_LIST);
      assert.equal(r.type >>> 0, C.NBD_REP_ERR_INVALID);
      bad.sendOption(C.NBD_OPT_LIST);
      const server = await bad.readOptionReply();
      assert.equal(server.type, C.NBD_REP_SERVER);
      assert.equal(server.data.readUInt32BE(0), 0, "the export name is empty");
      assert.equal((await bad.readOptionReply()).type, C.NBD_REP_ACK);
      await bad.go("");
      await bad.disconnect();
    });
  });

  test("GO for an unknown export: NBD_REP_ERR_UNKNOWN, then GO for the real one works", async () => {
    await withWitness(async () => {
      const bad = await connectBad();
      await bad.handshake();
      bad.sendOption(C.NBD_OPT_GO, encodeExportRequest("no-such-export", [C.NBD_INFO_NAME]));
      const r = await bad.readOptionReply();
      assert.equal(r.option, C.NBD_OPT_GO);
      assert.equal(r.type >>> 0, C.NBD_REP_ERR_UNKNOWN);
      const go = await bad.go("", [C.NBD_INFO_BLOCK_SIZE]);
      const blockSize = go.replies.find(
        (x) => x.type === C.NBD_REP_INFO && x.data.readUInt16BE(0) === C.NBD_INFO_BLOCK_SIZE,
      );
      assert.ok(blockSize, "block size info");
      assert.deepEqual(
        [blockSize.data.readUInt32BE(2), blockSize.data.readUInt32BE(6), blockSize.data.readUInt32BE(10)],
        [1, 4096, REQUEST_BYTES_MAX],
      );
      await bad.disconnect();
    });
  });

  test("oversize option length: NBD_REP_ERR_TOO_BIG, then the connection is closed", async () => {
    await withWitness(async () => {
      for (const length of [0x7fffffff, OPTION_BYTES_MAX + 1]) {
        const bad = await connectBad();
        await bad.handshake();
        const h = encodeOption(C.NBD_OPT_GO);
        h.writeUInt32BE(length, 12);
        bad.send(Buffer.concat([h, Buffer.alloc(4096)]));
        const r = await bad.readOptionReply();
        assert.equal(r.option, C.NBD_OPT_GO);
        assert.equal(r.type >>> 0, C.NBD_REP_ERR_TOO_BIG, `length ${length}`);
        assert.equal((await bad.expectEof()).length, 0, "closed after the error");
      }
    });
  });

  test(`more than ${OPTIONS_PER_CONNECTION_MAX} options on one connection: each is answered, the one past the limit closes`, async () => {
    await withWitness(async () => {
      const bad = await connectBad();
      await bad.handshake();
      for (let i = 0; i < OPTIONS_PER_CONNECTION_MAX; i++) {
        bad.sendOption(0x4000 + i);
        assert.equal((await bad.readOptionReply()).type >>> 0, C.NBD_REP_ERR_UNSUP);
      }
      bad.sendOption(C.NBD_OPT_LIST);
      assert.equal((await bad.expectEof()).length, 0, "the option past the limit closes the connection");
    });
  });

  test("EXPORT_NAME: an unknown name closes the connection; the real one gets size, flags and padding", async () => {
    await withWitness(async () => {
      const unknown = await connectBad();
      await unknown.handshake();
      unknown.sendOption(C.NBD_OPT_EXPORT_NAME, Buffer.from("no-such-export"));
      assert.equal((await unknown.expectEof()).length, 0, "EXPORT_NAME has no error reply: close");

      for (const noZeroes of [false, true]) {
        const c = await connectBad();
        await c.handshake(C.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? C.NBD_FLAG_C_NO_ZEROES : 0));
        c.sendOption(C.NBD_OPT_EXPORT_NAME, Buffer.alloc(0));
        const reply = await c.readExact(noZeroes ? 10 : 10 + C.NBD_EXPORT_NAME_PAD_BYTES);
        assert.equal(Number(reply.readBigUInt64BE(0)), IMAGE_BYTES);
        assert.ok(reply.readUInt16BE(8) & C.NBD_FLAG_HAS_FLAGS);
        assert.ok(
          reply.subarray(10).every((b) => b === 0),
          "padding is zeroes",
        );
        await assertRoundTrip(c, 8192);
        await c.disconnect();
      }
    });
  });

  // ---- transmission ----------------------------------------------------------------------------------

  test("bad request magic: the connection is closed", async () => {
    await withWitness(async () => {
      const { client: bad } = await openExport(daemon.socket);
      cleanupLater.push(bad);
      const req = Buffer.alloc(C.NBD_REQUEST_HEADER_BYTES);
      req.writeUInt32BE(0x12345678, 0);
      req.writeUInt32BE(512, 24);
      bad.send(req);
      assert.equal((await bad.expectEof()).length, 0, "no reply, just a close");
    });
  });

  test("unknown command: EINVAL simple reply, and the next request works", async () => {
    await withWitness(async () => {
      const { client: bad } = await openExport(daemon.socket);
      cleanupLater.push(bad);
      const cookie = bad.sendRequest({ type: 99, offset: 0, length: 512 });
      const r = await bad.readSimpleReply();
      assert.deepEqual([r.cookie, r.error], [cookie, EINVAL]);
      await assertRoundTrip(bad, 4096);
      await bad.disconnect();
    });
  });

  test("unknown or misplaced command flags: EINVAL, and the next request works", async () => {
    await withWitness(async () => {
      const { client: bad } = await openExport(daemon.socket);
      cleanupLater.push(bad);
      const cases = [
        { type: C.NBD_CMD_READ, flags: 1 << 10, offset: 0, length: 512 },
        { type: C.NBD_CMD_READ, flags: C.NBD_CMD_FLAG_DF, offset: 0, length: 512 }, // DF needs structured replies
        { type: C.NBD_CMD_FLUSH, flags: C.NBD_CMD_FLAG_NO_HOLE, offset: 0, length: 0 },
        {
          type: C.NBD_CMD_WRITE,
          flags: C.NBD_CMD_FLAG_REQ_ONE,
          offset: 8192,
          length: 512,
          payload: Buffer.alloc(512, 0xee),
        },
      ];
      const before = readImage(image, 8192, 512);
      for (const spec of cases) {
        const cookie = bad.sendRequest(spec);
        const r = await bad.readSimpleReply();
        assert.deepEqual([r.cookie, r.error], [cookie, EINVAL], `type ${spec.type} flags ${spec.flags}`);
      }
      assert.ok(readImage(image, 8192, 512).equals(before), "the refused write left no trace");
      await assertRoundTrip(bad, 4096);
      await bad.disconnect();
    });
  });

  test("FLUSH with a non-zero offset or length: EINVAL; a proper FLUSH succeeds", async () => {
    await withWitness(async () => {
      const { client: bad } = await openExport(daemon.socket);
      cleanupLater.push(bad);
      for (const [offset, length, error] of [
        [4096, 0, EINVAL],
        [0, 512, EINVAL],
        [0, 0, 0],
      ]) {
        const cookie = bad.sendRequest({ type: C.NBD_CMD_FLUSH, offset, length });
        const r = await bad.readSimpleReply();
        assert.deepEqual([r.cookie, r.error], [cookie, error], `FLUSH offset ${offset} length ${length}`);
      }
      await bad.disconnect();
    });
  });

  test("write payload of 33 MiB (over the 32 MiB maximum): EINVAL, nothing written, next request works", async () => {
    await withWitness(async () => {
      const { client: bad } = await openExport(daemon.socket);
      cleanupLater.push(bad);
      const length = 33 * MiB;
      const before = readImage(image, 0, length);
      const cookie = bad.sendRequest({
        type: C.NBD_CMD_WRITE,
        offset: 0,
        length,
        payload: Buffer.alloc(length, 0xa5),
      });
      const r = await bad.readSimpleReply(60_000);
      assert.deepEqual([r.cookie, r.error], [cookie, EINVAL]);
      assert.ok(readImage(image, 0, length).equals(before), "the oversize payload was dropped");
      await assertRoundTrip(bad, 4096);
      await bad.disconnect();
    });
  });

  test("read over 32 MiB: EINVAL with simple replies, EOVERFLOW with structured; exactly 32 MiB works", async () => {
    await withWitness(async () => {
      const { client: simple } = await openExport(daemon.socket);
      cleanupLater.push(simple);
      let cookie = simple.sendRequest({ type: C.NBD_CMD_READ, offset: 0, length: REQUEST_BYTES_MAX + 1 });
      const r = await simple.readSimpleReply();
      assert.deepEqual([r.cookie, r.error], [cookie, EINVAL]);
      const max = await simple.read(0, REQUEST_BYTES_MAX);
      assert.equal(max.error, 0);
      assert.equal(max.data.length, REQUEST_BYTES_MAX);
      await assertRoundTrip(simple, 4096);
      await simple.disconnect();

      const { client: structured } = await openExport(daemon.socket, { structured: true });
      cleanupLater.push(structured);
      cookie = structured.sendRequest({ type: C.NBD_CMD_READ, offset: 0, length: 64 * MiB });
      const chunk = await structured.readChunk();
      assert.equal(chunk.cookie, cookie);
      assert.equal(chunk.type, C.NBD_REPLY_TYPE_ERROR);
      assert.ok(chunk.flags & C.NBD_REPLY_FLAG_DONE, "the error chunk ends the reply");
      assert.equal(chunk.data.readUInt32BE(0), EOVERFLOW);
      // The connection still works: a small read comes back as data.
      cookie = structured.sendRequest({ type: C.NBD_CMD_READ, offset: 4096, length: 512 });
      const ok = await structured.readChunk();
      assert.equal(ok.cookie, cookie);
      assert.ok(
        ok.type === C.NBD_REPLY_TYPE_OFFSET_DATA || ok.type === C.NBD_REPLY_TYPE_OFFSET_HOLE,
        `type ${ok.type}`,
      );
      await structured.disconnect();
    });
  });

  test("read past the end: EINVAL; write past the end: ENOSPC and the in-bounds part is untouched", async () => {
    await withWitness(async () => {
      const { client: bad } = await openExport(daemon.socket);
      cleanupLater.push(bad);
      const before = readImage(image, IMAGE_BYTES - 4096, 4096);
      const cases = [
        { type: C.NBD_CMD_READ, offset: IMAGE_BYTES - 512, length: 1024, error: EINVAL },
        { type: C.NBD_CMD_READ, offset: IMAGE_BYTES, length: 1, error: EINVAL },
        { type: C.NBD_CMD_READ, offset: 2 ** 62, length: 512, error: EINVAL },
        {
          type: C.NBD_CMD_WRITE,
          offset: IMAGE_BYTES - 512,
          length: 1024,
          payload: Buffer.alloc(1024, 0x77),
          error: ENOSPC,
        },
        { type: C.NBD_CMD_WRITE_ZEROES, offset: IMAGE_BYTES - 512, length: 1024, error: ENOSPC },
        { type: C.NBD_CMD_TRIM, offset: IMAGE_BYTES, length: 4096, error: EINVAL },
      ];
      for (const { error, ...spec } of cases) {
        const cookie = bad.sendRequest(spec);
        const r = await bad.readSimpleReply();
        assert.deepEqual([r.cookie, r.error], [cookie, error], `type ${spec.type} at ${spec.offset}`);
      }
      assert.ok(
        readImage(image, IMAGE_BYTES - 4096, 4096).equals(before),
        "the tail of the image is unchanged",
      );
      await assertRoundTrip(bad, 4096);
      await bad.disconnect();
    });
  });

  test("writes at offsets of 2^53 and beyond: ENOSPC (past the end), not EINVAL", async () => {
    await withWitness(async () => {
      const { client: bad } = await openExport(daemon.socket);
      cleanupLater.push(bad);
      for (const offset of [2 ** 53, 2 ** 53 + 4096, 2 ** 63, 2 ** 64 - 4096]) {
        const cookie = bad.sendRequest({
          type: C.NBD_CMD_WRITE,
          offset,
          length: 4096,
          payload: Buffer.alloc(4096, 0x31),
        });
        const r = await bad.readSimpleReply();
        assert.deepEqual([r.cookie, r.error], [cookie, ENOSPC], `write at ${offset}`);
        const z = bad.sendRequest({ type: C.NBD_CMD_WRITE_ZEROES, offset, length: 4096 });
        const rz = await bad.readSimpleReply();
        assert.deepEqual([rz.cookie, rz.error], [z, ENOSPC], `write-zeroes at ${offset}`);
      }
      await assertRoundTrip(bad, 4096);
      await bad.disconnect();
    });
  });

  test("FUA is accepted on every command (the export advertises SEND_FUA), and ignored where it means nothing", async () => {
    await withWitness(async () => {
      const { client: c, go } = await openExport(daemon.socket, { structured: true });
      cleanupLater.push(c);
      assert.ok(go.transmissionFlags & C.NBD_FLAG_SEND_FUA, "SEND_FUA is advertised");
      const FUA = C.NBD_CMD_FLAG_FUA;
      let cookie = c.sendRequest({ type: C.NBD_CMD_FLUSH, flags: FUA, length: 0 });
      let r = await c.readSimpleReply();
      assert.deepEqual([r.cookie, r.error], [cookie, 0], "FLUSH with FUA");
      cookie = c.sendRequest({ type: C.NBD_CMD_CACHE, flags: FUA, offset: 0, length: 4096 });
      r = await c.readSimpleReply();
      assert.deepEqual([r.cookie, r.error], [cookie, 0], "CACHE with FUA");
      cookie = c.sendRequest({ type: C.NBD_CMD_READ, flags: FUA, offset: 0, length: 4096 });
      let chunk = await c.readChunk();
      assert.equal(chunk.cookie, cookie);
      assert.ok(
        chunk.type === C.NBD_REPLY_TYPE_OFFSET_DATA || chunk.type === C.NBD_REPLY_TYPE_OFFSET_HOLE,
        `READ with FUA answered with data, got chunk type ${chunk.type}`,
      );
      assert.ok(chunk.flags & C.NBD_REPLY_FLAG_DONE);
      await c.disconnect();
      // BLOCK_STATUS with FUA needs a meta context.
      const b = await RawNbd.connect(daemon.socket);
      cleanupLater.push(b);
      await b.handshake();
      await b.structuredReplies();
      b.sendOption(C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest("", [C.BASE_ALLOCATION]));
      for (;;) if ((await b.readOptionReply()).type === C.NBD_REP_ACK) break;
      await b.go("");
      cookie = b.sendRequest({ type: C.NBD_CMD_BLOCK_STATUS, flags: FUA, offset: 0, length: 65536 });
      chunk = await b.readChunk();
      assert.equal(chunk.cookie, cookie);
      assert.equal(chunk.type, C.NBD_REPLY_TYPE_BLOCK_STATUS, "BLOCK_STATUS with FUA is answered");
      // Past the end: EINVAL (the spec's SHOULD), also when only the end runs past.
      for (const [offset, length] of [
        [IMAGE_BYTES - 4096, 8192],
        [IMAGE_BYTES, 4096],
      ]) {
        cookie = b.sendRequest({ type: C.NBD_CMD_BLOCK_STATUS, offset, length });
        chunk = await b.readChunk();
        assert.equal(chunk.cookie, cookie);
        assert.equal(chunk.type, C.NBD_REPLY_TYPE_ERROR, `BLOCK_STATUS at ${offset}+${length} is an error`);
        assert.equal(chunk.data.readUInt32BE(0), EINVAL, `BLOCK_STATUS at ${offset}+${length}: EINVAL`);
      }
      await b.disconnect();
    });
  });

  test("DISC with writes in flight: every write is answered and applied before the close", async () => {
    await withWitness(async () => {
      const { client: c } = await openExport(daemon.socket);
      cleanupLater.push(c);
      const base = 20 * MiB;
      for (let i = 0; i < 8; i++) {
        c.sendRequest({
          type: C.NBD_CMD_WRITE,
          flags: C.NBD_CMD_FLAG_FUA,
          offset: base + i * 65536,
          length: 65536,
          cookie: 100 + i,
          payload: Buffer.alloc(65536, i + 1),
        });
      }
      c.sendRequest({ type: C.NBD_CMD_DISC, length: 0 });
      const cookies: number[] = [];
      for (let i = 0; i < 8; i++) {
        const r = await c.readSimpleReply();
        assert.equal(r.error, 0);
        cookies.push(r.cookie);
      }
      assert.deepEqual(
        cookies.sort((a, b) => a - b),
        [100, 101, 102, 103, 104, 105, 106, 107],
      );
      assert.equal((await c.expectEof()).length, 0, "closed after the last reply");
      for (let i = 0; i < 8; i++) {
        assert.ok(
          readImage(image, base + i * 65536, 65536).every((b) => b === i + 1),
          `write ${i} applied`,
        );
      }
    });
  });

  test("a client that hangs up in the middle of 32 MiB read replies", async () => {
    // Fill the range with data, so the replies are big OFFSET_DATA chunks rather than holes.
    const data = randomBytes(REQUEST_BYTES_MAX);
    const { client: setup } = await openExport(daemon.socket);
    cleanupLater.push(setup);
    assert.equal(await setup.write(0, data), 0, "a write of exactly 32 MiB is accepted");
    await setup.disconnect();

    await withWitness(async () => {
      for (const structured of [false, true]) {
        const { client: bad } = await openExport(daemon.socket, { structured });
        cleanupLater.push(bad);
        for (let i = 0; i < 4; i++)
          bad.sendRequest({ type: C.NBD_CMD_READ, offset: 0, length: REQUEST_BYTES_MAX });
        const head = await bad.readExact(MiB, 30_000);
        const magic = head.readUInt32BE(0);
        assert.equal(magic, structured ? C.NBD_STRUCTURED_REPLY_MAGIC : C.NBD_SIMPLE_REPLY_MAGIC);
        const skip = structured ? 28 : 16;
        assert.ok(
          head.subarray(skip).equals(data.subarray(0, MiB - skip)),
          "the reply started with the right data",
        );
        bad.destroy();
        await bad.whenClosed();
      }
    });
  });

  test("a client that hangs up in the middle of a request: half a header, part of a write payload", async () => {
    const before = readImage(image, 16 * MiB, 100_000);
    await withWitness(async () => {
      const { client: half } = await openExport(daemon.socket);
      cleanupLater.push(half);
      half.send(Buffer.from([0x25, 0x60, 0x95, 0x13, 0, 0, 0, 1]));
      half.socket.end();
      assert.equal((await half.expectEof()).length, 0);

      const { client: partial } = await openExport(daemon.socket);
      cleanupLater.push(partial);
      partial.sendRequest({
        type: C.NBD_CMD_WRITE,
        offset: 16 * MiB,
        length: MiB,
        payload: Buffer.alloc(100_000, 0x3c),
      });
      partial.destroy();
      await partial.whenClosed();
    });
    assert.ok(readImage(image, 16 * MiB, 100_000).equals(before), "an incomplete write is not applied");
  });

  test("clients silent in the handshake are dropped after the handshake timeout", async () => {
    await withWitness(async () => {
      const started = Date.now();
      // Silent right after the greeting; after the client flags; in the middle of an option header.
      const afterGreeting = await connectBad();
      await afterGreeting.readGreeting();
      const afterFlags = await connectBad();
      await afterFlags.handshake();
      const midOption = await connectBad();
      await midOption.handshake();
      midOption.send(encodeOption(C.NBD_OPT_GO).subarray(0, 10));
      const limitMs = HANDSHAKE_TIMEOUT_MS + 5_000;
      await Promise.all([afterGreeting, afterFlags, midOption].map((c) => c.expectEof(limitMs)));
      const elapsed = Date.now() - started;
      assert.ok(elapsed >= HANDSHAKE_TIMEOUT_MS - 500, `dropped after ${elapsed} ms, not before the timeout`);
    });
  });

  // Last in this suite: everything above ran against this one daemon.
  test("the daemon logged no internal error and exits 0 on SIGTERM", async () => {
    assert.ok(daemon.alive(), "still running");
    const { client } = await openExport(daemon.socket);
    await assertRoundTrip(client, 0);
    await client.disconnect();
    assert.equal(await daemon.stop("SIGTERM"), 0, daemon.stderr());
    // pino levels: 50 error, 60 fatal. Warnings (40) are expected for the bad clients.
    assert.doesNotMatch(daemon.stderr(), /"level":(50|60)/, daemon.stderr());
    assert.doesNotMatch(daemon.stderr(), /Error:|TypeError|RangeError|Uncaught/);
  });
});

// Each on its own daemon: a leaked slot must not take the other cases down with it.
describe("connection slots", () => {
  test(`sessions that end release their connection slot: ${CONNECTIONS_MAX + 16} clients one after another`, async (t) => {
    const { daemon: own } = await serveTempImage(t, IMAGE_BYTES);
    await withWitness(async () => {
      for (let i = 0; i < CONNECTIONS_MAX + 16; i++) {
        let c: RawNbd;
        try {
          c = await RawNbd.connect(own.socket);
          await c.handshake();
        } catch (err) {
          throw new Error(
            `client ${i} was refused: earlier sessions still hold their slots (${(err as Error).message})`,
          );
        }
        try {
          // Three ways a session ends from the server's side: DISC, a protocol error, an unknown EXPORT_NAME.
          if (i % 3 === 0) {
            await c.go("");
            await c.disconnect();
          } else if (i % 3 === 1) {
            await c.go("");
            c.send(Buffer.alloc(C.NBD_REQUEST_HEADER_BYTES));
            await c.expectEof();
          } else {
            c.sendOption(C.NBD_OPT_EXPORT_NAME, Buffer.from("no-such-export"));
            await c.expectEof();
          }
        } finally {
          c.destroy();
        }
      }
    }, own);
  });

  test(`a GO past CONNECTIONS_MAX (${CONNECTIONS_MAX}) busy connections gets ERR_POLICY; the served ones keep working`, async (t) => {
    const { daemon: own } = await serveTempImage(t, IMAGE_BYTES);
    await withWitness(async () => {
      // The witness holds one transmission slot; the others are taken by clients that have just
      // done I/O, so none is idle long enough to be evicted.
      const held: RawNbd[] = [];
      try {
        for (let i = 1; i < CONNECTIONS_MAX; i++) {
          const { client } = await openExport(own.socket);
          held.push(client);
        }
        const late = await RawNbd.connect(own.socket);
        held.push(late);
        await late.handshake();
        await assert.rejects(
          late.go(""),
          (err: Error & { reply?: { type: number; data: Buffer } }) =>
            err.reply !== undefined &&
            err.reply.type >>> 0 === C.NBD_REP_ERR_POLICY &&
            /too many connections/.test(err.reply.data.toString()),
          "the GO past the limit gets ERR_POLICY with a reason",
        );
        // Every held connection still works.
        await assertRoundTrip(held[0], nextWitnessOffset());
        await assertRoundTrip(held[CONNECTIONS_MAX - 2], nextWitnessOffset());
      } finally {
        for (const c of held) c.destroy();
        await Promise.all(held.map((c) => c.whenClosed()));
      }
    }, own);
  });
});

describe("a read-only export", () => {
  let ro: RunningDaemon;
  let roDir: string;
  let roImage: string;
  const content = randomBytes(MiB);
  before(async () => {
    roDir = mkdtempSync(join(tmpdir(), "drivetap-ro-"));
    roImage = makeImage(join(roDir, "ro.img"), 8 * MiB, content);
    ro = await startDaemon({ image: roImage, args: ["--read-only"] });
  });
  after(async () => {
    if (ro) await ro.cleanup();
    rmSync(roDir, { recursive: true, force: true });
  });

  test("write, zero and trim get EPERM; a concurrent reader keeps working", async () => {
    const { client: witness } = await openExport(ro.socket);
    const { client: bad, go } = await openExport(ro.socket);
    try {
      assert.ok(go.transmissionFlags & C.NBD_FLAG_READ_ONLY, "READ_ONLY is advertised");
      const first = await witness.read(0, 4096);
      assert.ok(first.data.equals(content.subarray(0, 4096)));
      const cases = [
        { type: C.NBD_CMD_WRITE, offset: 0, length: 4096, payload: Buffer.alloc(4096, 0xff) },
        {
          type: C.NBD_CMD_WRITE,
          flags: C.NBD_CMD_FLAG_FUA,
          offset: 4096,
          length: 512,
          payload: Buffer.alloc(512, 0xff),
        },
        { type: C.NBD_CMD_WRITE_ZEROES, offset: 0, length: 4096 },
        { type: C.NBD_CMD_TRIM, offset: 0, length: 4096 },
      ];
      for (const spec of cases) {
        const cookie = bad.sendRequest(spec);
        const r = await bad.readSimpleReply();
        assert.deepEqual([r.cookie, r.error], [cookie, EPERM], `type ${spec.type}`);
      }
      const again = await bad.read(0, MiB);
      assert.ok(again.data.equals(content), "the refusing connection still reads");
      const later = await witness.read(0, MiB);
      assert.ok(later.data.equals(content), "the concurrent reader still reads the original content");
      assert.ok(readImage(roImage, 0, MiB).equals(content), "the image file is unchanged");
      assert.ok(ro.alive());
      await bad.disconnect();
      await witness.disconnect();
    } finally {
      bad.destroy();
      witness.destroy();
    }
    assert.equal(await ro.stop(), 0);
  });
});
