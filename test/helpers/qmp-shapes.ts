/**
 * What the QMP conformance tests share: JSON types as QAPI names them, a query-qmp-schema reader that
 * answers the questions a QMP library asks ("does blockdev-add accept X", "which values has this
 * enum"), and the event log of one job in a form two servers can be compared by.
 */
import assert from "node:assert/strict";

export type SchemaInfo = { name: string; "meta-type": string } & Record<string, unknown>;

/** A JSON value's type in QAPI's terms (`int` for integral numbers, as introspection's json-type). */
export function jsonType(value: unknown): string {
  if (value === null) return "null";
  if (Array.isArray(value)) return "array";
  switch (typeof value) {
    case "string":
      return "string";
    case "boolean":
      return "boolean";
    case "number":
      return Number.isInteger(value) ? "int" : "number";
    case "object":
      return "object";
    default:
      return typeof value;
  }
}

/** query-qmp-schema's answer, indexed the way clients use it: from commands and events to types. */
export class SchemaIndex {
  readonly #byName = new Map<string, SchemaInfo>();

  constructor(entries: readonly SchemaInfo[]) {
    for (const e of entries) {
      assert.ok(!this.#byName.has(e.name), `schema entry ${e.name} is listed once`);
      this.#byName.set(e.name, e);
    }
  }

  get entries(): SchemaInfo[] {
    return [...this.#byName.values()];
  }

  entry(name: string): SchemaInfo {
    const e = this.#byName.get(name);
    assert.ok(e, `schema has an entry named ${name}`);
    return e;
  }

  /** The members of the object type a command's or event's `arg-type` names. */
  argMembers(entity: string): Array<{ name: string; type: string; default?: null }> {
    const e = this.entry(entity);
    return this.members(e["arg-type"] as string);
  }

  members(typeName: string): Array<{ name: string; type: string; default?: null }> {
    const t = this.entry(typeName);
    assert.equal(t["meta-type"], "object", `${typeName} is an object type`);
    return t.members as Array<{ name: string; type: string; default?: null }>;
  }

  /**
   * The type at a path below a command's arguments or an event's data ("blockdev-backup", "sync"), or
   * undefined where the schema has no such member: what a client asks before it sends an option.
   */
  typeAt(entity: string, path: string): SchemaInfo | undefined {
    let typeName = this.entry(entity)["arg-type"] as string;
    for (const part of path.split(".")) {
      let t = this.entry(typeName);
      while (t["meta-type"] === "array") t = this.entry(t["element-type"] as string);
      if (t["meta-type"] !== "object") return undefined;
      const m = (t.members as Array<{ name: string; type: string }>).find((x) => x.name === part);
      if (!m) return undefined;
      typeName = m.type;
    }
    return this.entry(typeName);
  }

  accepts(entity: string, path: string): boolean {
    return this.typeAt(entity, path) !== undefined;
  }

  enumValues(entity: string, path: string): string[] {
    const t = this.typeAt(entity, path);
    assert.ok(t && t["meta-type"] === "enum", `${entity} ${path} is an enum`);
    return t.values as string[];
  }
}

export interface JobEventRecord {
  /** JOB_STATUS_CHANGE as `status:NAME`, other events by name. */
  readonly what: string;
  /** The data's member names with their JSON types, sorted. */
  readonly members: string;
}

/**
 * One job's events in order, each with its data's member types. QEMU drains the graph while it
 * attaches a job, which pauses and resumes the job at once (running, paused, running): that blip
 * means nothing to a client and drivetap has no drain, so it is taken out.
 */
export function jobEventRecords(events: readonly Record<string, unknown>[], id: string): JobEventRecord[] {
  const mine = events.filter((e) => {
    const data = e.data as Record<string, unknown> | undefined;
    return typeof e.event === "string" && data !== undefined && (data.id === id || data.device === id);
  });
  const out: JobEventRecord[] = [];
  for (const e of mine) {
    const data = e.data as Record<string, unknown>;
    const what = e.event === "JOB_STATUS_CHANGE" ? `status:${String(data.status)}` : String(e.event);
    const members = Object.keys(data)
      .sort()
      .map((k) => `${k}:${jsonType(data[k])}`)
      .join(",");
    out.push({ what, members });
  }
  for (let i = 0; i + 2 < out.length; i++) {
    if (
      out[i].what === "status:running" &&
      out[i + 1].what === "status:paused" &&
      out[i + 2].what === "status:running"
    ) {
      out.splice(i + 1, 2);
      i--;
    }
  }
  return out;
}

/**
 * Checks `actual` (a drivetap reply) against an expected member table: every expected member present
 * (or optional) with its JSON type, every other member named `x-...`. Returns the problems found.
 */
export function shapeProblems(
  actual: unknown,
  expected: ShapeSpec,
  where: string,
  problems: string[] = [],
): string[] {
  if (typeof expected === "string") {
    const got = jsonType(actual);
    const ok = expected === "any" || got === expected || (expected === "number" && got === "int");
    if (!ok) problems.push(`${where}: expected ${expected}, got ${got}`);
    return problems;
  }
  if (Array.isArray(expected)) {
    if (!Array.isArray(actual)) {
      problems.push(`${where}: expected array, got ${jsonType(actual)}`);
      return problems;
    }
    actual.forEach((item, i) => shapeProblems(item, expected[0], `${where}[${i}]`, problems));
    return problems;
  }
  if (jsonType(actual) !== "object") {
    problems.push(`${where}: expected object, got ${jsonType(actual)}`);
    return problems;
  }
  const obj = actual as Record<string, unknown>;
  for (const [key, spec] of Object.entries(expected)) {
    const optional = key.endsWith("?");
    const name = optional ? key.slice(0, -1) : key;
    if (!Object.hasOwn(obj, name)) {
      if (!optional) problems.push(`${where}.${name}: missing`);
      continue;
    }
    shapeProblems(obj[name], spec, `${where}.${name}`, problems);
  }
  for (const key of Object.keys(obj)) {
    if (!Object.hasOwn(expected, key) && !Object.hasOwn(expected, `${key}?`) && !key.startsWith("x-")) {
      problems.push(`${where}.${key}: not a QEMU member and not named x-...`);
    }
  }
  return problems;
}

/**
 * An expected shape: a JSON type name ("string", "int", "number", "boolean", "any"), `[element]` for
 * an array, or an object whose keys are member names (`name?` for an optional member).
 */
export type ShapeSpec = string | readonly [ShapeSpec] | { readonly [member: string]: ShapeSpec };
