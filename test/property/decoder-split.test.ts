import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { ProtocolError } from "../../src/core/errors.js";
import { KiB } from "../../src/core/units.js";
import {
  encodeClientFlags,
  encodeExportRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  type RequestHeader,
} from "../../src/nbd/protocol/codec.js";
import * as C from "../../src/nbd/protocol/constants.js";
import { ServerDecoder, type DecoderLimits, type ServerMessage } from "../../src/nbd/protocol/decoder.js";

const LIMITS: DecoderLimits = {
  optionBytesMax: 4 * KiB,
  payloadBytesMax: 64 * KiB,
  payloadSkipBytesMax: 256 * KiB,
};

/** A message in a form deepEqual can compare: buffers as hex, write payload iovecs joined. */
type Normal =
  | { type: "client-flags"; flags: number }
  | { type: "option"; option: number; data: string }
  | { type: "option-too-big"; option: number; length: number }
  | { type: "request"; header: RequestHeader; payload: string | null; oversize: boolean };

function normalize(m: ServerMessage): Normal {
  switch (m.type) {
    case "client-flags":
      return { type: m.type, flags: m.flags };
    case "option":
      return { type: m.type, option: m.option, data: m.data.toString("hex") };
    case "option-too-big":
      return { type: m.type, option: m.option, length: m.length };
    case "request":
      return {
        type: m.type,
        header: { ...m.header },
        payload: m.payload === null ? null : Buffer.concat(m.payload).toString("hex"),
        oversize: m.oversize,
      };
  }
}

/**
 * Feeds `chunks` to a fresh decoder that behaves like the server: it enters transmission from inside
 * the callback on NBD_OPT_GO. Each chunk is copied into a fresh buffer, as a socket read would be.
 */
function decode(chunks: readonly Buffer[], limits: DecoderLimits = LIMITS): Normal[] {
  const out: Normal[] = [];
  const decoder: ServerDecoder = new ServerDecoder(limits, (m) => {
    out.push(normalize(m));
    if (m.type === "option" && m.option === C.NBD_OPT_GO) decoder.enterTransmission();
  });
  for (const c of chunks) decoder.push(Buffer.from(c));
  return out;
}

function splitAt(stream: Buffer, cuts: readonly number[]): Buffer[] {
  const sorted = [...new Set(cuts)].sort((a, b) => a - b);
  const out: Buffer[] = [];
  let prev = 0;
  for (const c of sorted) {
    out.push(stream.subarray(prev, c));
    prev = c;
  }
  out.push(stream.subarray(prev));
  return out;
}

function pattern(length: number, seed: number): Buffer {
  const b = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) b[i] = (i * 31 + seed * 7 + (i >> 8)) & 0xff;
  return b;
}

interface Req {
  header: RequestHeader;
  payload?: Buffer;
}

function req(type: number, offset: number, length: number, cookie: number, flags = 0, payload?: Buffer): Req {
  return {
    header: { flags, type, cookieHi: cookie >>> 8, cookieLo: (cookie * 2654435761) >>> 0, offset, length },
    payload,
  };
}

