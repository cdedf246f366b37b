/**
 * CRC-32C: known answers (the check value of "123456789" and the iSCSI vectors of RFC 3720 B.4) for
 * the addon (SSE4.2 and its C tables) and the TypeScript fallback, which agree on random inputs split
 * at random points and continued through `seed`. The addon's CRC is asserted to have loaded, so a
 * silent fallback to the ten-times-slower TypeScript is noticed (unless DRIVETAP_NO_NATIVE=1).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { crc32c, crc32cImplementation, crc32cPortable } from "../../src/block/crc32c.js";
import { native } from "../../src/block/drivers/native.js";

type Crc = (pieces: readonly Uint8Array[] | Uint8Array, seed?: number) => number;

const implementations: [string, Crc][] = [
  ["crc32c", crc32c],
  ["typescript", crc32cPortable],
];
if (native?.crc32c) implementations.push(["native", native.crc32c]);
if (native?.crc32cSoftware) implementations.push(["native tables", native.crc32cSoftware]);

const bytes = (f: (i: number) => number): Buffer => Buffer.from(Array.from({ length: 32 }, (_, i) => f(i)));

test("crc32c: known answers, for every implementation", () => {
  for (const [name, crc] of implementations) {
    assert.equal(crc(Buffer.from("123456789")), 0xe3069283, name);
    assert.equal(crc([Buffer.from("1234"), Buffer.alloc(0), Buffer.from("56789")]), 0xe3069283, name);
    assert.equal(crc(Buffer.from("56789"), crc(Buffer.from("1234"))), 0xe3069283, name);
    assert.equal(crc(Buffer.alloc(0)), 0, name);
    assert.equal(crc([]), 0, name);
    assert.equal(crc(bytes(() => 0)), 0x8a9136aa, name);
    assert.equal(crc(bytes(() => 0xff)), 0x62a8ab43, name);
    assert.equal(crc(bytes((i) => i)), 0x46dd794e, name);
    assert.equal(crc(bytes((i) => 31 - i)), 0x113fdb5c, name);
    // A plain Uint8Array and a view at an odd offset of a larger buffer.
    const big = Buffer.from("xx123456789yy");
    assert.equal(crc(new Uint8Array(big.buffer, big.byteOffset + 2, 9)), 0xe3069283, name);
    assert.equal(crc(big.subarray(2, 11)), 0xe3069283, name);
  }
});

test("crc32c: the addon is loaded and uses the hardware where it can", () => {
  if (process.env.DRIVETAP_NO_NATIVE === "1") {
    assert.equal(crc32cImplementation, "typescript");
    return;
  }
  assert.ok(native?.crc32c, "the native addon with crc32c is built; run npm install");
  assert.equal(crc32cImplementation, process.arch === "x64" ? "sse4.2" : "native-table");
  assert.throws(() => (native?.crc32c as (x: unknown) => number)("text"), TypeError);
  assert.throws(() => (native?.crc32c as (x: unknown) => number)([Buffer.alloc(1), 5]), TypeError);
});

test("crc32c: every implementation agrees on random inputs, split anywhere and continued by seed", () => {
  fc.assert(
    fc.property(
      fc.uint8Array({ maxLength: 3000 }),
      fc.array(fc.nat(3000), { maxLength: 6 }),
      fc.nat(7),
      fc.integer({ min: 0, max: 0xffffffff }),
      (data, cuts, shift, seed) => {
        // Copy at an offset so the pieces start at every alignment.
        const backing = new Uint8Array(data.length + shift);
        backing.set(data, shift);
        const whole = backing.subarray(shift);
        const points = [...new Set(cuts.map((c) => Math.min(c, whole.length)))].sort((a, b) => a - b);
        const pieces: Uint8Array[] = [];
        let at = 0;
        for (const p of [...points, whole.length]) {
          pieces.push(whole.subarray(at, p));
          at = p;
        }
        const expected = crc32cPortable(whole, seed);
        for (const [name, crc] of implementations) {
          assert.equal(crc(whole, seed), expected, `${name} whole`);
          assert.equal(crc(pieces, seed), expected, `${name} pieces`);
          let chained = seed;
          for (const p of pieces) chained = crc(p, chained);
          assert.equal(chained, expected, `${name} chained`);
        }
      },
    ),
    { numRuns: 300 },
  );
});
