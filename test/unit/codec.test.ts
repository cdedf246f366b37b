import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { ProtocolError } from "../../src/core/errors.js";
import {
  decodeExportRequest,
  decodeMetaContextRequest,
  decodeOptionReplyHeader,
  decodeRequest,
  encodeExportRequest,
  encodeMetaContextRequest,
  encodeOptionReply,
  encodeRequest,
  type RequestHeader,
} from "../../src/nbd/protocol/codec.js";
import * as C from "../../src/nbd/protocol/constants.js";

/** Strings the spec allows in names and queries: UTF-8 without NUL, at most 4096 bytes. */
const nbdString = (maxLength = 64): fc.Arbitrary<string> =>
  fc.string({ unit: "grapheme", maxLength }).filter((s) => !s.includes("\0"));

const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u16 = fc.integer({ min: 0, max: 0xffff });

const requestHeader: fc.Arbitrary<RequestHeader> = fc.record({
  flags: u16,
  type: u16,
  cookieHi: u32,
  cookieLo: u32,
  offset: fc.oneof(
    fc.maxSafeNat(),
    fc.integer({ min: 2 ** 32 - 4, max: 2 ** 32 + 4 }),
    fc.nat({ max: 2 ** 32 }),
  ),
  length: u32,
});

describe("requests", () => {
  test("encodeRequest writes the spec's layout", () => {
    const b = encodeRequest({
      flags: C.NBD_CMD_FLAG_FUA,
      type: C.NBD_CMD_WRITE,
      cookieHi: 0xdeadbeef,
      cookieLo: 0x01020304,
      offset: 2 ** 32 + 7,
      length: 4096,
    });
    assert.equal(b.length, C.NBD_REQUEST_HEADER_BYTES);
    assert.equal(
      b.toString("hex"),
      "25609513" + "0001" + "0001" + "deadbeef" + "01020304" + "0000000100000007" + "00001000",
    );
  });

  test("round trip at offsets past 2^32 and with full 64-bit cookies", () => {
    const h: RequestHeader = {
      flags: 0xffff,
      type: C.NBD_CMD_BLOCK_STATUS,
      cookieHi: 0xffffffff,
      cookieLo: 0xfffffffe,
      offset: Number.MAX_SAFE_INTEGER,
      length: 0xffffffff,
    };
    assert.deepEqual(decodeRequest(encodeRequest(h), 0), h);
    const h2 = { ...h, offset: 2 ** 32, cookieHi: 0, cookieLo: 1 };
    assert.deepEqual(decodeRequest(encodeRequest(h2), 0), h2);
  });

  test("property: decodeRequest(encodeRequest(h)) equals h, also at an offset inside a larger buffer", () => {
    fc.assert(
      fc.property(requestHeader, fc.nat({ max: 40 }), (h, at) => {
        const b = encodeRequest(h);
        assert.equal(b.readUInt32BE(0), C.NBD_REQUEST_MAGIC);
        assert.deepEqual(decodeRequest(b, 0), h);
        const big = Buffer.alloc(at + b.length + 13, 0xaa);
        b.copy(big, at);
        assert.deepEqual(decodeRequest(big, at), h);
      }),
      { numRuns: 500 },
    );
  });
});

describe("export requests (NBD_OPT_INFO / NBD_OPT_GO)", () => {
  test("layout", () => {
    const b = encodeExportRequest("ab", [C.NBD_INFO_NAME, C.NBD_INFO_BLOCK_SIZE]);
    assert.equal(b.toString("hex"), "00000002" + "6162" + "0002" + "0001" + "0003");
  });

  test("property: round trip", () => {
    fc.assert(
      fc.property(nbdString(), fc.array(u16, { maxLength: 20 }), (name, infos) => {
        assert.deepEqual(decodeExportRequest(encodeExportRequest(name, infos)), { name, infos });
      }),
      { numRuns: 300 },
    );
  });

  test("a name of exactly 4096 bytes is accepted", () => {
    const name = "n".repeat(C.NBD_STRING_BYTES_MAX);
    assert.equal(decodeExportRequest(encodeExportRequest(name, [])).name, name);
  });

  test("malformed data is a ProtocolError", () => {
    const good = encodeExportRequest("disk", [1, 3]);
    const cases: Array<[string, Buffer]> = [
      ["empty", Buffer.alloc(0)],
      ["too short", Buffer.alloc(5)],
      [
        "name length past data",
        (() => {
          const b = Buffer.from(good);
          b.writeUInt32BE(1000, 0);
          return b;
        })(),
      ],
      [
        "name length huge",
        (() => {
          const b = Buffer.from(good);
          b.writeUInt32BE(0xffffffff, 0);
          return b;
        })(),
      ],
      [
        "count larger than the data",
        (() => {
          const b = Buffer.from(good);
          b.writeUInt16BE(3, 8);
          return b;
        })(),
      ],
      [
        "count smaller than the data",
        (() => {
          const b = Buffer.from(good);
          b.writeUInt16BE(1, 8);
          return b;
        })(),
      ],
      ["trailing byte", Buffer.concat([good, Buffer.from([0])])],
      ["truncated info", good.subarray(0, good.length - 1)],
      ["NUL in name", encodeExportRequest("di\0sk", [])],
      ["name > 4096 bytes", encodeExportRequest("x".repeat(C.NBD_STRING_BYTES_MAX + 1), [])],
    ];
    for (const [what, data] of cases) {
      assert.throws(() => decodeExportRequest(data), ProtocolError, what);
    }
  });

  test("property: any truncation of a valid request is rejected", () => {
    fc.assert(
      fc.property(nbdString(16), fc.array(u16, { maxLength: 8 }), fc.nat(), (name, infos, cut) => {
        const b = encodeExportRequest(name, infos);
        const n = cut % b.length;
        assert.throws(() => decodeExportRequest(b.subarray(0, n)), ProtocolError);
      }),
    );
  });
});

