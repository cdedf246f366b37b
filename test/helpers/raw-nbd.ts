/**
 * A minimal NBD client on a raw socket, built on the protocol codec, for tests that must send what no
 * real client would: bad magic, unknown options and flags, oversize lengths, hang-ups mid-reply. Every
 * read has a timeout, so a server that stops answering fails the test instead of hanging it.
 *
 * Also here: a sniffing proxy that decodes what a real client (qemu-io) sends, to check request flags.
 */
import * as net from "node:net";
import * as tls from "node:tls";
import { join } from "node:path";
import { randomBytes } from "node:crypto";
import assert from "node:assert/strict";
import * as C from "../../src/nbd/protocol/constants.js";
import {
  decodeOptionReplyHeader,
  encodeClientFlags,
  encodeExportRequest,
  encodeOption,
  encodeRequest,
  type RequestHeader,
} from "../../src/nbd/protocol/codec.js";
import { ServerDecoder } from "../../src/nbd/protocol/decoder.js";

export const READ_TIMEOUT_MS = 10_000;

export interface OptionReply {
  readonly option: number;
  readonly type: number;
  readonly data: Buffer;
}

export interface SimpleReply {
  readonly magic: number;
  readonly error: number;
  readonly cookie: number;
}

export interface Chunk {
  readonly flags: number;
  readonly type: number;
  readonly cookie: number;
  readonly data: Buffer;
}

export interface GoResult {
  readonly size: number;
  readonly transmissionFlags: number;
  readonly replies: OptionReply[];
}

export interface RequestSpec {
  readonly type: number;
  readonly flags?: number;
  readonly offset?: number;
  readonly length: number;
  readonly cookie?: number;
  readonly payload?: Buffer;
}

/** The server closed the connection before the bytes asked for arrived. */
export class EofError extends Error {
  readonly received: number;
  constructor(wanted: number, received: number) {
    super(`server closed the connection after ${received}/${wanted} bytes`);
    this.name = "EofError";
    this.received = received;
  }
}

