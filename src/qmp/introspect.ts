/**
 * query-qmp-schema: the registered commands' own argument schemas (the specs the server validates
 * with, so the two cannot disagree) and the events' data specs, in QEMU's SchemaInfo format. As QEMU
 * does, commands and events keep their names, builtin types keep theirs (str, int, number, bool, any,
 * null), and every other type is named by a number: clients must find types through the commands and
 * events that use them, never by name. Two uses of the same shape (an enum of error actions, an empty
 * object) get one entry, as QEMU's named types do; arrays are named `[ELEMENT]`.
 */
import type { ArgsSpec, TypeSpec } from "./schema.js";

/** Each event's name with the spec of its `data`. */
export type EventSpecs = Readonly<Record<string, ArgsSpec>>;

/** What introspection needs of a command. */
export interface IntrospectedCommand {
  readonly name: string;
  readonly args: ArgsSpec;
  readonly returns?: TypeSpec;
  readonly allowOob?: boolean;
}

/** One SchemaInfo entry; `meta-type` says which other members it has. */
export type SchemaInfo = { readonly name: string; readonly "meta-type": string } & Record<string, unknown>;

const BUILTIN_JSON_TYPES: Readonly<Record<string, string>> = {
  str: "string",
  int: "int",
  number: "number",
  bool: "boolean",
  any: "value",
  null: "null",
};

const EMPTY_OBJECT: TypeSpec = { type: "object", fields: {} };

export function introspect(commands: readonly IntrospectedCommand[], events: EventSpecs): SchemaInfo[] {
  const entities: SchemaInfo[] = [];
  const types: SchemaInfo[] = [];
  /** A type's entry (without its name) as JSON -> its name, so equal shapes share one entry. */
  const named = new Map<string, string>();
  const builtins = new Set<string>();
  let nextNumber = 0;

  function nameOf(spec: TypeSpec): string {
    switch (spec.type) {
      case "str":
      case "int":
      case "number":
      case "bool":
      case "any":
        builtins.add(spec.type);
        return spec.type;
      case "array": {
        const element = nameOf(spec.items);
        return define({ "meta-type": "array", "element-type": element }, `[${element}]`);
      }
      case "enum":
        return define({
          "meta-type": "enum",
          members: spec.values.map((name) => ({ name })),
          values: [...spec.values],
        });
      case "object":
        return objectName(spec.fields);
    }
  }

  function objectName(fields: ArgsSpec): string {
    const members = Object.entries(fields).map(([name, field]) =>
      // QEMU marks an optional member with `default: null` (no default value is ever given).
      field.optional ? { name, default: null, type: nameOf(field) } : { name, type: nameOf(field) },
    );
    return define({ "meta-type": "object", members });
  }

  function define(body: Record<string, unknown>, fixedName?: string): string {
    const key = JSON.stringify(body);
    const existing = named.get(key);
    if (existing !== undefined) return existing;
    const name = fixedName ?? String(nextNumber++);
    named.set(key, name);
    types.push({ name, ...body } as SchemaInfo);
    return name;
  }

  for (const c of commands) {
    const entry: Record<string, unknown> = {
      name: c.name,
      "meta-type": "command",
      "arg-type": objectName(c.args),
      "ret-type": nameOf(c.returns ?? EMPTY_OBJECT),
    };
    if (c.allowOob) entry["allow-oob"] = true;
    entities.push(entry as SchemaInfo);
  }
  for (const [name, data] of Object.entries(events)) {
    entities.push({ name, "meta-type": "event", "arg-type": objectName(data) });
  }
  const builtinInfo = [...builtins].map((name): SchemaInfo => ({
    name,
    "meta-type": "builtin",
    "json-type": BUILTIN_JSON_TYPES[name],
  }));
  return [...entities, ...types, ...builtinInfo];
}
