/**
 * Argument schemas for QMP commands and the validator that checks a client's `arguments` against them
 * at the edge, with the error texts QEMU 7.2's input visitor produces. Members are checked in schema
 * order, then unexpected members, as QEMU does, so the first error a client sees is the same.
 * Handlers receive an object that holds only the members the schema names.
 */
import { QmpError } from "./errors.js";

export type TypeSpec =
  | { readonly type: "str" }
  | {
      readonly type: "int";
      readonly min?: number;
      readonly max?: number;
      /** A QAPI fixed-width type ("uint32_t" for uint32): out of range gets QEMU's text naming it. */
      readonly ctype?: "uint32_t";
    }
  | { readonly type: "bool" }
  | { readonly type: "number" }
  | { readonly type: "enum"; readonly values: readonly string[] }
  | { readonly type: "object"; readonly fields: ArgsSpec }
  | { readonly type: "any" }
  | { readonly type: "array"; readonly items: TypeSpec };

export type FieldSpec = TypeSpec & { readonly optional?: boolean };

export type ArgsSpec = { readonly [name: string]: FieldSpec };

/** The TypeScript type a spec accepts (declare specs with `as const` or `defineCommand` to keep literals). */
export type Infer<T extends TypeSpec> = T extends { type: "str" }
  ? string
  : T extends { type: "int" } | { type: "number" }
    ? number
    : T extends { type: "bool" }
      ? boolean
      : T extends { type: "enum"; values: readonly (infer V)[] }
        ? V
        : T extends { type: "object"; fields: infer F extends ArgsSpec }
          ? InferArgs<F>
          : T extends { type: "array"; items: infer I extends TypeSpec }
            ? Infer<I>[]
            : unknown;

type RequiredKeys<S extends ArgsSpec> = {
  [K in keyof S]: S[K] extends { optional: true } ? never : K;
}[keyof S];

/** The arguments object a handler receives for an ArgsSpec. */
export type InferArgs<S extends ArgsSpec> = {
  [K in RequiredKeys<S>]: Infer<S[K]>;
} & {
  [K in Exclude<keyof S, RequiredKeys<S>>]?: Infer<S[K]>;
};

function isObject(value: unknown): value is Record<string, unknown> {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/**
 * The name QEMU's visitor gives in enum and fixed-width range errors: the member's own name, not its
 * path (`format`, not `rules[0].format`), and "null" for an array element, which has no name.
 */
function leafName(name: string): string {
  if (name.endsWith("]")) return "null";
  return name.slice(name.lastIndexOf(".") + 1);
}

function typeError(name: string, expected: string): QmpError {
  return new QmpError("GenericError", `Invalid parameter type for '${name}', expected: ${expected}`);
}

/**
 * Checks `args` against `spec` and returns a fresh object holding the accepted members. `path` is the
 * dotted name of the object being checked ("" for the command's arguments); absent arguments count as
 * an empty object, as in QEMU. Throws QmpError GenericError on the first mismatch.
 */
export function validateArgs(spec: ArgsSpec, args: unknown, path = ""): Record<string, unknown> {
  if (args === undefined && path === "") args = {};
  if (!isObject(args)) {
    if (path === "") throw new QmpError("GenericError", "QMP input member 'arguments' must be an object");
    throw typeError(path, "object");
  }
  const prefix = path === "" ? "" : `${path}.`;
  const out: Record<string, unknown> = {};
  for (const [key, field] of Object.entries(spec)) {
    const name = prefix + key;
    if (!Object.hasOwn(args, key)) {
      if (field.optional) continue;
      throw new QmpError("GenericError", `Parameter '${name}' is missing`);
    }
    out[key] = checkValue(field, args[key], name);
  }
  for (const key of Object.keys(args)) {
    if (!Object.hasOwn(spec, key)) {
      throw new QmpError("GenericError", `Parameter '${prefix}${key}' is unexpected`);
    }
  }
  return out;
}

function checkValue(spec: TypeSpec, value: unknown, name: string): unknown {
  switch (spec.type) {
    case "str":
      if (typeof value !== "string") throw typeError(name, "string");
      return value;
    case "int": {
      // JSON integers beyond 2^53 arrive rounded; refusing them beats acting on a different number.
      if (typeof value !== "number" || !Number.isSafeInteger(value)) throw typeError(name, "integer");
      const min = spec.min ?? Number.MIN_SAFE_INTEGER;
      const max = spec.max ?? Number.MAX_SAFE_INTEGER;
      if (value < min || value > max) {
        if (spec.ctype)
          throw new QmpError("GenericError", `Parameter '${leafName(name)}' expects ${spec.ctype}`);
        throw new QmpError("GenericError", `Parameter '${name}' expects a value between ${min} and ${max}`);
      }
      return value;
    }
    case "number":
      if (typeof value !== "number") throw typeError(name, "number");
      return value;
    case "bool":
      if (typeof value !== "boolean") throw typeError(name, "boolean");
      return value;
    case "enum":
      if (typeof value !== "string") throw typeError(name, "string");
      if (!spec.values.includes(value)) {
        throw new QmpError("GenericError", `Parameter '${leafName(name)}' does not accept value '${value}'`);
      }
      return value;
    case "object":
      if (!isObject(value)) throw typeError(name, "object");
      return validateArgs(spec.fields, value, name);
    case "array":
      if (!Array.isArray(value)) throw typeError(name, "array");
      return value.map((item, i) => checkValue(spec.items, item, `${name}[${i}]`));
    case "any":
      return value;
  }
}