export class RawNbd {
  /** The connection's socket; after startTls, the TLS socket over it. */
  socket: net.Socket;
  #chunks: Buffer[] = [];
  #buffered = 0;
  #ended = false;
  #socketError: Error | null = null;
  #wake: (() => void) | null = null;
  #nextCookie = 1;
  readonly #closed: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    this.#closed = this.#listen(socket);
  }

  #listen(socket: net.Socket): Promise<void> {
    socket.on("data", (c: Buffer) => {
      this.#chunks.push(c);
      this.#buffered += c.length;
      this.#wake?.();
    });
    // A reset after the server hung up is expected in several tests; it only ends the stream.
    socket.on("error", (e) => {
      this.#socketError = e;
      this.#ended = true;
      this.#wake?.();
    });
    socket.on("end", () => {
      this.#ended = true;
      this.#wake?.();
    });
    return new Promise((resolve) =>
      socket.on("close", () => {
        this.#ended = true;
        this.#wake?.();
        resolve();
      }),
    );
  }

  /**
   * Sends NBD_OPT_STARTTLS, expects NBD_REP_ACK and continues over TLS with these client options.
   * Rejects with the TLS error if the handshake fails (the server refusing the client, say).
   */
  async startTls(options: tls.ConnectionOptions): Promise<tls.TLSSocket> {
    await this.optionAck(C.NBD_OPT_STARTTLS);
    assert.equal(this.#buffered, 0, "nothing after the ACK before the TLS handshake");
    const raw = this.socket;
    raw.removeAllListeners("data");
    const secure = tls.connect({ ...options, socket: raw });
    await new Promise<void>((resolve, reject) => {
      secure.once("secureConnect", () => {
        secure.removeListener("error", reject);
        resolve();
      });
      secure.once("error", reject);
    });
    this.socket = secure;
    void this.#listen(secure);
    return secure;
  }

  /** Connects to a unix socket path, or to TCP options (host, port, localAddress). */
  static connect(path: string | net.NetConnectOpts, timeoutMs = READ_TIMEOUT_MS): Promise<RawNbd> {
    return new Promise((resolve, reject) => {
      const s = typeof path === "string" ? net.createConnection(path) : net.createConnection(path);
      const timer = setTimeout(() => {
        s.destroy();
        reject(new Error(`connect to ${path} timed out`));
      }, timeoutMs);
      s.once("error", (e) => {
        clearTimeout(timer);
        reject(e);
      });
      s.once("connect", () => {
        clearTimeout(timer);
        s.removeAllListeners("error");
        resolve(new RawNbd(s));
      });
    });
  }

  /** Whether the server has ended the stream (or the socket failed). */
  get ended(): boolean {
    return this.#ended;
  }

  get socketError(): Error | null {
    return this.#socketError;
  }

  send(bytes: Buffer): void {
    if (!this.socket.destroyed) this.socket.write(bytes);
  }

  /** Sends and resolves once the bytes were handed to the kernel (for large payloads). */
  sendAndDrain(bytes: Buffer): Promise<void> {
    return new Promise((resolve, reject) => {
      this.socket.write(bytes, (err) => (err ? reject(err) : resolve()));
    });
  }

  async readExact(n: number, timeoutMs = READ_TIMEOUT_MS): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.#buffered < n) {
      if (this.#ended) throw new EofError(n, this.#buffered);
      await this.#waitForData(deadline - Date.now(), `${n} bytes (have ${this.#buffered})`);
    }
    return this.#take(n);
  }

  /** Waits for the server to end the connection; resolves with any bytes that came before the end. */
  async expectEof(timeoutMs = READ_TIMEOUT_MS): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (!this.#ended) await this.#waitForData(deadline - Date.now(), "the server to close the connection");
    return this.#take(this.#buffered);
  }

  #waitForData(ms: number, what: string): Promise<void> {
    return new Promise((resolve, reject) => {
      if (ms <= 0) return reject(new Error(`timed out waiting for ${what}`));
      const timer = setTimeout(() => {
        this.#wake = null;
        reject(new Error(`timed out after waiting for ${what}`));
      }, ms);
      this.#wake = () => {
        clearTimeout(timer);
        this.#wake = null;
        resolve();
      };
    });
  }

  #take(n: number): Buffer {
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const c = this.#chunks[0];
      const k = Math.min(c.length, n - filled);
      c.copy(out, filled, 0, k);
      filled += k;
      if (k === c.length) this.#chunks.shift();
      else this.#chunks[0] = c.subarray(k);
    }
    this.#buffered -= n;
    return out;
  }

  // ---- handshake -------------------------------------------------------------------------------------

  /** Reads the greeting and checks it; returns the server's handshake flags. */
  async readGreeting(): Promise<number> {
    const g = await this.readExact(C.NBD_HANDSHAKE_BYTES);
    assert.equal(g.readBigUInt64BE(0), C.NBD_MAGIC, "greeting magic");
    assert.equal(g.readBigUInt64BE(8), C.NBD_IHAVEOPT, "greeting IHAVEOPT");
    return g.readUInt16BE(16);
  }

  /** Greeting plus client flags (fixed newstyle + no zeroes unless told otherwise). */
  async handshake(clientFlags = C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES): Promise<number> {
    const serverFlags = await this.readGreeting();
    assert.ok(serverFlags & C.NBD_FLAG_FIXED_NEWSTYLE, "server offers fixed newstyle");
    this.send(encodeClientFlags(clientFlags));
    return serverFlags;
  }

  sendOption(option: number, data?: Buffer): void {
    this.send(encodeOption(option, data));
  }

  async readOptionReply(): Promise<OptionReply> {
    const h = decodeOptionReplyHeader(await this.readExact(C.NBD_OPTION_REPLY_HEADER_BYTES));
    const data = h.length > 0 ? await this.readExact(h.length) : Buffer.alloc(0);
    return { option: h.option, type: h.type, data };
  }

  /** Sends option and reads one reply, which must be an ACK. */
  async optionAck(option: number, data?: Buffer): Promise<void> {
    this.sendOption(option, data);
    const r = await this.readOptionReply();
    assert.equal(r.option, option);
    assert.equal(r.type, C.NBD_REP_ACK, `option ${option}: ${r.data.toString()}`);
  }

  async structuredReplies(): Promise<void> {
    await this.optionAck(C.NBD_OPT_STRUCTURED_REPLY);
  }

  /** NBD_OPT_GO; resolves with the export's size and flags, rejects with the error reply. */
  async go(name = "", infos: readonly number[] = []): Promise<GoResult> {
    this.sendOption(C.NBD_OPT_GO, encodeExportRequest(name, infos));
    const replies: OptionReply[] = [];
    let size = -1;
    let transmissionFlags = -1;
    for (;;) {
      const r = await this.readOptionReply();
      assert.equal(r.option, C.NBD_OPT_GO, "reply to GO");
      replies.push(r);
      if (C.isOptionReplyError(r.type)) {
        throw Object.assign(
          new Error(`GO refused: type ${(r.type >>> 0).toString(16)} ${r.data.toString()}`),
          { reply: r },
        );
      }
      if (r.type === C.NBD_REP_INFO && r.data.readUInt16BE(0) === C.NBD_INFO_EXPORT) {
        size = Number(r.data.readBigUInt64BE(2));
        transmissionFlags = r.data.readUInt16BE(10);
      }
      if (r.type === C.NBD_REP_ACK) break;
    }
    assert.ok(size >= 0, "GO answered INFO_EXPORT");
    return { size, transmissionFlags, replies };
  }

  // ---- transmission ----------------------------------------------------------------------------------

  /** Sends a request (and its payload); returns the cookie used. */
  sendRequest(r: RequestSpec): number {
    const cookie = r.cookie ?? this.#nextCookie++;
    const header: RequestHeader = {
      flags: r.flags ?? 0,
      type: r.type,
      cookieHi: 0,
      cookieLo: cookie,
      offset: r.offset ?? 0,
      length: r.length,
    };
    this.send(r.payload ? Buffer.concat([encodeRequest(header), r.payload]) : encodeRequest(header));
    return cookie;
  }

  async readSimpleReply(timeoutMs = READ_TIMEOUT_MS): Promise<SimpleReply> {
    const b = await this.readExact(C.NBD_SIMPLE_REPLY_BYTES, timeoutMs);
    const magic = b.readUInt32BE(0);
    assert.equal(magic, C.NBD_SIMPLE_REPLY_MAGIC, `simple reply magic, got ${magic.toString(16)}`);
    return { magic, error: b.readUInt32BE(4), cookie: b.readUInt32BE(12) };
  }

  async readChunk(timeoutMs = READ_TIMEOUT_MS): Promise<Chunk> {
    const h = await this.readExact(C.NBD_STRUCTURED_HEADER_BYTES, timeoutMs);
    const magic = h.readUInt32BE(0);
    assert.equal(magic, C.NBD_STRUCTURED_REPLY_MAGIC, `structured reply magic, got ${magic.toString(16)}`);
    const length = h.readUInt32BE(16);
    return {
      flags: h.readUInt16BE(4),
      type: h.readUInt16BE(6),
      cookie: h.readUInt32BE(12),
      data: length > 0 ? await this.readExact(length, timeoutMs) : Buffer.alloc(0),
    };
  }

  /** Writes and waits for the (simple) reply; returns its error number. */
  async write(offset: number, data: Buffer, flags = 0): Promise<number> {
    const cookie = this.sendRequest({
      type: C.NBD_CMD_WRITE,
      flags,
      offset,
      length: data.length,
      payload: data,
    });
    const r = await this.readSimpleReply();
    assert.equal(r.cookie, cookie, "reply cookie");
    return r.error;
  }

  /** Reads with simple replies (do not use after structuredReplies()). */
  async read(offset: number, length: number): Promise<{ error: number; data: Buffer }> {
    const cookie = this.sendRequest({ type: C.NBD_CMD_READ, offset, length });
    const r = await this.readSimpleReply();
    assert.equal(r.cookie, cookie, "reply cookie");
    return { error: r.error, data: r.error === 0 ? await this.readExact(length) : Buffer.alloc(0) };
  }

  /** Sends NBD_CMD_DISC and waits for the server to close. */
  async disconnect(): Promise<void> {
    this.sendRequest({ type: C.NBD_CMD_DISC, length: 0 });
    this.socket.end();
    await this.expectEof();
  }

  destroy(): void {
    this.socket.destroy();
  }

  whenClosed(): Promise<void> {
    return this.#closed;
  }
}

