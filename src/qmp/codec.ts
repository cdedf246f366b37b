/**
 * The QMP wire codec, with no I/O: an incremental splitter that cuts a byte stream into top-level JSON
 * values the way QEMU's JSON streamer does (by bracket depth, not by lines, so values may arrive back to
 * back or split across reads), and an encoder that writes QEMU's compact style (`{"return": {}}`, pure
 * ASCII). Both are bounded: input values by size and nesting depth, output by nesting depth.
 */
import { MiB } from "../core/units.js";

/** Longest top-level JSON value a client may send; longer ones are dropped and reported. */
export const QMP_INPUT_BYTES_MAX = 1 * MiB;
/** Deepest nesting of objects and arrays accepted (QEMU's limit too). */
export const QMP_INPUT_DEPTH_MAX = 1024;
/** Deepest nesting the encoder writes; deeper means a cycle or a bug in a handler's result. */
const OUTPUT_DEPTH_MAX = 1024;
/** Parser messages are cut to this length so an error reply never echoes a large input. */
const PARSE_DETAIL_CHARS_MAX = 200;

/** One top-level value from the stream: parsed, or the GenericError text QEMU would answer with. */
export type QmpInput =
  { readonly ok: true; readonly value: unknown } | { readonly ok: false; readonly desc: string };

export interface SplitterLimits {
  readonly bytesMax?: number;
  readonly depthMax?: number;
}

const QUOTE = 0x22;
const BACKSLASH = 0x5c;
const OPEN_BRACE = 0x7b;
const CLOSE_BRACE = 0x7d;
const OPEN_BRACKET = 0x5b;
const CLOSE_BRACKET = 0x5d;

function isSpace(b: number): boolean {
  return b === 0x20 || b === 0x0a || b === 0x0d || b === 0x09;
}

function endsScalar(b: number): boolean {
  return (
    isSpace(b) ||
    b === QUOTE ||
    b === OPEN_BRACE ||
    b === CLOSE_BRACE ||
    b === OPEN_BRACKET ||
    b === CLOSE_BRACKET
  );
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/**
 * Cuts top-level JSON values out of a byte stream. Scanning bytes is safe for UTF-8 input: every
 * structural character is ASCII and no byte of a multi-byte sequence is. A value that grows past the
 * size or depth limit is reported once and the rest of it is skipped (the scanner keeps tracking
 * strings and depth), so the next value is read normally.
 */
export class QmpInputSplitter {
  readonly #bytesMax: number;
  readonly #depthMax: number;
  /** Bytes of the current value from earlier chunks. */
  #parts: Buffer[] = [];
  #partsBytes = 0;
  #inValue = false;
  #skipping = false;
  #depth = 0;
  #inString = false;
  #escape = false;
  #inScalar = false;

  constructor(limits: SplitterLimits = {}) {
    this.#bytesMax = limits.bytesMax ?? QMP_INPUT_BYTES_MAX;
    this.#depthMax = limits.depthMax ?? QMP_INPUT_DEPTH_MAX;
  }

  /** True while part of a value has been seen and its end has not. */
  get pending(): boolean {
    return this.#inValue || this.#skipping;
  }

  /** Feeds one chunk; returns the values it completed, in order. */
  push(chunk: Uint8Array): QmpInput[] {
    const out: QmpInput[] = [];
    let start = 0; // where the current value starts in this chunk, when #inValue
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i];
      if (this.#inString) {
        if (this.#escape) this.#escape = false;
        else if (b === BACKSLASH) this.#escape = true;
        else if (b === QUOTE) {
          this.#inString = false;
          if (this.#depth === 0) this.#finishValue(chunk, start, i + 1, out);
        }
        continue;
      }
      if (this.#inScalar) {
        if (!endsScalar(b)) continue;
        this.#inScalar = false;
        this.#finishValue(chunk, start, i, out);
        // b itself is looked at below.
      }
      if (isSpace(b)) continue;
      if (this.#depth === 0 && !this.#skipping) {
        this.#inValue = true;
        start = i;
      }
      if (b === QUOTE) {
        this.#inString = true;
      } else if (b === OPEN_BRACE || b === OPEN_BRACKET) {
        this.#depth++;
        if (this.#depth > this.#depthMax && !this.#skipping) {
          this.#startSkipping("JSON nesting depth limit exceeded", out);
        }
      } else if (b === CLOSE_BRACE || b === CLOSE_BRACKET) {
        // A stray closer at depth 0 is a value of its own, which the parser rejects.
        if (this.#depth > 0) this.#depth--;
        if (this.#depth === 0) this.#finishValue(chunk, start, i + 1, out);
      } else if (this.#depth === 0) {
        this.#inScalar = true;
      }
    }
    if (this.#inValue) {
      const tail = chunk.length - start;
      if (this.#partsBytes + tail > this.#bytesMax) {
        this.#startSkipping("JSON input too long", out);
      } else if (tail > 0) {
        // Copied: the caller may reuse its chunk.
        this.#parts.push(Buffer.from(chunk.subarray(start)));
        this.#partsBytes += tail;
      }
    }
    return out;
  }

  /** The peer ended its stream: a trailing scalar is complete; a partial object is an error. */
  end(): QmpInput[] {
    const out: QmpInput[] = [];
    if (this.#inScalar) {
      this.#inScalar = false;
      this.#finishValue(new Uint8Array(0), 0, 0, out);
    } else if (this.#inValue) {
      this.#reset();
      out.push({ ok: false, desc: "JSON parse error, premature end of input" });
    } else {
      this.#reset();
    }
    return out;
  }

  #startSkipping(desc: string, out: QmpInput[]): void {
    out.push({ ok: false, desc });
    this.#parts = [];
    this.#partsBytes = 0;
    this.#inValue = false;
    this.#skipping = true;
  }

  #finishValue(chunk: Uint8Array, start: number, end: number, out: QmpInput[]): void {
    if (this.#skipping) {
      this.#skipping = false;
      return;
    }
    const bytes = this.#partsBytes + (end - start);
    const parts = this.#parts;
    this.#parts = [];
    this.#partsBytes = 0;
    this.#inValue = false;
    if (bytes > this.#bytesMax) {
      out.push({ ok: false, desc: "JSON input too long" });
      return;
    }
    const piece = chunk.subarray(start, end);
    out.push(parseValue(parts.length === 0 ? piece : Buffer.concat([...parts, piece])));
  }

  #reset(): void {
    this.#parts = [];
    this.#partsBytes = 0;
    this.#inValue = false;
    this.#skipping = false;
    this.#depth = 0;
    this.#inString = false;
    this.#escape = false;
    this.#inScalar = false;
  }
}

