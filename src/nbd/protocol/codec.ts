/**
 * The NBD wire format as pure functions over buffers: encoders and decoders for the handshake and
 * transmission phases, for both sides. No sockets, no state; ServerDecoder (decoder.ts) adds the
 * incremental framing. Every peer-supplied length is checked before anything is allocated for it.
 */
import { ProtocolError } from "../../core/errors.js";
import * as C from "./constants.js";

/** A 64-bit cookie kept as two 32-bit halves, so the hot path allocates no BigInt. */
export interface Cookie {
  readonly hi: number;
  readonly lo: number;
}

export interface RequestHeader {
  readonly flags: number;
  readonly type: number;
  readonly cookieHi: number;
  readonly cookieLo: number;
  /** Exact below 2^53; larger values are still larger than any export, which is all that matters. */
  readonly offset: number;
  readonly length: number;
}

const TWO_32 = 4294967296;

// ---- handshake: server side -------------------------------------------------------------------------

export function encodeServerGreeting(handshakeFlags: number): Buffer {
  const b = Buffer.allocUnsafe(C.NBD_HANDSHAKE_BYTES);
  b.writeBigUInt64BE(C.NBD_MAGIC, 0);
  b.writeBigUInt64BE(C.NBD_IHAVEOPT, 8);
  b.writeUInt16BE(handshakeFlags, 16);
  return b;
}

export function encodeOptionReply(option: number, type: number, data: Buffer = EMPTY): Buffer {
  const b = Buffer.allocUnsafe(C.NBD_OPTION_REPLY_HEADER_BYTES + data.length);
  b.writeBigUInt64BE(C.NBD_REP_MAGIC, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

const EMPTY = Buffer.alloc(0);

export function encodeInfoExport(size: number, transmissionFlags: number): Buffer {
  const b = Buffer.allocUnsafe(12);
  b.writeUInt16BE(C.NBD_INFO_EXPORT, 0);
  b.writeBigUInt64BE(BigInt(size), 2);
  b.writeUInt16BE(transmissionFlags, 10);
  return b;
}

export function encodeInfoString(infoType: number, text: string): Buffer {
  const s = Buffer.from(text, "utf8");
  const b = Buffer.allocUnsafe(2 + s.length);
  b.writeUInt16BE(infoType, 0);
  s.copy(b, 2);
  return b;
}

export function encodeInfoBlockSize(minimum: number, preferred: number, maximum: number): Buffer {
  const b = Buffer.allocUnsafe(14);
  b.writeUInt16BE(C.NBD_INFO_BLOCK_SIZE, 0);
  b.writeUInt32BE(minimum, 2);
  b.writeUInt32BE(preferred, 6);
  b.writeUInt32BE(maximum, 10);
  return b;
}

/** NBD_REP_SERVER payload: name length, name, description. */
export function encodeServerEntry(name: string, description: string): Buffer {
  const n = Buffer.from(name, "utf8");
  const d = Buffer.from(description, "utf8");
  const b = Buffer.allocUnsafe(4 + n.length + d.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  d.copy(b, 4 + n.length);
  return b;
}

export function encodeMetaContext(id: number, name: string): Buffer {
  const n = Buffer.from(name, "utf8");
  const b = Buffer.allocUnsafe(4 + n.length);
  b.writeUInt32BE(id, 0);
  n.copy(b, 4);
  return b;
}

/** The reply to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero bytes unless NO_ZEROES. */
export function encodeExportNameReply(size: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  const b = Buffer.alloc(10 + (noZeroes ? 0 : C.NBD_EXPORT_NAME_PAD_BYTES));
  b.writeBigUInt64BE(BigInt(size), 0);
  b.writeUInt16BE(transmissionFlags, 8);
  return b;
}

function readString(data: Buffer, offset: number, length: number, what: string): string {
  if (length > C.NBD_STRING_BYTES_MAX)
    throw new ProtocolError(`${what} longer than ${C.NBD_STRING_BYTES_MAX} bytes`);
  if (offset + length > data.length) throw new ProtocolError(`${what} runs past the option data`);
  const s = data.toString("utf8", offset, offset + length);
  if (s.includes("\0")) throw new ProtocolError(`${what} contains NUL`);
  return s;
}

/** NBD_OPT_INFO / NBD_OPT_GO data: name length, name, count of info requests, the requests. */
export function decodeExportRequest(data: Buffer): { name: string; infos: number[] } {
  if (data.length < 6) throw new ProtocolError("option data too short for an export request");
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 6) throw new ProtocolError("export name length exceeds option data");
  const name = readString(data, 4, nameLength, "export name");
  const count = data.readUInt16BE(4 + nameLength);
  if (data.length !== 6 + nameLength + 2 * count)
    throw new ProtocolError("info request count does not match option length");
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(6 + nameLength + 2 * i));
  return { name, infos };
}

/** NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data. */
export function decodeMetaContextRequest(data: Buffer): { exportName: string; queries: string[] } {
  if (data.length < 8) throw new ProtocolError("option data too short for a meta context request");
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 8) throw new ProtocolError("export name length exceeds option data");
  const exportName = readString(data, 4, nameLength, "export name");
  let pos = 4 + nameLength;
  const count = data.readUInt32BE(pos);
  pos += 4;
  // Each query needs at least its 4-byte length: bound the count by the data before looping.
  if (count > (data.length - pos) / 4)
    throw new ProtocolError("meta context query count exceeds option data");
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (pos + 4 > data.length) throw new ProtocolError("meta context query runs past the option data");
    const len = data.readUInt32BE(pos);
    pos += 4;
    queries.push(readString(data, pos, len, "meta context query"));
    pos += len;
  }
  if (pos !== data.length) throw new ProtocolError("trailing bytes after meta context queries");
  return { exportName, queries };
}

