/**
 * The arguments of `drivetap qmp COMMAND [ARGS...]`: one JSON object, or key=value words. A value is
 * taken as JSON when it parses as JSON (numbers, true/false, null, objects, arrays, quoted strings) and
 * as a plain string otherwise; dotted keys build nested objects (`file.driver=file`).
 */

/** The user's arguments cannot be turned into a QMP `arguments` object. */
export class QmpArgsError extends Error {}

type Obj = Record<string, unknown>;

function isObject(value: unknown): value is Obj {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** Sets an own property, even for the key `__proto__`. */
function put(obj: Obj, key: string, value: unknown): void {
  Object.defineProperty(obj, key, { value, enumerable: true, writable: true, configurable: true });
}

function parseValue(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** Returns the `arguments` object, or undefined when there are no arguments. */
export function parseQmpArgs(words: readonly string[]): Obj | undefined {
  if (words.length === 0) return undefined;
  if (words[0].trimStart().startsWith("{")) {
    if (words.length > 1) throw new QmpArgsError("give either one JSON object or key=value pairs, not both");
    let value: unknown;
    try {
      value = JSON.parse(words[0]);
    } catch (err) {
      throw new QmpArgsError(`the arguments are not valid JSON: ${(err as Error).message}`);
    }
    if (!isObject(value)) throw new QmpArgsError("the JSON arguments must be an object");
    return value;
  }
  const args: Obj = Object.create(null) as Obj;
  for (const word of words) {
    const eq = word.indexOf("=");
    if (eq <= 0) throw new QmpArgsError(`expected key=value or one JSON object, got '${word}'`);
    const key = word.slice(0, eq);
    const parts = key.split(".");
    if (parts.some((p) => p === "")) throw new QmpArgsError(`bad key '${key}'`);
    let obj = args;
    for (let i = 0; i < parts.length - 1; i++) {
      const here = parts.slice(0, i + 1).join(".");
      if (!Object.hasOwn(obj, parts[i])) {
        const child = Object.create(null) as Obj;
        put(obj, parts[i], child);
        obj = child;
      } else {
        const existing = obj[parts[i]];
        if (!isObject(existing))
          throw new QmpArgsError(`'${here}' is given both as a value and as an object`);
        obj = existing;
      }
    }
    const last = parts[parts.length - 1];
    if (Object.hasOwn(obj, last)) throw new QmpArgsError(`'${key}' is given twice`);
    put(obj, last, parseValue(word.slice(eq + 1)));
  }
  return args;
}
