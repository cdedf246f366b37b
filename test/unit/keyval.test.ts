import { test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { escapeKeyvalValue, KeyvalError, parseKeyval, typeKeyval } from "../../src/cli/keyval.js";
import { globMatch } from "../../src/graph/authz.js";
import { blockdevAddArgs } from "../../src/qmp/commands/block.js";

test("keyval: pairs, ',,' escapes, dotted keys nest, numeric keys make lists, implied key", () => {
  assert.deepEqual(parseKeyval("driver=file,filename=a,,b,node-name=f0"), {
    driver: "file",
    filename: "a,b",
    "node-name": "f0",
  });
  assert.deepEqual(parseKeyval("raw,file.driver=file,file.filename=x", "driver"), {
    driver: "raw",
    file: { driver: "file", filename: "x" },
  });
  assert.deepEqual(parseKeyval("authz-list,id=a,rules.1.match=y,rules.0.match=x", "qom-type"), {
    "qom-type": "authz-list",
    id: "a",
    rules: [{ match: "x" }, { match: "y" }],
  });
  // The last of a repeated key wins and a trailing comma is allowed, as in QEMU.
  assert.deepEqual(parseKeyval("a=1,a=2,"), { a: "2" });
  assert.deepEqual(parseKeyval(""), {});
});

test("keyval: QEMU's errors for bad syntax", () => {
  const cases: Array<[string, string]> = [
    ["driver=file,x", "Expected '=' after parameter 'x'"],
    ["=x", "Invalid parameter ''"],
    ["a..b=1", "Invalid parameter 'a..b'"],
    ["a@b=1", "Invalid parameter 'a@b'"],
    ["a.b=1,a=2", "Parameters 'a.*' used inconsistently"],
    ["a=2,a.b=1", "Parameters 'a.*' used inconsistently"],
    ["r.0=x,r.2=y", "Parameter 'r.1' missing"],
    ["r.0=x,r.x=y", "Parameters 'r.*' used inconsistently"],
  ];
  for (const [text, message] of cases) {
    assert.throws(
      () => parseKeyval(text),
      (e: Error) => e instanceof KeyvalError && e.message === message,
      text,
    );
  }
});

test("keyval typing follows the schema: on/off, integers, nested inline file options", () => {
  const tree = parseKeyval(
    "driver=raw,node-name=r,read-only=on,file.driver=null-co,file.size=4096,file.cache.direct=off",
  );
  const typed = typeKeyval(tree, blockdevAddArgs, (key) =>
    key === "file" ? blockdevAddArgs : key === "cache" ? { direct: { type: "bool" } } : undefined,
  );
  assert.deepEqual(typed, {
    driver: "raw",
    "node-name": "r",
    "read-only": true,
    file: { driver: "null-co", size: 4096, cache: { direct: false } },
  });
  assert.throws(
    () => typeKeyval(parseKeyval("read-only=maybe"), blockdevAddArgs),
    /Parameter 'read-only' expects 'on' or 'off'/,
  );
  assert.throws(
    () => typeKeyval(parseKeyval("size=1M"), blockdevAddArgs),
    /Parameter 'size' expects integer/,
  );
});

test("property: any value survives escaping and parsing; any key order gives the same tree", () => {
  const key = fc.stringMatching(/^[a-z][a-z0-9_-]{0,8}$/);
  fc.assert(
    fc.property(
      fc.uniqueArray(fc.tuple(key, fc.string()), { selector: ([k]) => k, maxLength: 8 }),
      (pairs) => {
        const text = pairs.map(([k, v]) => `${k}=${escapeKeyvalValue(v)}`).join(",");
        const parsed = parseKeyval(text);
        assert.deepEqual(parsed, Object.fromEntries(pairs));
        const reversed = [...pairs]
          .reverse()
          .map(([k, v]) => `${k}=${escapeKeyvalValue(v)}`)
          .join(",");
        assert.deepEqual(parseKeyval(reversed), parsed);
      },
    ),
  );
});

test("property: numeric keys in any order make the list in index order", () => {
  fc.assert(
    fc.property(fc.array(fc.string(), { minLength: 1, maxLength: 12 }), fc.nat(), (values, seed) => {
      const entries = values.map((v, i) => `l.${i}=${escapeKeyvalValue(v)}`);
      // A deterministic shuffle from the seed.
      const shuffled = entries
        .map((e, i) => [((i + 1) * (seed + 7)) % 1009, e] as const)
        .sort((a, b) => a[0] - b[0]);
      assert.deepEqual(parseKeyval(shuffled.map(([, e]) => e).join(",")), { l: values });
    }),
  );
});

test("property: the parser never throws anything but KeyvalError on arbitrary input", () => {
  fc.assert(
    fc.property(
      fc.string({ maxLength: 200 }),
      fc.option(fc.constant("driver"), { nil: undefined }),
      (text, implied) => {
        try {
          parseKeyval(text, implied);
        } catch (e) {
          assert.ok(e instanceof KeyvalError, String(e));
        }
      },
    ),
  );
});

test("authz glob: fnmatch with no flags", () => {
  assert.ok(globMatch("CN=*,O=drivetap test", "CN=alice,O=drivetap test"));
  assert.ok(globMatch("a?c", "abc"));
  assert.ok(!globMatch("a?c", "ac"));
  assert.ok(globMatch("[a-c]x", "bx"));
  assert.ok(!globMatch("[!a-c]x", "bx"));
  assert.ok(globMatch("*", "any/thing.with dots"));
  assert.ok(globMatch("a\\*", "a*"));
  assert.ok(!globMatch("a\\*", "ab"));
  assert.ok(globMatch("[x", "[x"));
  assert.ok(!globMatch("bob", "bobby"));
});

test("property: a glob without wildcards matches exactly itself", () => {
  fc.assert(
    fc.property(
      fc.stringMatching(/^[A-Za-z0-9=, .]{0,20}$/),
      fc.stringMatching(/^[A-Za-z0-9=, .]{0,20}$/),
      (p, t) => {
        assert.equal(globMatch(p, t), p === t);
        assert.ok(globMatch(`*${p}*`, `x${p}y`));
      },
    ),
  );
});
