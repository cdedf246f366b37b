/**
 * Incremental framing of what a server sends a client in the transmission phase: simple replies (with
 * the read data that follows them when structured replies are off) and structured reply chunks. Pure:
 * bytes in, messages out, however the bytes are split. Payloads are handed on as views of the received
 * chunks, never copied here; the receiver copies what it keeps before the next push.
 */
import { ProtocolError } from "../../core/errors.js";
import * as C from "./constants.js";

const TWO_32 = 2 ** 32;

export type ReplyMessage =
  | { readonly type: "simple"; readonly cookie: number; readonly error: number; readonly payload: Buffer[] }
  | {
      readonly type: "chunk";
      readonly cookie: number;
      readonly flags: number;
      readonly chunkType: number;
      readonly payload: Buffer[];
    };

export interface ReplyDecoderOptions {
  /** Largest structured chunk payload accepted; a longer one means the stream cannot be trusted. */
  readonly chunkBytesMax: number;
  /** For a simple reply without error: how many data bytes follow it (a read's length, else 0). */
  readonly simplePayloadBytes: (cookie: number) => number;
}

export class ReplyDecoder {
  readonly #options: ReplyDecoderOptions;
  readonly #onMessage: (m: ReplyMessage) => void;
  #chunks: Buffer[] = [];
  #headOffset = 0;
  #buffered = 0;
  /** A header waiting for its payload. */
  #pending: { readonly message: ReplyMessage; readonly length: number } | null = null;

  constructor(options: ReplyDecoderOptions, onMessage: (m: ReplyMessage) => void) {
    this.#options = options;
    this.#onMessage = onMessage;
  }

  /** Feeds received bytes. Throws ProtocolError on bytes that cannot be framed (drop the connection). */
  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
    for (;;) {
      if (this.#pending) {
        const { message, length } = this.#pending;
        if (this.#buffered < length) return;
        this.#pending = null;
        const payload = this.#take(length);
        this.#onMessage({ ...message, payload } as ReplyMessage);
        continue;
      }
      if (this.#buffered < 4) return;
      const magic = this.#peek(4).readUInt32BE(0);
      if (magic === C.NBD_SIMPLE_REPLY_MAGIC) {
        if (this.#buffered < C.NBD_SIMPLE_REPLY_BYTES) return;
        const h = this.#header(C.NBD_SIMPLE_REPLY_BYTES);
        const error = h.readUInt32BE(4);
        const cookie = h.readUInt32BE(8) * TWO_32 + h.readUInt32BE(12);
        const length = error === 0 ? this.#options.simplePayloadBytes(cookie) : 0;
        this.#pending = { message: { type: "simple", cookie, error, payload: [] }, length };
      } else if (magic === C.NBD_STRUCTURED_REPLY_MAGIC) {
        if (this.#buffered < C.NBD_STRUCTURED_HEADER_BYTES) return;
        const h = this.#header(C.NBD_STRUCTURED_HEADER_BYTES);
        const flags = h.readUInt16BE(4);
        const chunkType = h.readUInt16BE(6);
        const cookie = h.readUInt32BE(8) * TWO_32 + h.readUInt32BE(12);
        const length = h.readUInt32BE(16);
        if (length > this.#options.chunkBytesMax) {
          throw new ProtocolError(`reply chunk of ${length} bytes is past the limit`);
        }
        this.#pending = { message: { type: "chunk", cookie, flags, chunkType, payload: [] }, length };
      } else {
        throw new ProtocolError(`bad reply magic 0x${magic.toString(16)}`);
      }
    }
  }

  /** Consumes n header bytes: a view when they sit in one chunk (the common case), else a copy. */
  #header(n: number): Buffer {
    const first = this.#chunks[0];
    const at = this.#headOffset;
    if (first.length - at > n) {
      this.#headOffset += n;
      this.#buffered -= n;
      return first.subarray(at, at + n);
    }
    return Buffer.concat(this.#take(n));
  }

  #peek(n: number): Buffer {
    const first = this.#chunks[0];
    if (first.length - this.#headOffset >= n) return first.subarray(this.#headOffset, this.#headOffset + n);
    return Buffer.concat(this.#take(n, false));
  }

  /** The next n bytes as views; consumed unless `consume` is false. */
  #take(n: number, consume = true): Buffer[] {
    const out: Buffer[] = [];
    let i = 0;
    let off = this.#headOffset;
    let left = n;
    while (left > 0) {
      const c = this.#chunks[i];
      const k = Math.min(c.length - off, left);
      out.push(c.subarray(off, off + k));
      left -= k;
      off += k;
      if (off === c.length) {
        i++;
        off = 0;
      }
    }
    if (consume) {
      this.#chunks = i > 0 ? this.#chunks.slice(i) : this.#chunks;
      this.#headOffset = off;
      this.#buffered -= n;
    }
    return out;
  }
}