function parseValue(bytes: Uint8Array): QmpInput {
  let text: string;
  try {
    text = utf8.decode(bytes);
  } catch {
    return { ok: false, desc: "JSON parse error, invalid UTF-8 sequence" };
  }
  try {
    return { ok: true, value: JSON.parse(text) };
  } catch (err) {
    return { ok: false, desc: `JSON parse error, ${parseDetail(err)}` };
  }
}

/** V8's message without the copy of the input it sometimes appends. */
function parseDetail(err: unknown): string {
  const message = err instanceof Error ? err.message : String(err);
  const detail = message.replace(/, ".*" is not valid JSON$/s, "");
  return detail.length > PARSE_DETAIL_CHARS_MAX ? `${detail.slice(0, PARSE_DETAIL_CHARS_MAX)}...` : detail;
}

/**
 * Encodes a value as QEMU writes it: `", "` and `": "` separators, every character outside printable
 * ASCII escaped as \uXXXX. undefined members and functions are left out as JSON.stringify does; bigints
 * are written as integers (QMP sizes are 64-bit). Throws on nesting deeper than the output limit.
 */
export function encodeQmp(value: unknown): string {
  const out: string[] = [];
  encodeInto(value, out, 0);
  return out.join("");
}

function encodeInto(value: unknown, out: string[], depth: number): void {
  if (depth > OUTPUT_DEPTH_MAX) throw new Error("QMP output nested too deeply (a cycle?)");
  if (
    value !== null &&
    typeof value === "object" &&
    typeof (value as { toJSON?: unknown }).toJSON === "function"
  ) {
    value = (value as { toJSON(): unknown }).toJSON();
  }
  switch (typeof value) {
    case "string":
      out.push(encodeString(value));
      return;
    case "number":
      out.push(Number.isFinite(value) ? String(value) : "null");
      return;
    case "bigint":
      out.push(value.toString());
      return;
    case "boolean":
      out.push(value ? "true" : "false");
      return;
    case "object":
      break;
    default:
      // undefined, functions and symbols outside an object: as JSON.stringify writes them in arrays.
      out.push("null");
      return;
  }
  if (value === null) {
    out.push("null");
  } else if (Array.isArray(value)) {
    out.push("[");
    value.forEach((item, i) => {
      if (i > 0) out.push(", ");
      encodeInto(item, out, depth + 1);
    });
    out.push("]");
  } else {
    out.push("{");
    let first = true;
    for (const [key, member] of Object.entries(value)) {
      if (member === undefined || typeof member === "function" || typeof member === "symbol") continue;
      if (!first) out.push(", ");
      first = false;
      out.push(encodeString(key), ": ");
      encodeInto(member, out, depth + 1);
    }
    out.push("}");
  }
}

function encodeString(s: string): string {
  return JSON.stringify(s).replace(
    /[\u007f-\uffff]/g,
    (c) => `\\u${c.charCodeAt(0).toString(16).toUpperCase().padStart(4, "0")}`,
  );
}
