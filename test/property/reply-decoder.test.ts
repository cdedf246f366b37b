/**
 * The client's reply decoder (nbd/protocol/reply-decoder.ts): a stream of simple replies (with read
 * data) and structured chunks, encoded with the server's own codec, decodes to the same messages
 * however it is split, at every single split point and at random multi-point splits. Bad magic and an
 * oversize chunk are protocol errors.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { ProtocolError } from "../../src/core/errors.js";
import {
  encodeErrorChunk,
  encodeHoleChunk,
  encodeNoneChunk,
  encodeSimpleReply,
} from "../../src/nbd/protocol/codec.js";
import * as C from "../../src/nbd/protocol/constants.js";
import { ReplyDecoder, type ReplyMessage } from "../../src/nbd/protocol/reply-decoder.js";

interface Normal {
  type: string;
  cookie: number;
  error?: number;
  flags?: number;
  chunkType?: number;
  payload: string;
}

/** Read lengths by cookie: the decoder asks how much data follows a successful simple reply. */
type Reads = Map<number, number>;

function normalize(m: ReplyMessage): Normal {
  const payload = Buffer.concat(m.payload).toString("hex");
  return m.type === "simple"
    ? { type: m.type, cookie: m.cookie, error: m.error, payload }
    : { type: m.type, cookie: m.cookie, flags: m.flags, chunkType: m.chunkType, payload };
}

function decode(chunks: readonly Buffer[], reads: Reads, chunkBytesMax = 1 << 20): Normal[] {
  const out: Normal[] = [];
  const d = new ReplyDecoder({ chunkBytesMax, simplePayloadBytes: (cookie) => reads.get(cookie) ?? 0 }, (m) =>
    out.push(normalize(m)),
  );
  for (const c of chunks) d.push(Buffer.from(c));
  return out;
}

/** An OFFSET_DATA chunk (header + offset + data), built here since the server writes it in place. */
function dataChunk(cookie: number, offset: number, data: Buffer, done: boolean): Buffer {
  const h = Buffer.alloc(C.NBD_STRUCTURED_HEADER_BYTES + 8);
  h.writeUInt32BE(C.NBD_STRUCTURED_REPLY_MAGIC, 0);
  h.writeUInt16BE(done ? C.NBD_REPLY_FLAG_DONE : 0, 4);
  h.writeUInt16BE(C.NBD_REPLY_TYPE_OFFSET_DATA, 6);
  h.writeUInt32BE(0, 8);
  h.writeUInt32BE(cookie, 12);
  h.writeUInt32BE(8 + data.length, 16);
  h.writeBigUInt64BE(BigInt(offset), 20);
  return Buffer.concat([h, data]);
}

const reply = fc.oneof(
  fc.record({
    kind: fc.constant("simple-read" as const),
    data: fc.uint8Array({ minLength: 1, maxLength: 300 }),
  }),
  fc.record({ kind: fc.constant("simple-error" as const), errno: fc.constantFrom(1, 5, 22, 28) }),
  fc.record({ kind: fc.constant("none" as const) }),
  fc.record({ kind: fc.constant("hole" as const), length: fc.integer({ min: 1, max: 1 << 20 }) }),
  fc.record({ kind: fc.constant("error" as const), message: fc.string({ maxLength: 40 }) }),
  fc.record({ kind: fc.constant("data" as const), data: fc.uint8Array({ minLength: 1, maxLength: 300 }) }),
);

type Reply = typeof reply extends fc.Arbitrary<infer R> ? R : never;

function encode(replies: readonly Reply[]): { bytes: Buffer; reads: Reads; expected: Normal[] } {
  const parts: Buffer[] = [];
  const reads: Reads = new Map();
  const expected: Normal[] = [];
  replies.forEach((r, i) => {
    const cookie = i + 1;
    switch (r.kind) {
      case "simple-read": {
        const data = Buffer.from(r.data);
        reads.set(cookie, data.length);
        parts.push(encodeSimpleReply(0, 0, cookie), data);
        expected.push({ type: "simple", cookie, error: 0, payload: data.toString("hex") });
        break;
      }
      case "simple-error":
        reads.set(cookie, 4096); // a failed read carries no data
        parts.push(encodeSimpleReply(r.errno, 0, cookie));
        expected.push({ type: "simple", cookie, error: r.errno, payload: "" });
        break;
      default: {
        const chunk =
          r.kind === "none"
            ? encodeNoneChunk(0, cookie)
            : r.kind === "hole"
              ? encodeHoleChunk(C.NBD_REPLY_FLAG_DONE, 0, cookie, 4096, r.length)
              : r.kind === "error"
                ? encodeErrorChunk(5, r.message, 0, cookie)
                : dataChunk(cookie, 512, Buffer.from(r.data), true);
        parts.push(chunk);
        expected.push({
          type: "chunk",
          cookie,
          flags: chunk.readUInt16BE(4),
          chunkType: chunk.readUInt16BE(6),
          payload: chunk.subarray(C.NBD_STRUCTURED_HEADER_BYTES).toString("hex"),
        });
      }
    }
  });
  return { bytes: Buffer.concat(parts), reads, expected };
}

test("replies decode the same at every split point", () => {
  fc.assert(
    fc.property(fc.array(reply, { minLength: 1, maxLength: 6 }), (replies) => {
      const { bytes, reads, expected } = encode(replies);
      assert.deepEqual(decode([bytes], reads), expected);
      for (let at = 0; at <= bytes.length; at++) {
        assert.deepEqual(
          decode([bytes.subarray(0, at), bytes.subarray(at)], reads),
          expected,
          `split at ${at}`,
        );
      }
    }),
    { numRuns: 60 },
  );
});

test("replies decode the same when fed in random pieces", () => {
  fc.assert(
    fc.property(
      fc.array(reply, { minLength: 1, maxLength: 12 }),
      fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1, maxLength: 200 }),
      (replies, sizes) => {
        const { bytes, reads, expected } = encode(replies);
        const chunks: Buffer[] = [];
        let at = 0;
        for (let i = 0; at < bytes.length; i++) {
          const n = sizes[i % sizes.length];
          chunks.push(bytes.subarray(at, at + n));
          at += n;
        }
        assert.deepEqual(decode(chunks, reads), expected);
      },
    ),
    { numRuns: 200 },
  );
});

test("bad magic and an oversize chunk are protocol errors", () => {
  const bad = Buffer.alloc(16);
  bad.writeUInt32BE(0xdeadbeef, 0);
  assert.throws(() => decode([bad], new Map()), ProtocolError);
  const big = encodeNoneChunk(0, 1);
  big.writeUInt32BE(4096, 16);
  assert.throws(() => decode([big], new Map(), 1024), /past the limit/);
});