/** Connects, negotiates (optionally structured replies) and enters transmission on `name`. */
export async function openExport(
  socketPath: string | net.NetConnectOpts,
  opts: { name?: string; structured?: boolean } = {},
): Promise<{ client: RawNbd; go: GoResult }> {
  const client = await RawNbd.connect(socketPath);
  await client.handshake();
  if (opts.structured) await client.structuredReplies();
  const go = await client.go(opts.name ?? "");
  return { client, go };
}

/** A write then read-back of fresh random data through `client`; fails the test on any difference. */
export async function assertRoundTrip(client: RawNbd, offset: number, length = 4096): Promise<void> {
  const data = randomBytes(length);
  assert.equal(await client.write(offset, data), 0, "round-trip write succeeds");
  const r = await client.read(offset, length);
  assert.equal(r.error, 0, "round-trip read succeeds");
  assert.ok(r.data.equals(data), "round-trip read returns what was written");
}

// ---- sniffing proxy ------------------------------------------------------------------------------------

export interface SniffedRequest {
  readonly type: number;
  readonly flags: number;
  readonly offset: number;
  readonly length: number;
}

export interface SniffingProxy {
  readonly socket: string;
  /** Every request any client sent through the proxy, in order. */
  readonly requests: SniffedRequest[];
  close(): Promise<void>;
}