/** A realistic client stream: flags, options (one with data), GO, then requests of every kind, then DISC. */
function realisticStream(): { stream: Buffer; expected: Normal[] } {
  const parts: Buffer[] = [];
  const expected: Normal[] = [];
  const clientFlags = C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES;
  parts.push(encodeClientFlags(clientFlags));
  expected.push({ type: "client-flags", flags: clientFlags });

  const options: Array<[number, Buffer]> = [
    [C.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)],
    [C.NBD_OPT_LIST, Buffer.alloc(0)],
    [C.NBD_OPT_SET_META_CONTEXT, encodeMetaContextRequest("disk0", [C.BASE_ALLOCATION])],
    [C.NBD_OPT_INFO, encodeExportRequest("disk0", [C.NBD_INFO_BLOCK_SIZE])],
    [C.NBD_OPT_GO, encodeExportRequest("disk0", [C.NBD_INFO_NAME, C.NBD_INFO_BLOCK_SIZE])],
  ];
  for (const [option, data] of options) {
    parts.push(encodeOption(option, data));
    expected.push({ type: "option", option, data: data.toString("hex") });
  }

  const reqs: Req[] = [
    req(C.NBD_CMD_READ, 0, 4096, 1),
    req(C.NBD_CMD_WRITE, 4096, 1000, 2, C.NBD_CMD_FLAG_FUA, pattern(1000, 2)),
    req(C.NBD_CMD_WRITE, 2 ** 33 + 512, 3, 3, 0, pattern(3, 3)),
    req(C.NBD_CMD_WRITE, 0, 0, 4),
    req(C.NBD_CMD_FLUSH, 0, 0, 5),
    req(C.NBD_CMD_TRIM, 65536, 131072, 6),
    req(C.NBD_CMD_WRITE_ZEROES, 8192, 1 << 20, 7, C.NBD_CMD_FLAG_NO_HOLE | C.NBD_CMD_FLAG_FAST_ZERO),
    req(C.NBD_CMD_WRITE, 28, 28, 8, 0, encodeRequest(req(C.NBD_CMD_READ, 0, 1, 99).header)),
    req(C.NBD_CMD_BLOCK_STATUS, 0, 0xffffffff, 9, C.NBD_CMD_FLAG_REQ_ONE),
    req(C.NBD_CMD_CACHE, 2 ** 40, 512, 10),
    req(C.NBD_CMD_READ, Number.MAX_SAFE_INTEGER - 100, 1, 0xffffffff),
    req(C.NBD_CMD_DISC, 0, 0, 12),
  ];
  for (const r of reqs) {
    parts.push(encodeRequest(r.header));
    if (r.payload) parts.push(r.payload);
    expected.push({
      type: "request",
      header: r.header,
      payload: r.payload && r.payload.length > 0 ? r.payload.toString("hex") : null,
      oversize: false,
    });
  }
  return { stream: Buffer.concat(parts), expected };
}

