/**
 * Incremental framing of what a client sends a server: client flags, then options, then requests with
 * their write payloads. Pure: bytes in, messages out, whatever way the bytes are split. The server
 * switches the phase after a successful NBD_OPT_GO / NBD_OPT_EXPORT_NAME (enterTransmission), and
 * messages are delivered synchronously so the switch applies to the very next byte.
 *
 * Write payloads are handed on as sub-arrays of the received chunks, without copying. A ChunkTracker
 * learns which chunks and payload pieces are held, so the reader reuses a buffer only when nothing
 * refers to it (nbd/server/socket-reader.ts).
 */
import { ProtocolError } from "../../core/errors.js";
import * as C from "./constants.js";
import { decodeRequest, type RequestHeader } from "./codec.js";

export type ServerMessage =
  | { readonly type: "client-flags"; readonly flags: number }
  | { readonly type: "option"; readonly option: number; readonly data: Buffer }
  /** An option whose length is past the limit; the stream cannot be resynchronised after it. */
  | { readonly type: "option-too-big"; readonly option: number; readonly length: number }
  /** payload: the write data; null for other commands and for skipped oversize payloads. */
  | {
      readonly type: "request";
      readonly header: RequestHeader;
      readonly payload: Buffer[] | null;
      readonly oversize: boolean;
    };

export interface DecoderLimits {
  readonly optionBytesMax: number;
  /** Largest write payload accepted. */
  readonly payloadBytesMax: number;
  /** Larger payloads up to this are read and dropped so the connection survives; beyond it, close. */
  readonly payloadSkipBytesMax: number;
}

/**
 * Asked for every request header before the request is taken (before a write's payload is read). A
 * false answer holds the decoder: nothing more is consumed until resume(), and the same header is
 * offered again then. This is how a server admits requests one by one, however many arrive at once.
 */
export type Admit = (header: RequestHeader) => boolean;

/**
 * Told when the decoder starts and stops holding a received chunk, and when it hands a piece of one on
 * as a write payload (the receiver releases those pieces when done). Lets the reader recycle buffers.
 */
export interface ChunkTracker {
  retain(b: Buffer): void;
  release(b: Buffer): void;
}

const NO_TRACKER: ChunkTracker = { retain: () => {}, release: () => {} };

type Phase = "client-flags" | "options" | "transmission" | "stopped";

export class ServerDecoder {
  readonly #limits: DecoderLimits;
  readonly #onMessage: (m: ServerMessage) => void;
  #phase: Phase = "client-flags";
  #chunks: Buffer[] = [];
  #head = 0; // index of the first live chunk
  #headOffset = 0; // bytes already consumed from chunks[head]
  #buffered = 0;
  /** A request header waiting for its payload. */
  #pending: RequestHeader | null = null;
  #skipping = 0;
  #held = false;

  readonly #tracker: ChunkTracker;
  readonly #admit: Admit | null;

  constructor(
    limits: DecoderLimits,
    onMessage: (m: ServerMessage) => void,
    tracker: ChunkTracker = NO_TRACKER,
    admit: Admit | null = null,
  ) {
    this.#limits = limits;
    this.#onMessage = onMessage;
    this.#tracker = tracker;
    this.#admit = admit;
  }

  /** True while a request header waits for admission. */
  get held(): boolean {
    return this.#held;
  }

  /** True while an admitted write waits for the rest of its payload. */
  get awaitingPayload(): boolean {
    return this.#pending !== null;
  }

