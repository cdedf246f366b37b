import { test, describe } from "node:test";
import assert from "node:assert/strict";
import { QmpError } from "../../src/qmp/errors.js";
import { validateArgs, type ArgsSpec, type InferArgs } from "../../src/qmp/schema.js";

const backupArgs = {
  "job-id": { type: "str", optional: true },
  device: { type: "str" },
  sync: { type: "enum", values: ["full", "top", "none", "incremental", "bitmap"] },
  speed: { type: "int", min: 0, optional: true },
  "auto-finalize": { type: "bool", optional: true },
  ratio: { type: "number", optional: true },
  bitmaps: { type: "array", items: { type: "str" }, optional: true },
  target: {
    type: "object",
    optional: true,
    fields: {
      driver: { type: "str" },
      file: { type: "object", optional: true, fields: { filename: { type: "str" } } },
      opaque: { type: "any", optional: true },
    },
  },
} as const satisfies ArgsSpec;

/** Asserts that validation fails with exactly QEMU's GenericError text. */
function rejects(args: unknown, desc: string, spec: ArgsSpec = backupArgs): void {
  assert.throws(
    () => validateArgs(spec, args),
    (err: unknown) => {
      assert.ok(err instanceof QmpError, `not a QmpError: ${String(err)}`);
      assert.equal(err.errorClass, "GenericError");
      assert.equal(err.message, desc);
      return true;
    },
  );
}

