/**
 * QEMU's keyval syntax for command-line options (`driver=file,node-name=f0,file.filename=x`), and
 * the typing of its strings by a QMP schema, as QEMU's keyval input visitor does: `k=v` pairs split
 * at `,` (`,,` is a literal comma), dotted keys nest, keys that are all decimal numbers make a list,
 * the first pair may omit its key (the "implied key": qom-type for --object, driver for --blockdev).
 * A key given twice keeps the last value, as in QEMU. Errors carry QEMU's texts.
 */
import type { ArgsSpec, TypeSpec } from "../qmp/schema.js";

/** Length of one option argument; QEMU has none, but nothing legitimate comes near. */
export const KEYVAL_ARG_CHARS_MAX = 64 * 1024;
/** Key=value pairs in one argument. */
export const KEYVAL_PAIRS_MAX = 1024;
/** Length of one key fragment (QEMU's own bound). */
export const KEYVAL_KEY_FRAGMENT_CHARS_MAX = 127;

export class KeyvalError extends Error {}

export type KeyvalValue = string | KeyvalTree | KeyvalValue[];
export interface KeyvalTree {
  [key: string]: KeyvalValue;
}

const FRAGMENT = /^[A-Za-z0-9_-]+$/;

/** Parses `text`; `impliedKey` names the value of a first pair without `=`. */
export function parseKeyval(text: string, impliedKey?: string): KeyvalTree {
  if (text.length > KEYVAL_ARG_CHARS_MAX) {
    throw new KeyvalError(`Option argument longer than ${KEYVAL_ARG_CHARS_MAX} characters`);
  }
  const root: KeyvalTree = {};
  let pos = 0;
  let pairs = 0;
  while (pos < text.length) {
    if (++pairs > KEYVAL_PAIRS_MAX) throw new KeyvalError(`More than ${KEYVAL_PAIRS_MAX} parameters`);
    // The key runs to '=' or ','; a first pair without '=' is the implied key's value.
    let end = pos;
    while (end < text.length && text[end] !== "=" && text[end] !== ",") end++;
    let key: string;
    if (pairs === 1 && impliedKey !== undefined && text[end] !== "=") {
      key = impliedKey;
    } else {
      key = text.slice(pos, end);
      const fragments = key.split(".");
      if (fragments.some((f) => !FRAGMENT.test(f) || f.length > KEYVAL_KEY_FRAGMENT_CHARS_MAX)) {
        throw new KeyvalError(`Invalid parameter '${key}'`);
      }
      if (text[end] !== "=") throw new KeyvalError(`Expected '=' after parameter '${key}'`);
      pos = end + 1;
    }
    let value = "";
    while (pos < text.length) {
      if (text[pos] === ",") {
        if (text[pos + 1] !== ",") break;
        pos++;
      }
      value += text[pos++];
    }
    pos++; // the ',' (or past the end)
    insert(root, key.split("."), value);
  }
  return listify(root, "") as KeyvalTree;
}

function insert(root: KeyvalTree, fragments: readonly string[], value: string): void {
  let tree = root;
  for (let i = 0; i < fragments.length - 1; i++) {
    const next = tree[fragments[i]];
    if (next === undefined) tree = tree[fragments[i]] = {};
    else if (typeof next === "string") {
      throw new KeyvalError(`Parameters '${fragments.slice(0, i + 1).join(".")}.*' used inconsistently`);
    } else tree = next as KeyvalTree;
  }
  const last = fragments[fragments.length - 1];
  if (typeof tree[last] === "object") {
    throw new KeyvalError(`Parameters '${fragments.join(".")}.*' used inconsistently`);
  }
  tree[last] = value;
}

/** Turns every tree whose keys are all decimal numbers into a list; they must be 0..n-1. */
function listify(tree: KeyvalTree, path: string): KeyvalValue {
  const keys = Object.keys(tree);
  const numeric = keys.filter((k) => /^\d+$/.test(k));
  const prefix = path === "" ? "" : `${path}.`;
  for (const k of keys) {
    const v = tree[k];
    if (typeof v === "object") tree[k] = listify(v as KeyvalTree, prefix + k);
  }
  if (numeric.length === 0 || path === "") return tree;
  if (numeric.length !== keys.length) throw new KeyvalError(`Parameters '${path}.*' used inconsistently`);
  const list: KeyvalValue[] = [];
  for (let i = 0; i < keys.length; i++) {
    if (!Object.hasOwn(tree, String(i))) throw new KeyvalError(`Parameter '${prefix}${i}' missing`);
    list.push(tree[String(i)]);
  }
  return list;
}

/** Where an `any` member gets its types from (blockdev's inline `file`, nbd's `server`). */
export type AnyResolver = (name: string) => ArgsSpec | undefined;

/**
 * Gives a parsed tree the types `spec` asks for: integers and numbers from their digits, booleans
 * from on/off (also yes/no, true/false, y/n, as QEMU). Members the spec does not know stay strings
 * for the validator to refuse by name.
 */
export function typeKeyval(
  tree: KeyvalTree,
  spec: ArgsSpec,
  resolve: AnyResolver = () => undefined,
): Record<string, unknown> {
  return typeObject(tree, spec, "", resolve);
}

function typeObject(
  tree: KeyvalTree,
  spec: ArgsSpec,
  path: string,
  resolve: AnyResolver,
): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const [key, value] of Object.entries(tree)) {
    const field = Object.hasOwn(spec, key) ? spec[key] : undefined;
    const name = path === "" ? key : `${path}.${key}`;
    out[key] = field === undefined ? value : typeValue(value, field, name, key, resolve);
  }
  return out;
}

function typeValue(
  value: KeyvalValue,
  spec: TypeSpec,
  name: string,
  key: string,
  resolve: AnyResolver,
): unknown {
  switch (spec.type) {
    case "int":
    case "number":
      if (typeof value !== "string") return value;
      return parseNumber(value, spec.type, name);
    case "bool":
      if (typeof value !== "string") return value;
      if (["on", "yes", "true", "y"].includes(value)) return true;
      if (["off", "no", "false", "n"].includes(value)) return false;
      throw new KeyvalError(`Parameter '${name}' expects 'on' or 'off'`);
    case "object":
      return isTree(value) ? typeObject(value, spec.fields, name, resolve) : value;
    case "array":
      return Array.isArray(value)
        ? value.map((v, i) => typeValue(v, spec.items, `${name}.${i}`, key, resolve))
        : value;
    case "any": {
      const inner = resolve(key);
      return inner && isTree(value) ? typeObject(value, inner, name, resolve) : value;
    }
    default:
      return value;
  }
}

function isTree(v: KeyvalValue): v is KeyvalTree {
  return typeof v === "object" && !Array.isArray(v);
}

function parseNumber(text: string, type: "int" | "number", name: string): number {
  if (type === "int") {
    if (/^-?(0|[1-9]\d*)$/.test(text) || /^0x[0-9a-f]+$/i.test(text)) {
      const n = Number(text);
      if (Number.isSafeInteger(n)) return n;
    }
    throw new KeyvalError(`Parameter '${name}' expects integer`);
  }
  const n = Number(text);
  if (text.trim() === "" || !Number.isFinite(n)) throw new KeyvalError(`Parameter '${name}' expects number`);
  return n;
}

/** QEMU's escaping of a value for keyval: every ',' doubled. */
export function escapeKeyvalValue(value: string): string {
  return value.replaceAll(",", ",,");
}
