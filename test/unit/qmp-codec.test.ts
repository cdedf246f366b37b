import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { encodeQmp, QmpInputSplitter, type QmpInput } from "../../src/qmp/codec.js";

function splitAll(splitter: QmpInputSplitter, chunks: readonly (string | Buffer)[]): QmpInput[] {
  const out: QmpInput[] = [];
  for (const c of chunks) out.push(...splitter.push(typeof c === "string" ? Buffer.from(c) : c));
  return out;
}

const values = (inputs: QmpInput[]): unknown[] => inputs.map((i) => (i.ok ? i.value : { error: i.desc }));

describe("QmpInputSplitter", () => {
  // Strings holding braces, brackets, escaped quotes and backslashes, multi-byte UTF-8 and an astral
  // character, newline-delimited and back to back, and two top-level scalars.
  const stream =
    '{"execute": "a", "arguments": {"s": "}{][\\"\\\\", "n": [1, {"x": []}]}, "id": "é€😀"}\n' +
    '{"execute":"b"}{"execute":"c","id":{"k":"\\u007b"}}  \r\n' +
    '[1,2] "top" 42 true\n';
  const expected = [
    { execute: "a", arguments: { s: '}{]["\\', n: [1, { x: [] }] }, id: "é€😀" },
    { execute: "b" },
    { execute: "c", id: { k: "{" } },
    [1, 2],
    "top",
    42,
    true,
  ];

  test("cuts top-level values however they are laid out", () => {
    assert.deepEqual(values(splitAll(new QmpInputSplitter(), [stream])), expected);
  });

  test("gives the same values when the stream is split at every byte", () => {
    const bytes = Buffer.from(stream);
    for (let at = 0; at <= bytes.length; at++) {
      const got = values(splitAll(new QmpInputSplitter(), [bytes.subarray(0, at), bytes.subarray(at)]));
      assert.deepEqual(got, expected, `split at byte ${at}`);
    }
    const oneByOne = splitAll(
      new QmpInputSplitter(),
      [...bytes].map((b) => Buffer.from([b])),
    );
    assert.deepEqual(values(oneByOne), expected);
  });

  test("a value is complete only when its last byte arrives", () => {
    const s = new QmpInputSplitter();
    assert.deepEqual(s.push(Buffer.from('{"execute": "x"')), []);
    assert.equal(s.pending, true);
    assert.deepEqual(values(s.push(Buffer.from("}"))), [{ execute: "x" }]);
    assert.equal(s.pending, false);
    // A scalar needs a delimiter (or the end of input) to be complete.
    assert.deepEqual(s.push(Buffer.from("12")), []);
    assert.deepEqual(values(s.push(Buffer.from("3 "))), [123]);
    assert.deepEqual(s.push(Buffer.from("7")), []);
    assert.deepEqual(values(s.end()), [7]);
  });

  test("malformed values become parse errors and do not disturb the next one", () => {
    const got = values(
      splitAll(new QmpInputSplitter(), ['{"execute": }\n', "}", '{"a" 1}', "hello ", '{"execute":"ok"}']),
    );
    assert.equal(got.length, 5);
    for (const e of got.slice(0, 4)) {
      assert.match((e as { error: string }).error, /^JSON parse error, /);
      assert.ok((e as { error: string }).error.length < 260, "detail is bounded");
    }
    assert.deepEqual(got[4], { execute: "ok" });
  });

  test("invalid UTF-8 is a parse error", () => {
    const bad = Buffer.concat([Buffer.from('{"s": "'), Buffer.from([0xc3, 0x28]), Buffer.from('"}')]);
    assert.deepEqual(values(new QmpInputSplitter().push(bad)), [
      { error: "JSON parse error, invalid UTF-8 sequence" },
    ]);
  });

  test("an oversize value is reported once and skipped to its end, across chunks", () => {
    const s = new QmpInputSplitter({ bytesMax: 64 });
    const big = `{"execute": "x", "arguments": {"s": "${"}".repeat(200)}", "t": [{}]}}`;
    const chunks = [big.slice(0, 50), big.slice(50, 120), big.slice(120) + '{"execute":"after"}'];
    assert.deepEqual(values(splitAll(s, chunks)), [{ error: "JSON input too long" }, { execute: "after" }]);
    // Oversize within one chunk.
    assert.deepEqual(values(s.push(Buffer.from(big + " 5 "))), [{ error: "JSON input too long" }, 5]);
    // Exactly at the limit is accepted.
    const exact = `{"s": "${"a".repeat(64 - 9)}"}`;
    assert.equal(Buffer.byteLength(exact), 64);
    assert.deepEqual(values(s.push(Buffer.from(exact))), [{ s: "a".repeat(55) }]);
  });

  test("nesting deeper than the limit is reported and skipped", () => {
    const s = new QmpInputSplitter({ depthMax: 4 });
    assert.deepEqual(values(s.push(Buffer.from("[[[[1]]]] [[[[[1]]]]] {}"))), [
      [[[[1]]]],
      { error: "JSON nesting depth limit exceeded" },
      {},
    ]);
  });

  test("end of input inside a value is an error", () => {
    const s = new QmpInputSplitter();
    s.push(Buffer.from('{"execute": "x"'));
    assert.deepEqual(values(s.end()), [{ error: "JSON parse error, premature end of input" }]);
    assert.equal(s.pending, false);
  });
});

describe("encodeQmp", () => {
  test("writes QEMU's compact style", () => {
    assert.equal(encodeQmp({ return: {}, id: 1 }), '{"return": {}, "id": 1}');
    assert.equal(
      encodeQmp({ error: { class: "GenericError", desc: "x" }, id: [1, "a", null, true] }),
      '{"error": {"class": "GenericError", "desc": "x"}, "id": [1, "a", null, true]}',
    );
    assert.equal(encodeQmp([]), "[]");
  });

  test("escapes everything outside printable ASCII and round-trips", () => {
    const s = 'é€😀\u0001\u007f"\\\n';
    const encoded = encodeQmp({ s });
    assert.equal(encoded, '{"s": "\\u00E9\\u20AC\\uD83D\\uDE00\\u0001\\u007F\\"\\\\\\n"}');
    assert.match(encoded, /^[\x20-\x7e]*$/);
    assert.deepEqual(JSON.parse(encoded), { s });
  });

  test("bigints, undefined members, toJSON and non-finite numbers", () => {
    assert.equal(encodeQmp({ len: 2n ** 64n - 1n }), '{"len": 18446744073709551615}');
    assert.equal(encodeQmp({ a: undefined, b: 1, c: () => 0 }), '{"b": 1}');
    assert.equal(encodeQmp({ d: new Date(0) }), '{"d": "1970-01-01T00:00:00.000Z"}');
    assert.equal(encodeQmp([NaN, Infinity, undefined]), "[null, null, null]");
  });

  test("a cycle throws instead of overflowing the stack", () => {
    const a: Record<string, unknown> = {};
    a.self = a;
    assert.throws(() => encodeQmp(a), /nested too deeply/);
  });
});
