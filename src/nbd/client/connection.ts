/**
 * One client connection to an NBD server: the fixed-newstyle handshake (STARTTLS when TLS
 * credentials are given, structured replies, base:allocation, NBD_OPT_GO with block sizes), then
 * pipelined requests matched to replies by cookie. With TLS, everything after STARTTLS (the rest of
 * the negotiation, requests, replies) goes through the TLS socket that wraps the TCP or unix one.
 * A connection never reconnects; when it ends, every request still waiting fails with ENOTCONN and
 * `closed` resolves. The driver above (nbd-driver.ts) owns reconnecting.
 */
import * as net from "node:net";
import { BlockError, fromNbdErrno, ProtocolError } from "../../core/errors.js";
import { MiB } from "../../core/units.js";
import type { Extent } from "../../block/driver.js";
import * as C from "../protocol/constants.js";
import {
  decodeOptionReplyHeader,
  encodeClientFlags,
  encodeExportRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
} from "../protocol/codec.js";
import { ReplyDecoder, type ReplyMessage } from "../protocol/reply-decoder.js";
import {
  checkStartTlsReply,
  describeTlsClose,
  describeTlsError,
  upgradeToTls,
  type ClientTls,
} from "./starttls.js";

export type { ClientTls } from "./starttls.js";

export type ServerAddress =
  | { readonly type: "unix"; readonly path: string }
  | { readonly type: "inet"; readonly host: string; readonly port: number };

/** Largest single request we send; larger I/O is split by the driver. */
export const CLIENT_REQUEST_BYTES_MAX = 32 * MiB;
/** Option replies longer than this end the handshake (a sane server's are tiny). */
export const OPTION_REPLY_BYTES_MAX = 64 * 1024;
/** Requests on the wire at once; more wait in a queue. */
export const CLIENT_IN_FLIGHT_MAX = 256;

export interface ExportInfo {
  readonly size: number;
  readonly transmissionFlags: number;
  readonly structured: boolean;
  /** The base:allocation context id, or null when block status is not available. */
  readonly allocationContext: number | null;
  readonly minimumBlockBytes: number;
  readonly maximumRequestBytes: number;
}

interface Pending {
  readonly type: number;
  readonly offset: number;
  readonly length: number;
  readonly into: Buffer | null;
  readonly resolve: (extents: Extent[] | null) => void;
  readonly reject: (err: Error) => void;
  error: BlockError | null;
  extents: Extent[] | null;
  readonly sentAtMs: number;
}

function notConnected(message: string): BlockError {
  return new BlockError("ENOTCONN", message);
}

/** Sequential reads during the handshake. */
class HandshakeReader {
  #chunks: Buffer[] = [];
  #buffered = 0;
  #wake: (() => void) | null = null;
  #ended: Error | null = null;
  readonly #socket: net.Socket;