describe("ServerDecoder framing is independent of how the input is split", () => {
  const { stream, expected } = realisticStream();

  test("whole stream", () => {
    assert.deepEqual(decode([stream]), expected);
  });

  test("split into two pieces at every byte position", () => {
    for (let cut = 0; cut <= stream.length; cut++) {
      assert.deepEqual(decode(splitAt(stream, [cut])), expected, `cut at ${cut}`);
    }
  });

  test("byte by byte", () => {
    assert.deepEqual(
      decode(
        splitAt(
          stream,
          Array.from({ length: stream.length }, (_, i) => i),
        ),
      ),
      expected,
    );
  });

  test("property: random chunkings", () => {
    fc.assert(
      fc.property(fc.array(fc.nat({ max: stream.length }), { maxLength: 60 }), (cuts) => {
        assert.deepEqual(decode(splitAt(stream, cuts)), expected);
      }),
      { numRuns: 300 },
    );
  });

  test("property: random request streams in random chunkings", () => {
    const header = fc.record({
      flags: fc.integer({ min: 0, max: 0x1f }),
      type: fc.constantFrom(
        C.NBD_CMD_READ,
        C.NBD_CMD_WRITE,
        C.NBD_CMD_WRITE,
        C.NBD_CMD_FLUSH,
        C.NBD_CMD_TRIM,
        C.NBD_CMD_CACHE,
        C.NBD_CMD_WRITE_ZEROES,
        C.NBD_CMD_BLOCK_STATUS,
      ),
      cookieHi: fc.integer({ min: 0, max: 0xffffffff }),
      cookieLo: fc.integer({ min: 0, max: 0xffffffff }),
      offset: fc.maxSafeNat(),
      length: fc.nat({ max: 300 }),
    });
    const prefix = Buffer.concat([
      encodeClientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE),
      encodeOption(C.NBD_OPT_GO, encodeExportRequest("", [])),
    ]);
    const prefixExpected: Normal[] = [
      { type: "client-flags", flags: C.NBD_FLAG_C_FIXED_NEWSTYLE },
      { type: "option", option: C.NBD_OPT_GO, data: encodeExportRequest("", []).toString("hex") },
    ];
    fc.assert(
      fc.property(
        fc.array(header, { minLength: 1, maxLength: 12 }),
        fc.array(fc.double({ min: 0, max: 1, noNaN: true }), { maxLength: 30 }),
        fc.integer(),
        (headers, cutFractions, seed) => {
          const parts: Buffer[] = [prefix];
          const expectedMsgs = [...prefixExpected];
          headers.forEach((h, i) => {
            parts.push(encodeRequest(h));
            let payload: string | null = null;
            if (h.type === C.NBD_CMD_WRITE && h.length > 0) {
              const data = pattern(h.length, seed + i);
              parts.push(data);
              payload = data.toString("hex");
            }
            expectedMsgs.push({ type: "request", header: h, payload, oversize: false });
          });
          const s = Buffer.concat(parts);
          const cuts = cutFractions.map((f) => Math.floor(f * s.length));
          assert.deepEqual(decode(splitAt(s, cuts)), expectedMsgs);
        },
      ),
      { numRuns: 300 },
    );
  });

  test("a partial message yields nothing until its last byte arrives", () => {
    const messages: ServerMessage[] = [];
    const decoder: ServerDecoder = new ServerDecoder(LIMITS, (m) => {
      messages.push(m);
      if (m.type === "option" && m.option === C.NBD_OPT_GO) decoder.enterTransmission();
    });
    const goData = encodeExportRequest("x", []);
    decoder.push(encodeClientFlags(1).subarray(0, 3));
    assert.equal(messages.length, 0);
    decoder.push(encodeClientFlags(1).subarray(3));
    assert.equal(messages.length, 1);
    assert.equal(decoder.phase, "options");
    const go = encodeOption(C.NBD_OPT_GO, goData);
    decoder.push(go.subarray(0, go.length - 1));
    assert.equal(messages.length, 1);
    assert.equal(decoder.bufferedBytes, go.length - 1);
    decoder.push(go.subarray(go.length - 1));
    assert.equal(messages.length, 2);
    assert.equal(decoder.phase, "transmission");
    const w = req(C.NBD_CMD_WRITE, 0, 10, 1, 0, pattern(10, 1));
    decoder.push(encodeRequest(w.header));
    assert.equal(messages.length, 2, "header without its payload is not a message yet");
    decoder.push(w.payload!.subarray(0, 9));
    assert.equal(messages.length, 2);
    decoder.push(w.payload!.subarray(9));
    assert.equal(messages.length, 3);
    assert.equal(decoder.bufferedBytes, 0);
  });
});

