import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { GiB, KiB, MiB, TiB, formatSize, parseSize } from "../../src/core/units.js";

describe("parseSize", () => {
  test("plain byte counts", () => {
    assert.equal(parseSize("0"), 0);
    assert.equal(parseSize("4096"), 4096);
    assert.equal(parseSize("  512 "), 512);
    assert.equal(parseSize("4096B"), 4096);
  });

  test("binary suffixes, either case, with optional iB/B", () => {
    assert.equal(parseSize("4k"), 4 * KiB);
    assert.equal(parseSize("4K"), 4 * KiB);
    assert.equal(parseSize("4KiB"), 4 * KiB);
    assert.equal(parseSize("4KB"), 4 * KiB);
    assert.equal(parseSize("64M"), 64 * MiB);
    assert.equal(parseSize("64m"), 64 * MiB);
    assert.equal(parseSize("64MiB"), 64 * MiB);
    assert.equal(parseSize("1G"), GiB);
    assert.equal(parseSize("1g"), GiB);
    assert.equal(parseSize("2T"), 2 * TiB);
    assert.equal(parseSize("2TiB"), 2 * TiB);
  });

  test("rejects what is not a size", () => {
    for (const bad of [
      "",
      " ",
      "abc",
      "-1",
      "1.5G",
      "1P",
      "1 G",
      "G",
      "0x10",
      "1e3",
      "1GG",
      "1Gi",
      "12,000",
    ]) {
      assert.throws(() => parseSize(bad), /not a size/, `"${bad}" should be rejected`);
    }
  });

  test("rejects sizes past Number.MAX_SAFE_INTEGER", () => {
    assert.throws(() => parseSize("9007199254740993"), /too large/);
    assert.throws(() => parseSize("99999999T"), /too large/);
    assert.equal(parseSize("8191T"), 8191 * TiB);
  });

  test("property: n with each suffix is n times the unit", () => {
    const units: Array<[string, number]> = [
      ["", 1],
      ["k", KiB],
      ["M", MiB],
      ["g", GiB],
      ["T", TiB],
    ];
    fc.assert(
      fc.property(fc.nat({ max: 4095 }), fc.constantFrom(...units), (n, [suffix, scale]) => {
        assert.equal(parseSize(`${n}${suffix}`), n * scale);
      }),
    );
  });
});

describe("formatSize", () => {
  test("picks the largest exact unit", () => {
    assert.equal(formatSize(0), "0 bytes");
    assert.equal(formatSize(1), "1 bytes");
    assert.equal(formatSize(1023), "1023 bytes");
    assert.equal(formatSize(1025), "1025 bytes");
    assert.equal(formatSize(KiB), "1 KiB");
    assert.equal(formatSize(1536 * KiB), "1536 KiB");
    assert.equal(formatSize(MiB), "1 MiB");
    assert.equal(formatSize(3 * GiB), "3 GiB");
    assert.equal(formatSize(GiB + MiB), "1025 MiB");
    assert.equal(formatSize(TiB), "1 TiB");
    assert.equal(formatSize(2048 * TiB), "2048 TiB");
  });

  test("property: parseSize(formatSize(n)) === n without spaces and unit suffix", () => {
    fc.assert(
      fc.property(fc.nat({ max: 2 ** 20 }), fc.constantFrom(1, KiB, MiB, GiB), (n, scale) => {
        const bytes = n * scale;
        const text = formatSize(bytes);
        const m = /^(\d+) (bytes|KiB|MiB|GiB|TiB)$/.exec(text);
        assert.ok(m, text);
        const suffix = m[2] === "bytes" ? "" : m[2];
        assert.equal(parseSize(`${m[1]}${suffix}`), bytes);
      }),
    );
  });
});