  /** Offers the held header again and goes on decoding what is buffered. */
  resume(): void {
    if (!this.#held) return;
    this.#held = false;
    this.#drain();
  }

  get phase(): Phase {
    return this.#phase;
  }

  get bufferedBytes(): number {
    return this.#buffered;
  }

  enterTransmission(): void {
    this.#phase = "transmission";
  }

  /** No more messages after this one (abort, fatal error, disconnect). */
  stop(): void {
    this.#phase = "stopped";
    this.#held = false;
    for (let i = this.#head; i < this.#chunks.length; i++) this.#tracker.release(this.#chunks[i]);
    this.#chunks = [];
    this.#head = 0;
    this.#headOffset = 0;
    this.#buffered = 0;
  }

  /** Feeds received bytes. Throws ProtocolError for input that cannot be framed (close the connection). */
  push(chunk: Buffer): void {
    if (this.#phase === "stopped" || chunk.length === 0) return;
    this.#tracker.retain(chunk);
    this.#chunks.push(chunk);
    this.#buffered += chunk.length;
    if (!this.#held) this.#drain();
  }

  #drain(): void {
    for (;;) {
      const phase = this.#phase;
      if (phase === "stopped" || this.#held) return;
      if (this.#skipping > 0) {
        const n = Math.min(this.#skipping, this.#buffered);
        this.#skip(n);
        this.#skipping -= n;
        if (this.#skipping > 0) return;
        const header = this.#pending!;
        this.#pending = null;
        this.#onMessage({ type: "request", header, payload: null, oversize: true });
        continue;
      }
      if (this.#pending) {
        const header = this.#pending;
        if (this.#buffered < header.length) return;
        this.#pending = null;
        const payload = this.#takeIov(header.length);
        this.#onMessage({ type: "request", header, payload, oversize: false });
        continue;
      }
      if (phase === "client-flags") {
        if (this.#buffered < 4) return;
        const flags = this.#take(4).readUInt32BE(0);
        this.#phase = "options";
        this.#onMessage({ type: "client-flags", flags });
      } else if (phase === "options") {
        if (this.#buffered < C.NBD_OPTION_HEADER_BYTES) return;
        const h = this.#peek(C.NBD_OPTION_HEADER_BYTES);
        if (h.readBigUInt64BE(0) !== C.NBD_IHAVEOPT) throw new ProtocolError("bad option magic");
        const option = h.readUInt32BE(8);
        const length = h.readUInt32BE(12);
        if (length > this.#limits.optionBytesMax) {
          this.#phase = "stopped";
          this.#onMessage({ type: "option-too-big", option, length });
          return;
        }
        if (this.#buffered < C.NBD_OPTION_HEADER_BYTES + length) return;
        this.#skip(C.NBD_OPTION_HEADER_BYTES);
        const data = length > 0 ? Buffer.from(this.#take(length)) : Buffer.alloc(0);
        this.#onMessage({ type: "option", option, data });
      } else {
        if (this.#buffered < C.NBD_REQUEST_HEADER_BYTES) return;
        const [buf, at] = this.#contiguous(C.NBD_REQUEST_HEADER_BYTES);
        if (buf.readUInt32BE(at) !== C.NBD_REQUEST_MAGIC) throw new ProtocolError("bad request magic");
        const header = decodeRequest(buf, at);
        if (this.#admit !== null && !this.#admit(header)) {
          // The phase may have changed inside admit (a stop): only hold a live decoder.
          if (this.#phase === "transmission") this.#held = true;
          return;
        }
        this.#skip(C.NBD_REQUEST_HEADER_BYTES);
        if (header.type !== C.NBD_CMD_WRITE || header.length === 0) {
          this.#onMessage({ type: "request", header, payload: null, oversize: false });
        } else if (header.length <= this.#limits.payloadBytesMax) {
          this.#pending = header;
        } else if (header.length <= this.#limits.payloadSkipBytesMax) {
          this.#pending = header;
          this.#skipping = header.length;
        } else {
          throw new ProtocolError(`write payload of ${header.length} bytes is past any limit`);
        }
      }
    }
  }

  /** Returns [buffer, offset] holding n contiguous bytes, copying only when they span chunks. */
  #contiguous(n: number): [Buffer, number] {
    const first = this.#chunks[this.#head];
    if (first.length - this.#headOffset >= n) return [first, this.#headOffset];
    return [this.#peek(n), 0];
  }

  /** A copy of the next n bytes, without consuming them. */
  #peek(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    let i = this.#head;
    let off = this.#headOffset;
    while (filled < n) {
      const c = this.#chunks[i];
      const k = Math.min(c.length - off, n - filled);
      c.copy(out, filled, off, off + k);
      filled += k;
      i++;
      off = 0;
    }
    return out;
  }

  /** Consumes n bytes and returns them contiguous (a view when possible). */
  #take(n: number): Buffer {
    const [buf, at] = this.#contiguous(n);
    const view = buf.subarray(at, at + n);
    this.#skip(n);
    return view;
  }

  /** Consumes n bytes as views of the received chunks. */
  #takeIov(n: number): Buffer[] {
    const out: Buffer[] = [];
    let left = n;
    while (left > 0) {
      const c = this.#chunks[this.#head];
      const k = Math.min(c.length - this.#headOffset, left);
      const piece = c.subarray(this.#headOffset, this.#headOffset + k);
      this.#tracker.retain(piece);
      out.push(piece);
      this.#skip(k);
      left -= k;
    }
    return out;
  }

  #skip(n: number): void {
    this.#buffered -= n;
    while (n > 0) {
      const c = this.#chunks[this.#head];
      const k = Math.min(c.length - this.#headOffset, n);
      this.#headOffset += k;
      n -= k;
      if (this.#headOffset === c.length) {
        this.#tracker.release(c);
        this.#head++;
        this.#headOffset = 0;
      }
    }
    if (this.#head === this.#chunks.length) {
      this.#chunks = [];
      this.#head = 0;
    } else if (this.#head > 64) {
      this.#chunks = this.#chunks.slice(this.#head);
      this.#head = 0;
    }
  }
}