describe("ServerDecoder limits and errors", () => {
  const transmissionPrefix = Buffer.concat([
    encodeClientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE),
    encodeOption(C.NBD_OPT_GO, encodeExportRequest("disk", [])),
  ]);

  test("oversize write payload is skipped, flagged, and the next request still parses", () => {
    const big = LIMITS.payloadBytesMax + 1;
    const exact = LIMITS.payloadBytesMax;
    const oversized = req(C.NBD_CMD_WRITE, 0, big, 1, 0, pattern(big, 1));
    const atLimit = req(C.NBD_CMD_WRITE, 512, exact, 2, 0, pattern(exact, 2));
    const maxSkip = req(
      C.NBD_CMD_WRITE,
      0,
      LIMITS.payloadSkipBytesMax,
      3,
      0,
      pattern(LIMITS.payloadSkipBytesMax, 3),
    );
    const read = req(C.NBD_CMD_READ, 4096, 512, 4);
    const stream = Buffer.concat([
      transmissionPrefix,
      encodeRequest(oversized.header),
      oversized.payload!,
      encodeRequest(atLimit.header),
      atLimit.payload!,
      encodeRequest(maxSkip.header),
      maxSkip.payload!,
      encodeRequest(read.header),
    ]);
    const tail: Normal[] = [
      { type: "request", header: oversized.header, payload: null, oversize: true },
      { type: "request", header: atLimit.header, payload: atLimit.payload!.toString("hex"), oversize: false },
      { type: "request", header: maxSkip.header, payload: null, oversize: true },
      { type: "request", header: read.header, payload: null, oversize: false },
    ];
    const whole = decode([stream]);
    assert.deepEqual(whole.slice(2), tail);
    fc.assert(
      fc.property(fc.array(fc.nat({ max: stream.length }), { maxLength: 40 }), (cuts) => {
        assert.deepEqual(decode(splitAt(stream, cuts)).slice(2), tail);
      }),
      { numRuns: 50 },
    );
  });

  test("a write payload past payloadSkipBytesMax is a ProtocolError", () => {
    const h = req(C.NBD_CMD_WRITE, 0, LIMITS.payloadSkipBytesMax + 1, 1).header;
    assert.throws(() => decode([transmissionPrefix, encodeRequest(h)]), ProtocolError);
  });

  test("bad request magic is a ProtocolError, whole or split", () => {
    const good = encodeRequest(req(C.NBD_CMD_READ, 0, 512, 1).header);
    const bad = Buffer.from(good);
    bad.writeUInt32BE(C.NBD_SIMPLE_REPLY_MAGIC, 0);
    // The first request decodes; the bad one throws.
    const seen: ServerMessage[] = [];
    const decoder: ServerDecoder = new ServerDecoder(LIMITS, (m) => {
      seen.push(m);
      if (m.type === "option" && m.option === C.NBD_OPT_GO) decoder.enterTransmission();
    });
    decoder.push(Buffer.concat([transmissionPrefix, good]));
    assert.equal(seen.length, 3);
    assert.throws(() => decoder.push(bad), ProtocolError);
    for (let cut = 0; cut <= bad.length; cut++) {
      assert.throws(
        () => decode(splitAt(Buffer.concat([transmissionPrefix, bad]), [transmissionPrefix.length + cut])),
        ProtocolError,
      );
    }
  });

  test("bad option magic is a ProtocolError", () => {
    const opt = encodeOption(C.NBD_OPT_LIST);
    opt[0] ^= 0xff;
    assert.throws(() => decode([encodeClientFlags(1), opt]), ProtocolError);
  });

  test("an option longer than optionBytesMax yields option-too-big and then nothing more", () => {
    const messages: ServerMessage[] = [];
    const decoder = new ServerDecoder(LIMITS, (m) => messages.push(m));
    const len = LIMITS.optionBytesMax + 1;
    const header = encodeOption(C.NBD_OPT_GO, Buffer.alloc(len)).subarray(0, C.NBD_OPTION_HEADER_BYTES);
    decoder.push(encodeClientFlags(1));
    decoder.push(encodeOption(C.NBD_OPT_STRUCTURED_REPLY));
    // The header alone is enough to reject it: the data is never buffered.
    decoder.push(header.subarray(0, 10));
    assert.equal(messages.length, 2);
    decoder.push(header.subarray(10));
    assert.equal(messages.length, 3);
    assert.deepEqual(messages[2], { type: "option-too-big", option: C.NBD_OPT_GO, length: len });
    assert.equal(decoder.phase, "stopped");
    decoder.push(Buffer.alloc(len));
    decoder.push(encodeOption(C.NBD_OPT_LIST));
    decoder.enterTransmission();
    assert.equal(messages.length, 3, "nothing after option-too-big");

    // An option of exactly optionBytesMax is fine.
    const ok = decode([
      encodeClientFlags(1),
      encodeOption(C.NBD_OPT_INFO, Buffer.alloc(LIMITS.optionBytesMax, 1)),
    ]);
    assert.equal(ok.length, 2);
    assert.equal(ok[1].type, "option");
  });

  test("stop() ends the stream: no further messages", () => {
    const messages: ServerMessage[] = [];
    const decoder: ServerDecoder = new ServerDecoder(LIMITS, (m) => {
      messages.push(m);
      if (m.type === "option") decoder.stop();
    });
    decoder.push(
      Buffer.concat([encodeClientFlags(1), encodeOption(C.NBD_OPT_ABORT), encodeOption(C.NBD_OPT_LIST)]),
    );
    assert.deepEqual(
      messages.map((m) => m.type),
      ["client-flags", "option"],
    );
    assert.equal(decoder.phase, "stopped");
    assert.equal(decoder.bufferedBytes, 0);
  });
});