// ---- handshake: client side (for the client driver and tests) --------------------------------------

export function encodeClientFlags(flags: number): Buffer {
  const b = Buffer.allocUnsafe(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

export function encodeOption(option: number, data: Buffer = EMPTY): Buffer {
  const b = Buffer.allocUnsafe(C.NBD_OPTION_HEADER_BYTES + data.length);
  b.writeBigUInt64BE(C.NBD_IHAVEOPT, 0);
  b.writeUInt32BE(option >>> 0, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, 16);
  return b;
}

export function encodeExportRequest(name: string, infos: readonly number[]): Buffer {
  const n = Buffer.from(name, "utf8");
  const b = Buffer.allocUnsafe(6 + n.length + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  b.writeUInt16BE(infos.length, 4 + n.length);
  infos.forEach((info, i) => b.writeUInt16BE(info, 6 + n.length + 2 * i));
  return b;
}

export function encodeMetaContextRequest(exportName: string, queries: readonly string[]): Buffer {
  const parts = [Buffer.from(exportName, "utf8")];
  const head = Buffer.allocUnsafe(4);
  head.writeUInt32BE(parts[0].length, 0);
  const count = Buffer.allocUnsafe(4);
  count.writeUInt32BE(queries.length, 0);
  const out = [head, parts[0], count];
  for (const q of queries) {
    const s = Buffer.from(q, "utf8");
    const l = Buffer.allocUnsafe(4);
    l.writeUInt32BE(s.length, 0);
    out.push(l, s);
  }
  return Buffer.concat(out);
}

export interface OptionReplyHeader {
  readonly option: number;
  readonly type: number;
  readonly length: number;
}

export function decodeOptionReplyHeader(b: Buffer): OptionReplyHeader {
  if (b.readBigUInt64BE(0) !== C.NBD_REP_MAGIC) throw new ProtocolError("bad option reply magic");
  return { option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

// ---- transmission -----------------------------------------------------------------------------------

export function encodeRequest(h: RequestHeader): Buffer {
  const b = Buffer.allocUnsafe(C.NBD_REQUEST_HEADER_BYTES);
  b.writeUInt32BE(C.NBD_REQUEST_MAGIC, 0);
  b.writeUInt16BE(h.flags, 4);
  b.writeUInt16BE(h.type, 6);
  b.writeUInt32BE(h.cookieHi >>> 0, 8);
  b.writeUInt32BE(h.cookieLo >>> 0, 12);
  b.writeUInt32BE(Math.floor(h.offset / TWO_32), 16);
  b.writeUInt32BE(h.offset % TWO_32, 20);
  b.writeUInt32BE(h.length >>> 0, 24);
  return b;
}

/** Decodes the 28 bytes at `at`. The caller has checked the magic with requestMagicAt. */
export function decodeRequest(b: Buffer, at: number): RequestHeader {
  return {
    flags: b.readUInt16BE(at + 4),
    type: b.readUInt16BE(at + 6),
    cookieHi: b.readUInt32BE(at + 8),
    cookieLo: b.readUInt32BE(at + 12),
    offset: b.readUInt32BE(at + 16) * TWO_32 + b.readUInt32BE(at + 20),
    length: b.readUInt32BE(at + 24),
  };
}

export function writeSimpleReply(
  b: Buffer,
  at: number,
  error: number,
  cookieHi: number,
  cookieLo: number,
): void {
  b.writeUInt32BE(C.NBD_SIMPLE_REPLY_MAGIC, at);
  b.writeUInt32BE(error, at + 4);
  b.writeUInt32BE(cookieHi, at + 8);
  b.writeUInt32BE(cookieLo, at + 12);
}

export function encodeSimpleReply(error: number, cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(C.NBD_SIMPLE_REPLY_BYTES);
  writeSimpleReply(b, 0, error, cookieHi, cookieLo);
  return b;
}

export function writeStructuredHeader(
  b: Buffer,
  at: number,
  flags: number,
  type: number,
  cookieHi: number,
  cookieLo: number,
  length: number,
): void {
  b.writeUInt32BE(C.NBD_STRUCTURED_REPLY_MAGIC, at);
  b.writeUInt16BE(flags, at + 4);
  b.writeUInt16BE(type, at + 6);
  b.writeUInt32BE(cookieHi, at + 8);
  b.writeUInt32BE(cookieLo, at + 12);
  b.writeUInt32BE(length, at + 16);
}

/** Bytes before the data in an OFFSET_DATA chunk: header plus the 8-byte offset. */
export const OFFSET_DATA_PREFIX_BYTES = C.NBD_STRUCTURED_HEADER_BYTES + 8;

export function writeOffsetDataPrefix(
  b: Buffer,
  at: number,
  flags: number,
  cookieHi: number,
  cookieLo: number,
  offset: number,
  dataLength: number,
): void {
  writeStructuredHeader(b, at, flags, C.NBD_REPLY_TYPE_OFFSET_DATA, cookieHi, cookieLo, 8 + dataLength);
  b.writeUInt32BE(Math.floor(offset / TWO_32), at + 20);
  b.writeUInt32BE(offset % TWO_32, at + 24);
}

export function encodeHoleChunk(
  flags: number,
  cookieHi: number,
  cookieLo: number,
  offset: number,
  length: number,
): Buffer {
  const b = Buffer.allocUnsafe(C.NBD_STRUCTURED_HEADER_BYTES + 12);
  writeStructuredHeader(b, 0, flags, C.NBD_REPLY_TYPE_OFFSET_HOLE, cookieHi, cookieLo, 12);
  b.writeUInt32BE(Math.floor(offset / TWO_32), 20);
  b.writeUInt32BE(offset % TWO_32, 24);
  b.writeUInt32BE(length, 28);
  return b;
}

export function encodeNoneChunk(cookieHi: number, cookieLo: number): Buffer {
  const b = Buffer.allocUnsafe(C.NBD_STRUCTURED_HEADER_BYTES);
  writeStructuredHeader(b, 0, C.NBD_REPLY_FLAG_DONE, C.NBD_REPLY_TYPE_NONE, cookieHi, cookieLo, 0);
  return b;
}

/** An ERROR chunk (always the last chunk of its reply here). Messages are cut to the string limit. */
export function encodeErrorChunk(error: number, message: string, cookieHi: number, cookieLo: number): Buffer {
  const m = Buffer.from(message, "utf8").subarray(0, 1024);
  const b = Buffer.allocUnsafe(C.NBD_STRUCTURED_HEADER_BYTES + 6 + m.length);
  writeStructuredHeader(
    b,
    0,
    C.NBD_REPLY_FLAG_DONE,
    C.NBD_REPLY_TYPE_ERROR,
    cookieHi,
    cookieLo,
    6 + m.length,
  );
  b.writeUInt32BE(error, 20);
  b.writeUInt16BE(m.length, 24);
  m.copy(b, 26);
  return b;
}

export interface StatusDescriptor {
  readonly length: number;
  readonly flags: number;
}

export function encodeBlockStatusChunk(
  flags: number,
  cookieHi: number,
  cookieLo: number,
  contextId: number,
  descriptors: readonly StatusDescriptor[],
): Buffer {
  const payload = 4 + 8 * descriptors.length;
  const b = Buffer.allocUnsafe(C.NBD_STRUCTURED_HEADER_BYTES + payload);
  writeStructuredHeader(b, 0, flags, C.NBD_REPLY_TYPE_BLOCK_STATUS, cookieHi, cookieLo, payload);
  b.writeUInt32BE(contextId, 20);
  descriptors.forEach((d, i) => {
    b.writeUInt32BE(d.length, 24 + 8 * i);
    b.writeUInt32BE(d.flags, 28 + 8 * i);
  });
  return b;
}