  /**
   * `describeError` turns a socket error (a TLS alert after the handshake) into the reason given;
   * `describeSilentClose` names the reason for a close before the server sent anything (over TLS
   * 1.3 a server refusing our certificate may just hang up after the handshake).
   */
  constructor(
    socket: net.Socket,
    describeError: (err: Error) => Error = (e) => e,
    describeSilentClose?: () => Error,
  ) {
    this.#socket = socket;
    this.#describeSilentClose = describeSilentClose;
    this.#onError = (err: Error): void => {
      this.#ended ??= describeError(err);
      this.#wake?.();
    };
    socket.on("data", this.#onData);
    socket.on("error", this.#onError);
    socket.on("close", this.#onClose);
  }

  readonly #onError: (err: Error) => void;

  readonly #describeSilentClose: (() => Error) | undefined;
  #received = false;

  readonly #onClose = (): void => {
    if (!this.#received && this.#describeSilentClose) this.#ended ??= this.#describeSilentClose();
    this.#ended ??= notConnected("the server closed the connection during the handshake");
    this.#wake?.();
  };

  readonly #onData = (b: Buffer): void => {
    this.#received = true;
    this.#chunks.push(b);
    this.#buffered += b.length;
    this.#wake?.();
  };

  /** Stops reading; returns what was received but not read. */
  detach(): Buffer {
    this.#socket.off("data", this.#onData);
    this.#socket.off("error", this.#onError);
    this.#socket.off("close", this.#onClose);
    const rest = Buffer.concat(this.#chunks);
    this.#chunks = [];
    return rest;
  }

  async read(n: number): Promise<Buffer> {
    while (this.#buffered < n) {
      if (this.#ended) throw this.#ended;
      await new Promise<void>((r) => (this.#wake = r));
      this.#wake = null;
    }
    const all = Buffer.concat(this.#chunks);
    this.#chunks = all.length > n ? [all.subarray(n)] : [];
    this.#buffered -= n;
    return all.subarray(0, n);
  }
}

/** The socket a handshake is running on and the reader taking its bytes. */
interface Session {
  socket: net.Socket;
  reader: HandshakeReader | null;
}

export class NbdConnection {
  readonly info: ExportInfo;
  readonly #socket: net.Socket;
  readonly #pending = new Map<number, Pending>();
  readonly #queue: Array<() => void> = [];
  #nextCookie = 1;
  #corked = false;
  readonly #uncork = (): void => {
    this.#corked = false;
    this.#socket.uncork();
  };
  #closedError: BlockError | null = null;
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket, info: ExportInfo, leftover: Buffer) {
    this.#socket = socket;
    this.info = info;
    const decoder = new ReplyDecoder(
      {
        chunkBytesMax: CLIENT_REQUEST_BYTES_MAX + 64,
        simplePayloadBytes: (cookie) => {
          const p = this.#pending.get(cookie);
          return p && p.type === C.NBD_CMD_READ ? p.length : 0;
        },
      },
      (m) => this.#onReply(m),
    );
    this.closed = new Promise<void>((resolve) => {
      socket.on("close", () => {
        this.#fail(notConnected("the connection to the NBD server was lost"));
        resolve();
      });
    });
    socket.on("error", () => {}); // 'close' follows and carries the outcome
    socket.on("data", (b: Buffer) => {
      try {
        decoder.push(b);
      } catch (err) {
        this.destroy(`protocol error from the server: ${(err as Error).message}`);
      }
    });
    if (leftover.length > 0) decoder.push(leftover);
  }

  /**
   * Connects and negotiates (over TLS when `tls` is given); fails with ENOTCONN when the server is
   * unreachable, refuses TLS or the export, or the TLS handshake fails.
   */
  static async open(
    address: ServerAddress,
    exportName: string,
    timeoutMs: number,
    tls?: ClientTls,
  ): Promise<NbdConnection> {
    const plain =
      address.type === "unix"
        ? net.createConnection({ path: address.path })
        : net.createConnection({ host: address.host, port: address.port });
    plain.setNoDelay(true);
    // The socket being negotiated on: the plain one, then the TLS one that wraps it.
    const session: Session = { socket: plain, reader: null };
    const timer = setTimeout(
      () => session.socket.destroy(new Error(`no answer within ${timeoutMs} ms`)),
      timeoutMs,
    );
    try {
      await new Promise<void>((resolve, reject) => {
        plain.once("connect", resolve);
        plain.once("error", reject);
      });
      plain.removeAllListeners("error");
      // Once TLS wraps it, the outcome of the plain socket shows on the TLS socket.
      plain.on("error", () => {});
      session.reader = new HandshakeReader(plain);
      const info = await NbdConnection.#handshake(session, exportName, tls);
      clearTimeout(timer);
      const leftover = session.reader.detach();
      return new NbdConnection(session.socket, info, leftover);
    } catch (err) {
      clearTimeout(timer);
      session.reader?.detach();
      session.socket.on("error", () => {});
      session.socket.destroy();
      plain.destroy();
      if (err instanceof BlockError) throw err;
      throw notConnected(`cannot connect to the NBD server: ${(err as Error).message}`);
    }
  }

  static async #handshake(session: Session, name: string, tls: ClientTls | undefined): Promise<ExportInfo> {
    let socket = session.socket;
    let reader = session.reader!;
    const greeting = await reader.read(C.NBD_HANDSHAKE_BYTES);
    if (greeting.readBigUInt64BE(0) !== C.NBD_MAGIC) throw new ProtocolError("not an NBD server");
    if (greeting.readBigUInt64BE(8) !== C.NBD_IHAVEOPT) {
      throw new BlockError("ENOTSUP", "the NBD server speaks only the oldstyle handshake");
    }
    const serverFlags = greeting.readUInt16BE(16);
    if (!(serverFlags & C.NBD_FLAG_FIXED_NEWSTYLE)) {
      throw new BlockError("ENOTSUP", "the NBD server does not offer fixed newstyle negotiation");
    }
    const noZeroes = (serverFlags & C.NBD_FLAG_NO_ZEROES) !== 0;
    socket.write(encodeClientFlags(C.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? C.NBD_FLAG_C_NO_ZEROES : 0)));

    const option = async (opt: number, data?: Buffer): Promise<Array<{ type: number; data: Buffer }>> => {
      socket.write(encodeOption(opt, data));
      const replies: Array<{ type: number; data: Buffer }> = [];
      for (;;) {
        const h = decodeOptionReplyHeader(await reader.read(C.NBD_OPTION_REPLY_HEADER_BYTES));
        if (h.option !== opt) throw new ProtocolError(`reply to option ${h.option}, expected ${opt}`);
        if (h.length > OPTION_REPLY_BYTES_MAX) throw new ProtocolError("option reply too long");
        const body = await reader.read(h.length);
        replies.push({ type: h.type, data: body });
        if (h.type !== C.NBD_REP_INFO && h.type !== C.NBD_REP_META_CONTEXT) return replies;
      }
    };

    if (tls) {
      const reply = (await option(C.NBD_OPT_STARTTLS)).at(-1)!;
      checkStartTlsReply(reply.type, reply.data);
      // The server speaks TLS next; anything already buffered would be plaintext it should not send.
      if (reader.detach().length > 0) throw new ProtocolError("plaintext data after NBD_OPT_STARTTLS");
      session.reader = null;
      socket = session.socket = await upgradeToTls(socket, tls);
      // A server that refuses our certificate says so after our side of the handshake is done (TLS
      // 1.3), that is while we wait for the next option reply.
      reader = session.reader = new HandshakeReader(
        socket,
        (err) => describeTlsError(err, tls),
        () => describeTlsClose(tls),
      );
    }

    const structured = (await option(C.NBD_OPT_STRUCTURED_REPLY)).at(-1)!.type === C.NBD_REP_ACK;
    let allocationContext: number | null = null;
    if (structured) {
      const replies = await option(
        C.NBD_OPT_SET_META_CONTEXT,
        encodeMetaContextRequest(name, [C.BASE_ALLOCATION]),
      );
      for (const r of replies) {
        if (r.type !== C.NBD_REP_META_CONTEXT || r.data.length < 4) continue;
        if (r.data.subarray(4).toString("utf8") === C.BASE_ALLOCATION)
          allocationContext = r.data.readUInt32BE(0);
      }
    }
    const replies = await option(C.NBD_OPT_GO, encodeExportRequest(name, [C.NBD_INFO_BLOCK_SIZE]));
    const last = replies.at(-1)!;
    if (last.type === C.NBD_REP_ERR_TLS_REQD) {
      throw notConnected(`the NBD server requires TLS for export '${name}' (give tls-creds)`);
    }
    if (last.type !== C.NBD_REP_ACK) {
      const why = last.data.toString("utf8") || `error 0x${last.type.toString(16)}`;
      // An unknown export or a refusal will not change by retrying soon, but the server may be
      // restarting with its exports not yet added: treat it as not connected.
      throw notConnected(`the NBD server refused export '${name}': ${why}`);
    }
    let size = -1;
    let transmissionFlags = 0;
    let minimumBlockBytes = 1;
    let maximumRequestBytes = CLIENT_REQUEST_BYTES_MAX;
    for (const r of replies) {
      if (r.type !== C.NBD_REP_INFO || r.data.length < 2) continue;
      const infoType = r.data.readUInt16BE(0);
      if (infoType === C.NBD_INFO_EXPORT && r.data.length >= 12) {
        size = Number(r.data.readBigUInt64BE(2));
        transmissionFlags = r.data.readUInt16BE(10);
      } else if (infoType === C.NBD_INFO_BLOCK_SIZE && r.data.length >= 14) {
        minimumBlockBytes = r.data.readUInt32BE(2);
        maximumRequestBytes = Math.min(maximumRequestBytes, r.data.readUInt32BE(10));
      }
    }
    if (size < 0) throw new ProtocolError("the server did not send NBD_INFO_EXPORT");
    return {
      size,
      transmissionFlags,
      structured,
      allocationContext,
      minimumBlockBytes,
      maximumRequestBytes: Math.max(maximumRequestBytes, 512),
    };
  }

  get isClosed(): boolean {
    return this.#closedError !== null;
  }

  get inFlightCount(): number {
    return this.#pending.size;
  }

  /** The send time of the oldest request still waiting for its reply, or null. */
  oldestSentAtMs(): number | null {
    for (const p of this.#pending.values()) return p.sentAtMs;
    return null;
  }

  /** Sends one request (length within the server's maximum) and waits for its reply. */
  async request(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload: readonly Buffer[] | null = null,
    into: Buffer | null = null,
  ): Promise<Extent[] | null> {
    if (this.#closedError) throw this.#closedError;
    if (this.#pending.size >= CLIENT_IN_FLIGHT_MAX) {
      await new Promise<void>((r) => this.#queue.push(r));
      if (this.#closedError) throw this.#closedError;
    }
    const cookie = this.#nextCookie;
    this.#nextCookie = this.#nextCookie >= 0xffffffff ? 1 : this.#nextCookie + 1;
    return new Promise<Extent[] | null>((resolve, reject) => {
      this.#pending.set(cookie, {
        type,
        offset,
        length,
        into,
        resolve,
        reject,
        error: null,
        extents: null,
        sentAtMs: Date.now(),
      });
      const header = encodeRequest({ type, flags, cookieHi: 0, cookieLo: cookie, offset, length });
      const s = this.#socket;
      // Requests made in one turn of the event loop leave in one writev.
      if (!this.#corked) {
        this.#corked = true;
        s.cork();
        process.nextTick(this.#uncork);
      }
      s.write(header);
      if (payload) for (const b of payload) s.write(b);
    });
  }

  #onReply(m: ReplyMessage): void {
    const p = this.#pending.get(m.cookie);
    if (!p) {
      this.destroy(`the server answered unknown cookie ${m.cookie}`);
      return;
    }
    if (m.type === "simple") {
      if (m.error !== 0) p.error = new BlockError(fromNbdErrno(m.error), `NBD server: error ${m.error}`);
      else if (p.into) copyInto(m.payload, p.into, 0);
      this.#finish(m.cookie, p);
      return;
    }
    try {
      this.#onChunk(p, m.chunkType, m.payload);
    } catch (err) {
      this.destroy(`bad reply chunk: ${(err as Error).message}`);
      return;
    }
    if (m.flags & C.NBD_REPLY_FLAG_DONE) this.#finish(m.cookie, p);
  }

  #onChunk(p: Pending, chunkType: number, payload: Buffer[]): void {
    switch (chunkType) {
      case C.NBD_REPLY_TYPE_NONE:
        return;
      case C.NBD_REPLY_TYPE_OFFSET_DATA: {
        const head = firstBytes(payload, 8);
        const offset = Number(head.readBigUInt64BE(0));
        const at = offset - p.offset;
        let dataBytes = -8;
        for (const b of payload) dataBytes += b.length;
        if (!p.into || at < 0 || at + dataBytes > p.length)
          throw new ProtocolError("data chunk outside the read");
        copyInto(payload, p.into, at, 8);
        return;
      }
      case C.NBD_REPLY_TYPE_OFFSET_HOLE: {
        const b = Buffer.concat(payload);
        const at = Number(b.readBigUInt64BE(0)) - p.offset;
        const holeBytes = b.readUInt32BE(8);
        if (!p.into || at < 0 || at + holeBytes > p.length)
          throw new ProtocolError("hole chunk outside the read");
        p.into.fill(0, at, at + holeBytes);
        return;
      }
      case C.NBD_REPLY_TYPE_BLOCK_STATUS: {
        const b = Buffer.concat(payload);
        const extents: Extent[] = [];
        let offset = p.offset;
        for (let i = 4; i + 8 <= b.length; i += 8) {
          const length = b.readUInt32BE(i);
          const flags = b.readUInt32BE(i + 4);
          if (length === 0) break;
          extents.push({
            offset,
            length,
            hole: (flags & C.NBD_STATE_HOLE) !== 0,
            zero: (flags & C.NBD_STATE_ZERO) !== 0,
          });
          offset += length;
        }
        p.extents = extents;
        return;
      }
      default: {
        if (!(chunkType & (1 << 15))) return; // unknown non-error chunk: ignore, as the spec allows
        const b = Buffer.concat(payload);
        const errno = b.length >= 4 ? b.readUInt32BE(0) : 5;
        const messageBytes = b.length >= 6 ? b.readUInt16BE(4) : 0;
        const message = b.subarray(6, 6 + messageBytes).toString("utf8");
        p.error ??= new BlockError(fromNbdErrno(errno), `NBD server: ${message || `error ${errno}`}`);
      }
    }
  }

  #finish(cookie: number, p: Pending): void {
    this.#pending.delete(cookie);
    this.#queue.shift()?.();
    if (p.error) p.reject(p.error);
    else p.resolve(p.extents);
  }

  #fail(err: BlockError): void {
    this.#closedError ??= err;
    const pending = [...this.#pending.values()];
    this.#pending.clear();
    for (const p of pending) p.reject(this.#closedError);
    for (const wake of this.#queue.splice(0)) wake();
  }

  /** Drops the connection now; requests waiting fail with ENOTCONN. */
  destroy(why: string): void {
    this.#fail(notConnected(why));
    this.#socket.destroy();
  }

  /** Asks the server to end the session (NBD_CMD_DISC); the caller has drained its requests. */
  async disconnect(): Promise<void> {
    if (this.#closedError) return;
    this.#socket.end(
      encodeRequest({ type: C.NBD_CMD_DISC, flags: 0, cookieHi: 0, cookieLo: 0, offset: 0, length: 0 }),
    );
    await this.closed;
  }
}

/** The first n bytes of the views, copied only when they span views. */
function firstBytes(views: readonly Buffer[], n: number): Buffer {
  if (views.length > 0 && views[0].length >= n) return views[0];
  const out = Buffer.concat(views as Buffer[]);
  if (out.length < n) throw new ProtocolError("reply chunk too short");
  return out;
}

/** Copies the views into `into` at `at`, skipping the first `skip` bytes. */
function copyInto(views: readonly Buffer[], into: Buffer, at: number, skip = 0): void {
  for (const v of views) {
    if (skip >= v.length) {
      skip -= v.length;
      continue;
    }
    at += v.copy(into, at, skip);
    skip = 0;
  }
}