describe("meta context requests", () => {
  test("layout", () => {
    const b = encodeMetaContextRequest("d", ["base:allocation"]);
    assert.equal(
      b.toString("hex"),
      "00000001" + "64" + "00000001" + "0000000f" + Buffer.from("base:allocation").toString("hex"),
    );
  });

  test("property: round trip", () => {
    fc.assert(
      fc.property(nbdString(), fc.array(nbdString(40), { maxLength: 10 }), (exportName, queries) => {
        assert.deepEqual(decodeMetaContextRequest(encodeMetaContextRequest(exportName, queries)), {
          exportName,
          queries,
        });
      }),
      { numRuns: 300 },
    );
  });

  test("malformed data is a ProtocolError", () => {
    const good = encodeMetaContextRequest("disk", ["base:allocation", "qemu:dirty-bitmap:a"]);
    const patched = (at: number, value: number): Buffer => {
      const b = Buffer.from(good);
      b.writeUInt32BE(value, at);
      return b;
    };
    const nameEnd = 4 + 4; // "disk"
    const cases: Array<[string, Buffer]> = [
      ["empty", Buffer.alloc(0)],
      ["too short", Buffer.alloc(7)],
      ["name length past data", patched(0, 1000)],
      ["name length huge", patched(0, 0xffffffff)],
      ["too-large query count", patched(nameEnd, 0x7fffffff)],
      ["count larger than the queries", patched(nameEnd, 3)],
      ["count smaller than the queries (trailing bytes)", patched(nameEnd, 1)],
      ["query length past data", patched(nameEnd + 4, 1000)],
      ["trailing bytes", Buffer.concat([good, Buffer.from([1, 2, 3])])],
      ["truncated", good.subarray(0, good.length - 1)],
      ["NUL in name", encodeMetaContextRequest("di\0sk", [])],
      ["NUL in query", encodeMetaContextRequest("disk", ["base:\0allocation"])],
      ["name > 4096 bytes", encodeMetaContextRequest("x".repeat(C.NBD_STRING_BYTES_MAX + 1), [])],
      ["query > 4096 bytes", encodeMetaContextRequest("disk", ["q".repeat(C.NBD_STRING_BYTES_MAX + 1)])],
    ];
    for (const [what, data] of cases) {
      assert.throws(() => decodeMetaContextRequest(data), ProtocolError, what);
    }
    // A huge count is refused up front, before any query is parsed.
    assert.throws(() => decodeMetaContextRequest(patched(nameEnd, 0x7fffffff)), /query count exceeds/);
    assert.throws(() => decodeMetaContextRequest(patched(nameEnd, 0xffffffff)), /query count exceeds/);
  });

  test("property: any truncation or extension of a valid request is rejected", () => {
    fc.assert(
      fc.property(
        nbdString(16),
        fc.array(nbdString(16), { maxLength: 5 }),
        fc.nat(),
        fc.uint8Array({ minLength: 1, maxLength: 8 }),
        (name, queries, cut, extra) => {
          const b = encodeMetaContextRequest(name, queries);
          assert.throws(() => decodeMetaContextRequest(b.subarray(0, cut % b.length)), ProtocolError);
          assert.throws(() => decodeMetaContextRequest(Buffer.concat([b, extra])), ProtocolError);
        },
      ),
    );
  });
});

describe("option reply error types", () => {
  const errors = [
    C.NBD_REP_ERR_UNSUP,
    C.NBD_REP_ERR_POLICY,
    C.NBD_REP_ERR_INVALID,
    C.NBD_REP_ERR_PLATFORM,
    C.NBD_REP_ERR_TLS_REQD,
    C.NBD_REP_ERR_UNKNOWN,
    C.NBD_REP_ERR_SHUTDOWN,
    C.NBD_REP_ERR_TOO_BIG,
  ];
  test("a decoded error reply's type equals its constant, and only errors count as errors", () => {
    for (const type of errors) {
      const h = decodeOptionReplyHeader(encodeOptionReply(C.NBD_OPT_GO, type));
      assert.equal(h.type, type, `0x${type.toString(16)}`);
      assert.ok(C.isOptionReplyError(h.type));
    }
    for (const type of [C.NBD_REP_ACK, C.NBD_REP_SERVER, C.NBD_REP_INFO, C.NBD_REP_META_CONTEXT]) {
      assert.ok(!C.isOptionReplyError(type));
    }
  });
});