describe("validateArgs", () => {
  test("accepts valid arguments and returns only the schema's members", () => {
    const args = {
      device: "d0",
      sync: "full",
      speed: 0,
      "auto-finalize": false,
      ratio: 0.5,
      bitmaps: ["b1", "b2"],
      target: { driver: "raw", file: { filename: "/tmp/x" }, opaque: [null, { a: 1 }] },
    };
    const out = validateArgs(backupArgs, args);
    assert.deepEqual(out, args);
    assert.notEqual(out, args, "a fresh object, not the client's");
  });

  test("absent optional members stay absent; absent arguments count as {}", () => {
    const out = validateArgs(backupArgs, { device: "d0", sync: "top" });
    assert.deepEqual(out, { device: "d0", sync: "top" });
    assert.equal(Object.hasOwn(out, "speed"), false);
    assert.deepEqual(validateArgs({ x: { type: "int", optional: true } }, undefined), {});
    rejects(undefined, "Parameter 'device' is missing");
  });

  test("missing member", () => {
    rejects({ sync: "full" }, "Parameter 'device' is missing");
  });

  test("unexpected member, checked after the schema's members as QEMU does", () => {
    rejects({ device: "d0", sync: "full", foo: 1 }, "Parameter 'foo' is unexpected");
    rejects({ foo: 1 }, "Parameter 'device' is missing");
  });

  test("members inherited from Object.prototype are neither required nor accepted", () => {
    rejects({ device: "d0", sync: "full", toString: "x" }, "Parameter 'toString' is unexpected");
    rejects({ device: "d0", sync: "full", constructor: 1 }, "Parameter 'constructor' is unexpected");
    const proto = JSON.parse('{"device": "d0", "sync": "full", "__proto__": {"speed": 1}}') as unknown;
    rejects(proto, "Parameter '__proto__' is unexpected");
  });

  test("wrong types name QEMU's expected type", () => {
    const base = { device: "d0", sync: "full" };
    rejects({ ...base, device: 5 }, "Invalid parameter type for 'device', expected: string");
    rejects({ ...base, speed: "fast" }, "Invalid parameter type for 'speed', expected: integer");
    rejects({ ...base, speed: 1.5 }, "Invalid parameter type for 'speed', expected: integer");
    rejects({ ...base, speed: 2 ** 64 }, "Invalid parameter type for 'speed', expected: integer");
    rejects(
      { ...base, "auto-finalize": "yes" },
      "Invalid parameter type for 'auto-finalize', expected: boolean",
    );
    rejects({ ...base, ratio: "0.5" }, "Invalid parameter type for 'ratio', expected: number");
    rejects({ ...base, bitmaps: "b1" }, "Invalid parameter type for 'bitmaps', expected: array");
    rejects({ ...base, target: ["raw"] }, "Invalid parameter type for 'target', expected: object");
    rejects({ ...base, target: null }, "Invalid parameter type for 'target', expected: object");
    rejects({ ...base, device: null }, "Invalid parameter type for 'device', expected: string");
  });

  test("enum: a non-string is a type error, an unknown string is refused by value", () => {
    const base = { device: "d0" };
    rejects({ ...base, sync: "bogus" }, "Parameter 'sync' does not accept value 'bogus'");
    rejects({ ...base, sync: 1 }, "Invalid parameter type for 'sync', expected: string");
    for (const sync of backupArgs.sync.values)
      assert.equal(validateArgs(backupArgs, { ...base, sync }).sync, sync);
  });

  test("nested members are named with dots, array elements with indexes", () => {
    const base = { device: "d0", sync: "full" };
    rejects({ ...base, target: {} }, "Parameter 'target.driver' is missing");
    rejects({ ...base, target: { driver: "raw", file: {} } }, "Parameter 'target.file.filename' is missing");
    rejects(
      { ...base, target: { driver: "raw", file: { filename: 1 } } },
      "Invalid parameter type for 'target.file.filename', expected: string",
    );
    rejects(
      { ...base, target: { driver: "raw", file: { filename: "/x", locking: "off" } } },
      "Parameter 'target.file.locking' is unexpected",
    );
    rejects({ ...base, bitmaps: ["a", 2] }, "Invalid parameter type for 'bitmaps[1]', expected: string");
  });

  test("the path argument prefixes every name", () => {
    assert.throws(() => validateArgs({ filename: { type: "str" } }, {}, "file"), {
      message: "Parameter 'file.filename' is missing",
    });
    assert.throws(() => validateArgs({ filename: { type: "str" } }, 3, "file"), {
      message: "Invalid parameter type for 'file', expected: object",
    });
  });

  test("an enum error names the member, not its path; an array element is 'null' (QEMU 7.2's texts)", () => {
    const spec = {
      rules: {
        type: "array",
        items: { type: "object", fields: { format: { type: "enum", values: ["exact", "glob"] } } },
      },
      caps: { type: "array", optional: true, items: { type: "enum", values: ["oob"] } },
    } as const satisfies ArgsSpec;
    rejects({ rules: [{ format: "regex" }] }, "Parameter 'format' does not accept value 'regex'", spec);
    rejects({ rules: [], caps: ["foo"] }, "Parameter 'null' does not accept value 'foo'", spec);
    rejects({ rules: [{}] }, "Parameter 'rules[0].format' is missing", spec);
  });

  test("integer bounds", () => {
    const spec = { n: { type: "int", min: 1, max: 10 } } as const;
    assert.deepEqual(validateArgs(spec, { n: 1 }), { n: 1 });
    assert.deepEqual(validateArgs(spec, { n: 10 }), { n: 10 });
    rejects({ n: 0 }, "Parameter 'n' expects a value between 1 and 10", spec);
    rejects({ n: 11 }, "Parameter 'n' expects a value between 1 and 10", spec);
    rejects(
      { device: "d0", sync: "full", speed: -1 },
      `Parameter 'speed' expects a value between 0 and ${Number.MAX_SAFE_INTEGER}`,
    );
    // A QAPI uint32 names its C type, and the member by its own name, as QEMU 7.2's visitor does.
    const u32 = {
      o: { type: "object", fields: { n: { type: "int", min: 0, max: 0xffffffff, ctype: "uint32_t" } } },
    } as const satisfies ArgsSpec;
    rejects({ o: { n: -1 } }, "Parameter 'n' expects uint32_t", u32);
    rejects({ o: { n: 2 ** 32 } }, "Parameter 'n' expects uint32_t", u32);
    const unbounded = { n: { type: "int" } } as const;
    assert.equal(validateArgs(unbounded, { n: Number.MIN_SAFE_INTEGER }).n, Number.MIN_SAFE_INTEGER);
    assert.equal(validateArgs(unbounded, { n: Number.MAX_SAFE_INTEGER }).n, Number.MAX_SAFE_INTEGER);
  });

  test("arguments that are not an object", () => {
    for (const args of [null, [], "x", 3, true]) {
      rejects(args, "QMP input member 'arguments' must be an object");
    }
  });

  test("InferArgs types a handler's arguments from its schema", () => {
    type Args = InferArgs<typeof backupArgs>;
    const args = validateArgs(backupArgs, { device: "d0", sync: "none" }) as Args;
    // Compile-time checks: these lines fail to build if the inferred types are wrong.
    const device: string = args.device;
    const sync: "full" | "top" | "none" | "incremental" | "bitmap" = args.sync;
    const speed: number | undefined = args.speed;
    const filename: string | undefined = args.target?.file?.filename;
    // @ts-expect-error: an enum member is not any string
    const wrong: "full" = args.sync;
    assert.deepEqual([device, sync, speed, filename, wrong], ["d0", "none", undefined, undefined, "none"]);
  });
});