/**
 * A unix-socket proxy in front of `target` that decodes what clients send (with the server-side decoder)
 * and records each transmission request. Assumes the first GO / EXPORT_NAME succeeds.
 */
export async function startSniffingProxy(target: string, dir: string): Promise<SniffingProxy> {
  const requests: SniffedRequest[] = [];
  const sockets = new Set<net.Socket>();
  const server = net.createServer((client) => {
    const upstream = net.createConnection(target);
    sockets.add(client).add(upstream);
    const decoder: ServerDecoder = new ServerDecoder(
      { optionBytesMax: 1 << 20, payloadBytesMax: 1 << 30, payloadSkipBytesMax: 1 << 30 },
      (m) => {
        if (m.type === "option" && (m.option === C.NBD_OPT_GO || m.option === C.NBD_OPT_EXPORT_NAME)) {
          decoder.enterTransmission();
        } else if (m.type === "request") {
          const { type, flags, offset, length } = m.header;
          requests.push({ type, flags, offset, length });
        }
      },
    );
    client.on("data", (c: Buffer) => decoder.push(c));
    client.pipe(upstream);
    upstream.pipe(client);
    const teardown = (): void => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on("close", teardown).on("error", teardown);
    upstream.on("close", teardown).on("error", teardown);
  });
  const socket = join(dir, "proxy.sock");
  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(socket, () => resolve());
  });
  return {
    socket,
    requests,
    close: () =>
      new Promise<void>((resolve) => {
        for (const s of sockets) s.destroy();
        server.close(() => resolve());
      }),
  };
}
