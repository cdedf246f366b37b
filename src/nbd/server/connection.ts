/**
 * One client connection: the fixed-newstyle handshake, then transmission. Requests run concurrently and
 * are answered as they finish (out of order); replies written in one event-loop turn leave in one
 * writev (the socket is corked until setImmediate). Malformed input gets the spec's error, or closes
 * this connection only; a client that hangs up mid-reply just loses its replies.
 *
 * NBD_OPT_STARTTLS swaps the socket for a TLS socket over it (tls-upgrade.ts); from then on every
 * read, write, pause and close goes through the TLS socket, and the options start over.
 */
import type { Socket } from "node:net";
import { TLSSocket } from "node:tls";
import { BlockError, NBD_ERRNO, ProtocolError, toBlockError } from "../../core/errors.js";
import { assert } from "../../core/assert.js";
import { coarseNowMs } from "../../core/coarse-clock.js";
import type { Logger } from "../../core/log.js";
import type { Extent, WriteFlags } from "../../block/driver.js";
import type { BlockNode } from "../../io/block-node.js";
import type { DirtyBitmap } from "../../io/dirty-bitmap.js";
import * as C from "../protocol/constants.js";
import {
  OFFSET_DATA_PREFIX_BYTES,
  decodeExportRequest,
  decodeMetaContextRequest,
  encodeBlockStatusChunk,
  encodeErrorChunk,
  encodeExportNameReply,
  encodeHoleChunk,
  encodeInfoBlockSize,
  encodeInfoExport,
  encodeInfoString,
  encodeMetaContext,
  encodeOptionReply,
  encodeServerEntry,
  encodeServerGreeting,
  writeOffsetDataPrefix,
  writeSimpleReply,
  type RequestHeader,
  type StatusDescriptor,
} from "../protocol/codec.js";
import { ServerDecoder, type ServerMessage } from "../protocol/decoder.js";
import type { BudgetAccount } from "./buffer-budget.js";
import * as L from "./limits.js";
import { giveReplyBuffer, replyAllocationBytes, takeReplyBuffer } from "./reply-pool.js";
import { slabTracker, startTlsReading, stopSlabReads } from "./socket-reader.js";
import type { HandshakeResult, ServerTls } from "./tls-upgrade.js";
import type { TlsWorkerPool } from "./tls-worker.js";

export interface NbdExport {
  readonly name: string;
  readonly description: string;
  /** Replaced when a mirror pivots; connections read it on every request, so they switch at once. */
  node: BlockNode;
  readonly readOnly: boolean;
  /** Dirty bitmaps offered as `qemu:dirty-bitmap:NAME` meta contexts (bit 0: dirty). */
  readonly bitmaps?: ReadonlyArray<{ readonly name: string; readonly bits: DirtyBitmap }>;
}

/** QEMU's meta context namespace and the prefix of its dirty-bitmap contexts. */
const QEMU_NAMESPACE = "qemu:";
const DIRTY_BITMAP_PREFIX = "qemu:dirty-bitmap:";
const NBD_STATE_DIRTY = 1;

/** A meta context chosen with SET_META_CONTEXT: base:allocation, or one exported bitmap. */
interface MetaContext {
  readonly id: number;
  readonly bits: DirtyBitmap | null;
}
export interface ExportDirectory {
  findExport(name: string): NbdExport | undefined;
  listExports(): readonly NbdExport[];
}

/** What a connection needs from its server. */
export interface ConnectionHost extends ExportDirectory {
  /** Asked when the handshake has chosen an export: false means no transmission slot is free. */
  enterTransmission(c: NbdConnection): boolean;
  /** TLS offered to clients (NBD_OPT_STARTTLS), or null when TLS is off. */
  readonly tls: ServerTls | null;
  /** Worker threads that run TLS sessions off the main loop, or null (TLS then runs here). */
  readonly tlsWorkers: TlsWorkerPool | null;
  onClosed(c: NbdConnection): void;
}

/** A request received and not yet answered (its final reply not yet taken by the socket). */
export interface InFlightRequest {
  readonly command: string;
  readonly offset: number;
  readonly length: number;
  readonly startMs: number;
  /** Budget bytes still held for it (payload or reply buffer). */
  bytes: number;
}

/**
 * One request's state on the connection. Requests in flight form an intrusive list (no allocation per
 * request beyond this object: a Set's add/delete churn measurably raised GC time at 4 KiB QD32).
 */
class Request implements InFlightRequest {
  readonly command: string;
  readonly offset: number;
  readonly length: number;
  readonly startMs: number;
  bytes: number;
  /** A pooled reply buffer to give back once the socket has taken it. */
  reply: Buffer | null = null;
  prev: Request | null = null;
  next: Request | null = null;
  linked = false;

  constructor(h: RequestHeader, bytes: number) {
    this.command = C.COMMAND_NAMES[h.type] ?? `command ${h.type}`;
    this.offset = h.offset;
    this.length = h.length;
    this.startMs = coarseNowMs();
    this.bytes = bytes;
  }
}

/** What holds the decoder: nothing, the connection's own bounds, or the shared buffer budget. */
const enum Wait {
  None,
  Slot,
  Budget,
}

const BASE_ALLOCATION_ID = 1;

// Shared, frozen flag objects: the write path allocates none per request.
const FUA: WriteFlags = Object.freeze({ fua: true });
const NO_FUA: WriteFlags = Object.freeze({ fua: false });

function writeFlags(nbdFlags: number): WriteFlags {
  return (nbdFlags & C.NBD_CMD_FLAG_FUA) !== 0 ? FUA : NO_FUA;
}
const KNOWN_CLIENT_FLAGS = C.NBD_FLAG_C_FIXED_NEWSTYLE | C.NBD_FLAG_C_NO_ZEROES;

const ALLOWED_FLAGS: Readonly<Record<number, number>> = {
  // The spec: a server that advertises SEND_FUA must accept FUA on every command (it only matters for
  // writes; elsewhere it is ignored).
  [C.NBD_CMD_READ]: C.NBD_CMD_FLAG_DF | C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_WRITE]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_DISC]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_FLUSH]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_TRIM]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_CACHE]: C.NBD_CMD_FLAG_FUA,
  [C.NBD_CMD_WRITE_ZEROES]: C.NBD_CMD_FLAG_FUA | C.NBD_CMD_FLAG_NO_HOLE | C.NBD_CMD_FLAG_FAST_ZERO,
  [C.NBD_CMD_BLOCK_STATUS]: C.NBD_CMD_FLAG_REQ_ONE | C.NBD_CMD_FLAG_FUA,
};

/** Where a connection is with TLS. */
const enum Tls {
  /** Plaintext; STARTTLS not (yet) sent. */
  None,
  /** STARTTLS acknowledged: the ACK is leaving, or the TLS handshake is under way. */
  Starting,
  /** The TLS session is up: every byte goes through it. */
  Active,
}

/** Simple replies one batch holds (16 bytes each): a turn's worth at full depth. */
const REPLY_BATCH_BYTES = L.IN_FLIGHT_REQUESTS_MAX * C.NBD_SIMPLE_REPLY_BYTES;

export class NbdConnection {
  readonly id: number;
  /** The accepted socket, and after STARTTLS the TLS socket over it. */
  #socket: Socket;
  #tls = Tls.None;
  /** After TLS: why --tls-authz refuses this peer (every option but ABORT gets ERR_POLICY), or null. */
  #tlsRefusal: string | null = null;
  /** A plaintext client against --tls require is logged once, at its first refused option. */
  #tlsRequiredLogged = false;
  readonly #directory: ConnectionHost;
  readonly #account: BudgetAccount;
  readonly #log: Logger;
  readonly #decoder: ServerDecoder;
  #noZeroes = false;
  #structured = false;
  /** Meta contexts chosen with SET_META_CONTEXT, and the export they were chosen for. */
  #metaExport: string | null = null;
  #contexts: MetaContext[] = [];
  #optionCount = 0;
  #export: NbdExport | null = null;
  #handshakeTimer: NodeJS.Timeout | null;
  /** Requests admitted whose final reply the socket has not yet taken (bounds requests + replies). */
  #slots = 0;
  /** Requests admitted and not yet finished at the node (what shutdown and DISC wait for). */
  #running = 0;
  /** Budget bytes taken for the header the decoder just admitted, handed to #onRequest. */
  #admittedBytes = 0;
  /** Bytes the budget granted while the decoder waited, for the held header when it is offered again. */
  #grantedBytes = 0;
  #wait = Wait.None;
  /** Requests received and not yet answered, oldest first. */
  #first: Request | null = null;
  #last: Request | null = null;
  /**
   * Requests whose final reply is queued on the socket, in write order. The socket calls write
   * callbacks in write order, so one shared callback (#onReplyTaken) pops the head: no closure per
   * request.
   */
  #queued: Request[] = [];
  #queuedHead = 0;
  /**
   * Simple replies (16 bytes each) sent this turn and not yet handed to the socket, back to back in
   * #batch, with their requests in #batchReqs: they go to the socket as one buffer with one write
   * callback (#flushBatch), before anything else is written, so the order on the wire is the order
   * of the sends. A reply each cost a Buffer, a stream entry and a callback.
   */
  #batch: Buffer | null = null;
  #batchReqs: Request[] = [];
  readonly #takeBatch = (n: number): void => {
    for (let i = 0; i < n; i++) this.#onReplyTaken();
  };
  #readingPaused = false;
  #corked = false;
  #closing = false;
  #closed = false;
  #idleWaiters: Array<() => void> = [];
  readonly acceptedMs = coarseNowMs();
  #lastActivityMs = coarseNowMs();
  #lastReadMs = coarseNowMs();
  #receivedBytes = 0;
  /** When the write whose payload the decoder awaits was admitted. */
  #payloadSinceMs = 0;
  /** When the socket last took reply bytes, or when its queue went from empty to not empty. */
  #lastWriteMs = coarseNowMs();

  /** The TCP peer's address (undefined on a unix socket), for the per-address handshake bound. */
  readonly peerAddress: string | undefined;

  constructor(
    id: number,
    socket: Socket,
    host: ConnectionHost,
    account: BudgetAccount,
    log: Logger,
    peerAddress?: string,
  ) {
    this.id = id;
    this.peerAddress = peerAddress;
    this.#socket = socket;
    this.#directory = host;
    this.#account = account;
    this.#log = log;
    this.#decoder = new ServerDecoder(
      {
        optionBytesMax: L.OPTION_BYTES_MAX,
        payloadBytesMax: L.REQUEST_BYTES_MAX,
        payloadSkipBytesMax: L.REQUEST_SKIP_BYTES_MAX,
      },
      (m) => this.#onMessage(m),
      slabTracker,
      this.#admit,
    );
    this.#listen(socket);
    this.#handshakeTimer = setTimeout(() => {
      this.#log.warn({}, "handshake timed out");
      this.#destroy();
    }, L.HANDSHAKE_TIMEOUT_MS);
    this.#handshakeTimer.unref();
    this.#send(encodeServerGreeting(C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES));
  }

  #listen(socket: Socket): void {
    socket.on("error", this.#onSocketError);
    socket.on("close", this.#onSocketClose);
    socket.on("end", this.#onSocketEnd);
  }

  /** Lets go of a socket whose bytes another one carries from now on (a TLS worker's socketpair). */
  #unlisten(socket: Socket): void {
    socket.removeListener("error", this.#onSocketError);
    socket.removeListener("close", this.#onSocketClose);
    socket.removeListener("end", this.#onSocketEnd);
  }

  readonly #onSocketError = (err: Error): void => this.#log.debug({ err: err.message }, "socket error");
  readonly #onSocketClose = (): void => this.#finish();
  readonly #onSocketEnd = (): void => this.#closeAfterInFlight();

  get exportName(): string | null {
    return this.#export?.name ?? null;
  }

  /** The export this connection serves once its handshake chose one. */
  get servedExport(): NbdExport | null {
    return this.#export;
  }

  /** True once the connection takes no more requests (DISC, EOF, shutdown, protocol error). */
  get closing(): boolean {
    return this.#closing;
  }

  /**
   * What the connection's reading waits for ("slot": its own bounds, "budget": the shared buffer
   * budget), or null; with the buffer bytes it holds and whether its socket is paused. A stall
   * report shows these next to the requests in flight: a held header is not one of them.
   */
  get admission(): {
    readonly waiting: "slot" | "budget" | null;
    readonly heldBytes: number;
    readonly paused: boolean;
  } {
    const waiting = this.#wait === Wait.Slot ? "slot" : this.#wait === Wait.Budget ? "budget" : null;
    return { waiting, heldBytes: this.#account.heldBytes, paused: this.#readingPaused };
  }

  /** Requests received and not yet answered, oldest first. */
  inFlight(): readonly InFlightRequest[] {
    const out: Request[] = [];
    for (let r = this.#first; r !== null; r = r.next) out.push(r);
    return out;
  }

  /** Bytes received from the peer so far, and when the last arrived (accept time before any). */
  get receivedBytes(): number {
    return this.#receivedBytes;
  }

  get lastInputMs(): number {
    return this.#lastReadMs;
  }

  /** Whether the connection's bytes go through TLS (from the upgrade on). */
  get encrypted(): boolean {
    return this.#tls !== Tls.None;
  }

  get unsentBytes(): number {
    return this.#socket.writableLength;
  }

  /** Milliseconds without any request or unsent reply, or -1 while the connection has work. */
  idleMs(nowMs: number): number {
    if (this.#slots > 0 || this.#running > 0 || this.#wait !== Wait.None || this.#decoder.bufferedBytes > 0)
      return -1;
    return nowMs - this.#lastActivityMs;
  }

  /**
   * Drops a peer that has gone quiet in the middle of something: replies it does not take, or a
   * write payload it does not finish. Either holds buffer budget that others are waiting for.
   */
  checkStalled(nowMs: number): void {
    if (this.#closed) return;
    if (this.#socket.writableLength > 0 && nowMs - this.#lastWriteMs > L.PEER_STALL_TIMEOUT_MS) {
      this.#log.warn({ unsentBytes: this.#socket.writableLength }, "client stopped reading replies; closing");
      return this.#destroy();
    }
    if (this.#decoder.awaitingPayload && nowMs - this.#payloadSinceMs > L.PEER_STALL_TIMEOUT_MS) {
      this.#log.warn({}, "client stopped in the middle of a write payload; closing");
      return this.#destroy();
    }
  }

  /** Closes the connection at once (eviction, handshake bound). */
  evict(why: string): void {
    this.#log.warn({ why }, "connection evicted");
    this.#destroy();
  }

  /** Stops reading, lets in-flight requests finish and their replies go out, then closes. */
  async shutdown(): Promise<void> {
    this.#beginClose("server shutting down");
    await this.#whenIdle();
    // The last turn's replies may still be in the batch: they go first, then end() flushes the
    // socket; then the socket goes even if the client lingers.
    if (this.#corked) this.#uncork();
    this.#socket.end(() => this.#socket.destroy());
  }

  // ---- input -----------------------------------------------------------------------------------------

  /** Feeds bytes read from the socket (the server decides how the socket is read). */
  onData(chunk: Buffer): void {
    this.#lastReadMs = coarseNowMs();
    this.#receivedBytes += chunk.length;
    try {
      this.#decoder.push(chunk);
    } catch (err) {
      if (!(err instanceof ProtocolError)) throw err;
      this.#log.warn({ err: err.message }, "protocol error; closing connection");
      this.#decoder.stop();
      this.#closeAfterInFlight();
    }
  }

  #onMessage(m: ServerMessage): void {
    switch (m.type) {
      case "client-flags":
        return this.#onClientFlags(m.flags);
      case "option":
        return this.#onOption(m.option, m.data);
      case "option-too-big":
        this.#log.warn({ option: m.option, length: m.length }, "option too big; closing");
        this.#optionReply(m.option, C.NBD_REP_ERR_TOO_BIG, Buffer.from("option data too long"));
        return this.#closeAfterInFlight();
      case "request":
        return this.#onRequest(m.header, m.payload, m.oversize);
    }
  }

  // ---- handshake -------------------------------------------------------------------------------------

  #onClientFlags(flags: number): void {
    if ((flags & ~KNOWN_CLIENT_FLAGS) !== 0 || (flags & C.NBD_FLAG_C_FIXED_NEWSTYLE) === 0) {
      this.#log.warn({ flags }, "unsupported client flags; closing");
      this.#decoder.stop();
      return this.#destroy();
    }
    this.#noZeroes = (flags & C.NBD_FLAG_C_NO_ZEROES) !== 0;
  }

  #optionReply(option: number, type: number, data?: Buffer): void {
    this.#send(encodeOptionReply(option, type, data));
  }

  #optionError(option: number, type: number, message: string): void {
    this.#log.debug({ option, type: type & 0xff, message }, "option refused");
    this.#optionReply(option, type, Buffer.from(message, "utf8"));
  }

  #onOption(option: number, data: Buffer): void {
    if (++this.#optionCount > L.OPTIONS_PER_CONNECTION_MAX) {
      this.#log.warn({}, "too many options; closing");
      return this.#closeAfterInFlight();
    }
    if (this.#tls === Tls.Starting) {
      // Options decoded while the TLS handshake runs would pass neither the TLS-required gate nor
      // authz. (Node emits "secure" before any decrypted data, so this is defence in depth.)
      this.#log.warn({ option }, "option during the TLS handshake; closing");
      this.#decoder.stop();
      return this.#destroy();
    }
    if (option !== C.NBD_OPT_ABORT && this.#tlsGate(option)) return;
    try {
      switch (option) {
        case C.NBD_OPT_EXPORT_NAME:
          return this.#optExportName(data);
        case C.NBD_OPT_ABORT:
          this.#optionReply(option, C.NBD_REP_ACK);
          this.#decoder.stop();
          return this.#closeAfterInFlight();
        case C.NBD_OPT_LIST:
          if (data.length !== 0)
            return this.#optionError(option, C.NBD_REP_ERR_INVALID, "LIST takes no data");
          for (const e of this.#directory.listExports()) {
            this.#optionReply(option, C.NBD_REP_SERVER, encodeServerEntry(e.name, e.description));
          }
          return this.#optionReply(option, C.NBD_REP_ACK);
        case C.NBD_OPT_INFO:
        case C.NBD_OPT_GO:
          return this.#optInfoGo(option, data);
        case C.NBD_OPT_STRUCTURED_REPLY:
          if (data.length !== 0)
            return this.#optionError(option, C.NBD_REP_ERR_INVALID, "STRUCTURED_REPLY takes no data");
          if (this.#structured)
            return this.#optionError(option, C.NBD_REP_ERR_INVALID, "structured replies already on");
          this.#structured = true;
          return this.#optionReply(option, C.NBD_REP_ACK);
        case C.NBD_OPT_LIST_META_CONTEXT:
        case C.NBD_OPT_SET_META_CONTEXT:
          return this.#optMetaContext(option, data);
        case C.NBD_OPT_STARTTLS:
          return this.#optStartTls(data);
        default:
          return this.#optionError(option, C.NBD_REP_ERR_UNSUP, `option ${option} is not supported`);
      }
    } catch (err) {
      if (err instanceof ProtocolError) return this.#optionError(option, C.NBD_REP_ERR_INVALID, err.message);
      throw err;
    }
  }

  // ---- TLS -------------------------------------------------------------------------------------------

  /**
   * Answers an option that TLS policy refuses, and says so: before STARTTLS under `--tls require`
   * (ERR_TLS_REQD; EXPORT_NAME has no error reply, so it closes), and after a handshake whose peer
   * --tls-authz does not list (ERR_POLICY; EXPORT_NAME closes). The spec prefers answering options
   * with errors to hanging up; the options bound and the handshake timer end such a session.
   */
  #tlsGate(option: number): boolean {
    const tls = this.#directory.tls;
    if (this.#tlsRefusal !== null) {
      if (option === C.NBD_OPT_EXPORT_NAME) {
        this.#log.warn(
          { why: this.#tlsRefusal },
          "EXPORT_NAME from a TLS peer that is not authorized; closing",
        );
        this.#decoder.stop();
        this.#closeAfterInFlight();
      } else {
        this.#optionError(option, C.NBD_REP_ERR_POLICY, this.#tlsRefusal);
      }
      return true;
    }
    if (tls === null || !tls.required || this.#tls !== Tls.None || option === C.NBD_OPT_STARTTLS)
      return false;
    if (!this.#tlsRequiredLogged) {
      this.#tlsRequiredLogged = true;
      this.#log.warn(
        { option },
        "plaintext client refused: this server requires TLS (the client must send STARTTLS first)",
      );
    }
    if (option === C.NBD_OPT_EXPORT_NAME) {
      // No error reply exists for EXPORT_NAME: the spec's answer is to end the session.
      this.#decoder.stop();
      this.#closeAfterInFlight();
    } else {
      this.#optionError(
        option,
        C.NBD_REP_ERR_TLS_REQD,
        "this server requires TLS: send NBD_OPT_STARTTLS first",
      );
    }
    return true;
  }

  #optStartTls(data: Buffer): void {
    const option = C.NBD_OPT_STARTTLS;
    const tls = this.#directory.tls;
    if (tls === null)
      return this.#optionError(option, C.NBD_REP_ERR_UNSUP, "TLS is not enabled on this server");
    if (this.#tls !== Tls.None)
      return this.#optionError(option, C.NBD_REP_ERR_INVALID, "TLS is already active");
    if (data.length !== 0) return this.#optionError(option, C.NBD_REP_ERR_INVALID, "STARTTLS takes no data");
    if (this.#decoder.bufferedBytes > 0) {
      // Bytes sent before our answer would be read in clear but taken as if they came over TLS (the
      // STARTTLS injection attacks on SMTP and IMAP): an honest client waits for the ACK.
      this.#log.warn(
        { bytes: this.#decoder.bufferedBytes },
        "client sent data after STARTTLS before the reply; closing",
      );
      this.#decoder.stop();
      return this.#destroy();
    }
    this.#tls = Tls.Starting;
    // Nothing more is read in clear: the next bytes are the client's TLS handshake, for the TLS socket.
    this.#pauseReading();
    if (this.#corked) this.#uncork();
    const raw = this.#socket;
    raw.write(encodeOptionReply(option, C.NBD_REP_ACK), (err) => {
      if (err || this.#closed || raw.destroyed) return;
      this.#startTls(tls, raw);
    });
  }

  /**
   * The ACK has left in clear: hand the socket to TLS, in a worker thread when the server has them
   * (the connection then speaks plaintext to the worker over a socketpair), else here.
   */
  #startTls(tls: ServerTls, raw: Socket): void {
    const onChunk = (chunk: Buffer): void => this.onData(chunk);
    const done = (r: HandshakeResult): void => this.#onTlsDone(tls, r);
    const plain = this.#directory.tlsWorkers?.offload(raw, onChunk, done) ?? null;
    stopSlabReads(raw);
    if (plain !== null) {
      this.#unlisten(raw);
      raw.destroy();
      this.#socket = plain;
      this.#readingPaused = false;
      this.#listen(plain);
      return;
    }
    const secure = tls.upgrade(raw, done);
    this.#socket = secure;
    this.#readingPaused = false;
    this.#listen(secure);
    startTlsReading(secure, onChunk);
  }

  #onTlsDone(tls: ServerTls, r: HandshakeResult): void {
    if (!r.ok) {
      // Logged even when the connection has closed already: a client that hung up in the handshake
      // closes the plain socket first about half the time, and the reason is still the one to tell.
      this.#log.warn({ why: r.reason }, "TLS handshake refused; closing");
      if (this.#closed) return;
      this.#decoder.stop();
      return this.#destroy();
    }
    if (this.#closed) return;
    this.#tls = Tls.Active;
    // The spec: nothing negotiated before STARTTLS survives it (nbdkit's CVE-2021-3716 kept
    // structured replies across it). Client flags belong to the greeting and stay.
    this.#structured = false;
    this.#metaExport = null;
    this.#contexts = [];
    this.#tlsRefusal = tls.refusal(r.peer);
    if (this.#tlsRefusal !== null) this.#log.warn({ peer: r.peer?.name ?? null }, this.#tlsRefusal);
    this.#log.debug(
      {
        protocol: r.protocol,
        cipher: r.cipher,
        peer: r.peer?.name ?? null,
        thread: this.#socket instanceof TLSSocket ? "main" : "worker",
      },
      "TLS established",
    );
  }

  #transmissionFlags(e: NbdExport): number {
    let flags = C.NBD_FLAG_HAS_FLAGS | C.NBD_FLAG_SEND_FLUSH | C.NBD_FLAG_SEND_FUA | C.NBD_FLAG_SEND_CACHE;
    // Every connection shares one node and one file: a flush on any covers writes from all.
    flags |= C.NBD_FLAG_CAN_MULTI_CONN;
    if (this.#structured) flags |= C.NBD_FLAG_SEND_DF;
    if (e.readOnly) flags |= C.NBD_FLAG_READ_ONLY;
    else flags |= C.NBD_FLAG_SEND_TRIM | C.NBD_FLAG_SEND_WRITE_ZEROES | C.NBD_FLAG_SEND_FAST_ZERO;
    return flags;
  }

  #optExportName(data: Buffer): void {
    const name = data.toString("utf8");
    const e = data.length <= C.NBD_STRING_BYTES_MAX ? this.#directory.findExport(name) : undefined;
    if (!e) {
      // This option has no error reply: the spec's answer is to close.
      this.#log.warn({ name }, "EXPORT_NAME for unknown export; closing");
      this.#decoder.stop();
      return this.#closeAfterInFlight();
    }
    if (!this.#directory.enterTransmission(this)) {
      this.#log.warn({}, "EXPORT_NAME refused: too many connections; closing");
      this.#decoder.stop();
      return this.#closeAfterInFlight();
    }
    this.#send(encodeExportNameReply(e.node.size(), this.#transmissionFlags(e), this.#noZeroes));
    this.#enterTransmission(e);
  }

  #optInfoGo(option: number, data: Buffer): void {
    const { name, infos } = decodeExportRequest(data);
    const e = this.#directory.findExport(name);
    if (!e) return this.#optionError(option, C.NBD_REP_ERR_UNKNOWN, `no export named "${name}"`);
    if (option === C.NBD_OPT_GO && !this.#directory.enterTransmission(this)) {
      return this.#optionError(option, C.NBD_REP_ERR_POLICY, "server has too many connections");
    }
    this.#optionReply(option, C.NBD_REP_INFO, encodeInfoExport(e.node.size(), this.#transmissionFlags(e)));
    if (infos.includes(C.NBD_INFO_NAME))
      this.#optionReply(option, C.NBD_REP_INFO, encodeInfoString(C.NBD_INFO_NAME, e.name));
    if (infos.includes(C.NBD_INFO_DESCRIPTION) && e.description) {
      this.#optionReply(option, C.NBD_REP_INFO, encodeInfoString(C.NBD_INFO_DESCRIPTION, e.description));
    }
    this.#optionReply(
      option,
      C.NBD_REP_INFO,
      encodeInfoBlockSize(
        1,
        L.BLOCK_SIZE_PREFERRED,
        Math.min(L.REQUEST_BYTES_MAX, Math.max(e.node.size(), 1)),
      ),
    );
    this.#optionReply(option, C.NBD_REP_ACK);
    if (option === C.NBD_OPT_GO) this.#enterTransmission(e);
  }

  #optMetaContext(option: number, data: Buffer): void {
    const isSet = option === C.NBD_OPT_SET_META_CONTEXT;
    if (!this.#structured) {
      return this.#optionError(option, C.NBD_REP_ERR_INVALID, "meta contexts need structured replies first");
    }
    const { exportName, queries } = decodeMetaContextRequest(data);
    const e = this.#directory.findExport(exportName);
    if (!e) {
      return this.#optionError(option, C.NBD_REP_ERR_UNKNOWN, `no export named "${exportName}"`);
    }
    const bitmaps = e.bitmaps ?? [];
    // Context ids: 1 is base:allocation, 2 + i the export's i-th bitmap (stable for the export).
    let base = false;
    const chosen = new Set<number>();
    if (!isSet && queries.length === 0) {
      base = true;
      bitmaps.forEach((_, i) => chosen.add(i));
    }
    for (const q of queries) {
      if (q === C.BASE_ALLOCATION || (!isSet && q === "base:")) base = true;
      else if (!isSet && (q === QEMU_NAMESPACE || q === DIRTY_BITMAP_PREFIX))
        bitmaps.forEach((_, i) => chosen.add(i));
      else if (q.startsWith(DIRTY_BITMAP_PREFIX)) {
        const i = bitmaps.findIndex((b) => b.name === q.slice(DIRTY_BITMAP_PREFIX.length));
        if (i >= 0) chosen.add(i);
      }
    }
    const contexts: MetaContext[] = [];
    if (base) {
      contexts.push({ id: BASE_ALLOCATION_ID, bits: null });
      this.#optionReply(
        option,
        C.NBD_REP_META_CONTEXT,
        encodeMetaContext(BASE_ALLOCATION_ID, C.BASE_ALLOCATION),
      );
    }
    for (const i of [...chosen].sort((a, b) => a - b)) {
      contexts.push({ id: BASE_ALLOCATION_ID + 1 + i, bits: bitmaps[i].bits });
      this.#optionReply(
        option,
        C.NBD_REP_META_CONTEXT,
        encodeMetaContext(BASE_ALLOCATION_ID + 1 + i, DIRTY_BITMAP_PREFIX + bitmaps[i].name),
      );
    }
    if (isSet) {
      this.#metaExport = exportName;
      this.#contexts = contexts;
    }
    this.#optionReply(option, C.NBD_REP_ACK);
  }

  #enterTransmission(e: NbdExport): void {
    if (this.#metaExport !== e.name) this.#contexts = [];
    this.#export = e;
    if (this.#handshakeTimer) clearTimeout(this.#handshakeTimer);
    this.#handshakeTimer = null;
    this.#decoder.enterTransmission();
    this.#log.debug({ export: e.name, structured: this.#structured }, "transmission");
  }

  // ---- transmission ----------------------------------------------------------------------------------

  /**
   * Admission, asked by the decoder for every request header before the request is taken (and before
   * a write's payload is read). A request that would pass the connection's bounds or the shared
   * budget holds the decoder, unstarted, with the socket paused; whatever releases what it waits for
   * offers it again (#wake). Every release path calls #wake, so no state exists in which nothing can.
   */
  readonly #admit = (h: RequestHeader): boolean => {
    if (this.#closing || h.type === C.NBD_CMD_DISC) return true;
    if (this.#slots >= L.IN_FLIGHT_REQUESTS_MAX) return this.#holdFor(Wait.Slot);
    const need = this.#bufferBytesFor(h);
    if (need > 0) {
      if (this.#grantedBytes > 0) {
        // Granted while held: the same header is offered again now.
        this.#grantedBytes = 0;
      } else {
        const held = this.#account.heldBytes;
        if (held > 0 && held + need > L.CONNECTION_BUFFER_BYTES_MAX) return this.#holdFor(Wait.Slot);
        if (!this.#account.take(need, this.#onGranted)) return this.#holdFor(Wait.Budget);
      }
    }
    this.#slots++;
    this.#admittedBytes = need;
    if (h.type === C.NBD_CMD_WRITE) this.#payloadSinceMs = coarseNowMs();
    this.#lastActivityMs = coarseNowMs();
    return true;
  };

  /** Buffer bytes a request holds: its write payload, or its read reply. */
  #bufferBytesFor(h: RequestHeader): number {
    if (h.length === 0 || h.length > L.REQUEST_BYTES_MAX) return 0;
    if (h.type === C.NBD_CMD_WRITE) return h.length;
    if (h.type !== C.NBD_CMD_READ) return 0;
    const prefix = this.#structured ? OFFSET_DATA_PREFIX_BYTES : C.NBD_SIMPLE_REPLY_BYTES;
    return replyAllocationBytes(prefix + h.length);
  }

  #holdFor(wait: Wait): false {
    this.#wait = wait;
    this.#pauseReading();
    return false;
  }

  readonly #onGranted = (bytes: number): void => {
    this.#grantedBytes = bytes;
    this.#wake();
  };

  /** Offers the held header again; reading resumes unless it is held once more. */
  #wake(): void {
    if (this.#wait === Wait.None || this.#closed) return;
    this.#wait = Wait.None;
    this.#decoder.resume();
    if (!this.#decoder.held) this.#resumeReading();
  }

  #onRequest(h: RequestHeader, payload: Buffer[] | null, oversize: boolean): void {
    const e = this.#export!;
    const bytes = this.#admittedBytes;
    this.#admittedBytes = 0;
    if (h.type === C.NBD_CMD_DISC) {
      this.#decoder.stop();
      return this.#closeAfterInFlight();
    }
    const req = new Request(h, bytes);
    this.#link(req);
    const refusal = this.#refusal(e, h, oversize);
    if (refusal) {
      if (payload) for (const piece of payload) slabTracker.release(piece);
      this.#giveBytes(req);
      return this.#replyError(h, refusal[0], refusal[1], req);
    }
    this.#running++;
    if (h.type === C.NBD_CMD_WRITE) {
      // The hot paths, writes and plain reads: a `then` on the node's promise, no async frame (see #run).
      e.node.write(h.offset, payload!, writeFlags(h.flags)).then(
        () => this.#answer(req, h, payload, false, undefined),
        (err) => this.#answer(req, h, payload, true, err),
      );
      return;
    }
    if (h.type === C.NBD_CMD_READ && !this.#maySparseRead(e.node, h)) {
      this.#plainRead(e.node, h, req).then(
        () => this.#requestDone(req, h, payload),
        (err) => this.#answer(req, h, payload, true, err),
      );
      return;
    }
    this.#run(e.node, h, req).then(
      () => this.#requestDone(req, h, payload),
      (err) => this.#handlerFailed(req, h, payload, err),
    );
  }

  /**
   * Answers a write or plain read the node has finished (a write's success reply here; a read's
   * data went with #plainRead; `err` when it failed), then ends it. An answer that throws is a bug.
   */
  #answer(req: Request, h: RequestHeader, payload: Buffer[] | null, failed: boolean, err: unknown): void {
    try {
      if (failed) this.#runFailed(h, req, err);
      else this.#sendSimple(0, h, req);
    } catch (bug) {
      return this.#handlerFailed(req, h, payload, bug);
    }
    this.#requestDone(req, h, payload);
  }

  #handlerFailed(req: Request, h: RequestHeader, payload: Buffer[] | null, err: unknown): void {
    // Only a bug gets here: operating errors are answered to the client.
    this.#log.error({ err: String(err) }, "request handler failed");
    this.#requestDone(req, h, payload);
    this.#destroy();
  }

  /** Why a request is refused before it reaches the node, or null if it is valid. */
  #refusal(e: NbdExport, h: RequestHeader, oversize: boolean): [BlockError["code"], string] | null {
    const allowed = ALLOWED_FLAGS[h.type];
    if (allowed === undefined) return ["EINVAL", `unknown command ${h.type}`];
    if ((h.flags & ~allowed) !== 0 || (h.flags & C.NBD_CMD_FLAG_DF && !this.#structured)) {
      return ["EINVAL", `flags ${h.flags} not valid for ${C.COMMAND_NAMES[h.type]}`];
    }
    if (oversize) return ["EINVAL", `write of ${h.length} bytes exceeds ${L.REQUEST_BYTES_MAX}`];
    const isWrite =
      h.type === C.NBD_CMD_WRITE || h.type === C.NBD_CMD_TRIM || h.type === C.NBD_CMD_WRITE_ZEROES;
    if (isWrite && e.readOnly) return ["EPERM", "export is read-only"];
    if (h.type === C.NBD_CMD_FLUSH) {
      if (h.offset !== 0 || h.length !== 0) return ["EINVAL", "FLUSH needs offset and length 0"];
    } else if (h.length === 0) {
      return ["EINVAL", "zero-length request"];
    }
    if (h.type === C.NBD_CMD_READ && h.length > L.REQUEST_BYTES_MAX) {
      return [
        this.#structured ? "EOVERFLOW" : "EINVAL",
        `read of ${h.length} bytes exceeds ${L.REQUEST_BYTES_MAX}`,
      ];
    }
    if (h.type === C.NBD_CMD_BLOCK_STATUS && this.#contexts.length === 0)
      return ["EINVAL", "no meta context was negotiated"];
    return null;
  }

  /**
   * Runs one request other than a write and sends its reply; `req` goes with the final reply
   * buffer. Writes, and reads that need no block status, are one `then` on the node's promise in
   * #onRequest instead: this async frame and the `then` on it cost a few hundred bytes of garbage
   * per 4 KiB request.
   */
  async #run(node: BlockNode, h: RequestHeader, req: Request): Promise<void> {
    assert(h.type !== C.NBD_CMD_WRITE, "writes are answered in #onRequest");
    try {
      switch (h.type) {
        case C.NBD_CMD_READ:
          return await this.#read(node, h, req);
        case C.NBD_CMD_FLUSH:
          await node.flush();
          break;
        case C.NBD_CMD_TRIM:
          await node.discard(h.offset, h.length, writeFlags(h.flags));
          break;
        case C.NBD_CMD_WRITE_ZEROES:
          await node.writeZeroes(h.offset, h.length, {
            fua: (h.flags & C.NBD_CMD_FLAG_FUA) !== 0,
            mayTrim: (h.flags & C.NBD_CMD_FLAG_NO_HOLE) === 0,
            fastZero: (h.flags & C.NBD_CMD_FLAG_FAST_ZERO) !== 0,
          });
          break;
        case C.NBD_CMD_CACHE:
          await node.cache(h.offset, h.length);
          break;
        case C.NBD_CMD_BLOCK_STATUS:
          return await this.#blockStatus(node, h, req);
      }
      this.#sendSimple(0, h, req);
    } catch (err) {
      this.#runFailed(h, req, err);
    }
  }

  /** A request's operating error: logged unless the client caused it, and answered with its errno. */
  #runFailed(h: RequestHeader, req: Request, err: unknown): void {
    const be = toBlockError(err);
    if (be.code !== "ENOTSUP" && be.code !== "EINVAL" && be.code !== "ENOSPC") {
      this.#log.warn(
        { command: C.COMMAND_NAMES[h.type], offset: h.offset, length: h.length, err: be.message },
        "request failed",
      );
    }
    this.#replyError(h, be.code, be.message, req);
  }

  /** A read #maySparseRead admits (the others are #plainRead's, from #onRequest): holes as holes. */
  async #read(node: BlockNode, h: RequestHeader, req: Request): Promise<void> {
    const extents = await node.blockStatus(h.offset, h.length);
    if (extents.some((x) => x.zero)) return this.#sparseRead(node, h, extents, req);
    return this.#plainRead(node, h, req);
  }

  /** Whether a read asks block status first, to answer holes as holes (structured, 64 KiB or more). */
  #maySparseRead(node: BlockNode, h: RequestHeader): boolean {
    return (
      this.#structured &&
      h.length >= L.SPARSE_READ_BYTES_MIN &&
      (h.flags & C.NBD_CMD_FLAG_DF) === 0 &&
      node.driver.capabilities.blockStatus
    );
  }

  /**
   * A read answered with its data in one reply buffer (a simple reply, or one OFFSET_DATA chunk).
   * Not async: #onRequest calls it directly for reads that need no block status, as it does writes.
   */
  #plainRead(node: BlockNode, h: RequestHeader, req: Request): Promise<void> {
    const prefix = this.#structured ? OFFSET_DATA_PREFIX_BYTES : C.NBD_SIMPLE_REPLY_BYTES;
    const buf = takeReplyBuffer(prefix + h.length);
    return node.read(h.offset, buf.subarray(prefix)).then(
      () => {
        if (this.#structured) {
          writeOffsetDataPrefix(buf, 0, C.NBD_REPLY_FLAG_DONE, h.cookieHi, h.cookieLo, h.offset, h.length);
        } else {
          writeSimpleReply(buf, 0, 0, h.cookieHi, h.cookieLo);
        }
        req.reply = buf;
        this.#send(buf, req);
      },
      (err: unknown) => {
        giveReplyBuffer(buf);
        throw err;
      },
    );
  }

  /** A read answered chunk by chunk: holes as OFFSET_HOLE, data as OFFSET_DATA, DONE on the last. */
  async #sparseRead(node: BlockNode, h: RequestHeader, extents: Extent[], req: Request): Promise<void> {
    const chunks: Buffer[] = [];
    const end = h.offset + h.length;
    let pos = h.offset;
    for (const x of extents) {
      if (pos >= end) break;
      const n = Math.min(x.offset + x.length, end) - pos;
      if (x.zero) chunks.push(encodeHoleChunk(0, h.cookieHi, h.cookieLo, pos, n));
      else {
        const buf = Buffer.allocUnsafe(OFFSET_DATA_PREFIX_BYTES + n);
        await node.read(pos, buf.subarray(OFFSET_DATA_PREFIX_BYTES));
        writeOffsetDataPrefix(buf, 0, 0, h.cookieHi, h.cookieLo, pos, n);
        chunks.push(buf);
      }
      pos += n;
    }
    if (pos < end) {
      const buf = Buffer.allocUnsafe(OFFSET_DATA_PREFIX_BYTES + (end - pos));
      await node.read(pos, buf.subarray(OFFSET_DATA_PREFIX_BYTES));
      writeOffsetDataPrefix(buf, 0, 0, h.cookieHi, h.cookieLo, pos, end - pos);
      chunks.push(buf);
    }
    chunks[chunks.length - 1].writeUInt16BE(C.NBD_REPLY_FLAG_DONE, 4);
    this.#sendChunks(chunks, req);
  }

  async #blockStatus(node: BlockNode, h: RequestHeader, req: Request): Promise<void> {
    const oneOnly = (h.flags & C.NBD_CMD_FLAG_REQ_ONE) !== 0;
    const size = node.size();
    // The spec: a request past the end of the export SHOULD fail with EINVAL.
    if (h.offset + h.length > size) {
      throw new BlockError("EINVAL", `block status out of range: offset ${h.offset} length ${h.length}`);
    }
    // One chunk per chosen context; the last carries DONE.
    const chunks: Buffer[] = [];
    for (const ctx of this.#contexts) {
      const descriptors =
        ctx.bits === null ? await this.#allocationDescriptors(node, h) : bitmapDescriptors(ctx.bits, h);
      const out = descriptors.slice(0, oneOnly ? 1 : L.BLOCK_STATUS_DESCRIPTORS_MAX);
      chunks.push(encodeBlockStatusChunk(0, h.cookieHi, h.cookieLo, ctx.id, out));
    }
    chunks[chunks.length - 1].writeUInt16BE(C.NBD_REPLY_FLAG_DONE, 4);
    this.#sendChunks(chunks, req);
  }

  /** Sends a reply's chunks in order; the request is answered once the socket has taken the last. */
  #sendChunks(chunks: Buffer[], req: Request): void {
    for (let i = 0; i < chunks.length - 1; i++) this.#send(chunks[i]);
    this.#send(chunks[chunks.length - 1], req);
  }

  async #allocationDescriptors(node: BlockNode, h: RequestHeader): Promise<StatusDescriptor[]> {
    const extents = await node.blockStatus(h.offset, h.length);
    const descriptors: StatusDescriptor[] = [];
    for (const x of extents) {
      const flags = (x.hole ? C.NBD_STATE_HOLE : 0) | (x.zero ? C.NBD_STATE_ZERO : 0);
      const last = descriptors[descriptors.length - 1];
      if (last && last.flags === flags)
        descriptors[descriptors.length - 1] = { length: last.length + x.length, flags };
      else descriptors.push({ length: x.length, flags });
    }
    return descriptors;
  }

  #replyError(h: RequestHeader, code: BlockError["code"], message: string, req: Request): void {
    const errno = NBD_ERRNO[code];
    this.#log.debug({ command: C.COMMAND_NAMES[h.type] ?? h.type, errno, message }, "request refused");
    if (this.#structured && (h.type === C.NBD_CMD_READ || h.type === C.NBD_CMD_BLOCK_STATUS)) {
      this.#send(encodeErrorChunk(errno, message, h.cookieHi, h.cookieLo), req);
    } else {
      this.#sendSimple(errno, h, req);
    }
  }

  /** The request has ended at the node (after every hook): its payload may be reused. */
  #requestDone(req: InFlightRequest, h: RequestHeader, payload: Buffer[] | null): void {
    if (payload) for (const piece of payload) slabTracker.release(piece);
    // A write's budget is its payload, free now; a read's is its reply, free once sent.
    if (h.type === C.NBD_CMD_WRITE) this.#giveBytes(req);
    this.#running--;
    if (this.#running === 0 && this.#idleWaiters.length > 0) {
      const waiters = this.#idleWaiters;
      this.#idleWaiters = [];
      for (const w of waiters) w();
    }
  }

  #giveBytes(req: InFlightRequest): void {
    if (req.bytes === 0) return;
    const n = req.bytes;
    req.bytes = 0;
    this.#account.give(n);
    if (this.#wait === Wait.Slot) this.#wake();
  }

  /** The socket has taken the request's final reply (or dropped it): the request is answered. */
  #link(req: Request): void {
    req.linked = true;
    req.prev = this.#last;
    if (this.#last !== null) this.#last.next = req;
    else this.#first = req;
    this.#last = req;
  }

  #unlink(req: Request): void {
    if (req.prev !== null) req.prev.next = req.next;
    else this.#first = req.next;
    if (req.next !== null) req.next.prev = req.prev;
    else this.#last = req.prev;
    req.prev = req.next = null;
    req.linked = false;
  }

  /** The socket has taken the oldest queued final reply (write callbacks come in write order). */
  readonly #onReplyTaken = (): void => {
    const req = this.#queued[this.#queuedHead];
    if (req === undefined) return; // the connection has closed and forgotten its queue
    this.#queued[this.#queuedHead++] = undefined as unknown as Request;
    if (this.#queuedHead === this.#queued.length) {
      this.#queued.length = 0;
      this.#queuedHead = 0;
    } else if (this.#queuedHead > 1024) {
      this.#queued = this.#queued.slice(this.#queuedHead);
      this.#queuedHead = 0;
    }
    this.#replyWritten(req);
  };

  #replyWritten(req: Request): void {
    if (req.reply !== null) {
      giveReplyBuffer(req.reply);
      req.reply = null;
    }
    if (!req.linked) return;
    this.#unlink(req);
    this.#slots--;
    this.#lastActivityMs = this.#lastWriteMs = coarseNowMs();
    this.#giveBytes(req);
    if (this.#wait === Wait.Slot) this.#wake();
  }

  #resumeReading(): void {
    if (!this.#readingPaused || this.#closed) return;
    this.#readingPaused = false;
    this.#socket.resume();
  }

  #pauseReading(): void {
    if (this.#readingPaused) return;
    this.#readingPaused = true;
    this.#socket.pause();
  }

  // ---- output and life cycle -------------------------------------------------------------------------

  /** Queues a reply. onWritten runs once the socket no longer needs buf (sent, or dropped). */
  /**
   * Queues a reply buffer. With `req`, it is that request's final one: the request is answered once
   * the socket has taken it (or dropped it, when the connection is gone).
   */
  #send(buf: Buffer, req?: Request): void {
    const s = this.#socket;
    if (this.#closed || s.destroyed || !s.writable) {
      if (req) this.#replyWritten(req);
      return;
    }
    if (this.#batchReqs.length > 0) this.#flushBatch();
    if (s.writableLength === 0) this.#lastWriteMs = coarseNowMs();
    if (buf.length >= L.REPLY_DIRECT_BYTES_MIN) {
      // Large replies go at once (after what is corked, keeping order) so the socket drains while
      // the next request reads the disk.
      if (this.#corked) this.#uncork();
    } else this.#corkForTurn();
    if (req === undefined) {
      s.write(buf);
      return;
    }
    this.#queued.push(req);
    s.write(buf, this.#onReplyTaken);
  }

  /** A simple reply, `req`'s final one, added to this turn's batch (see #batch). */
  #sendSimple(error: number, h: RequestHeader, req: Request): void {
    const s = this.#socket;
    if (this.#closed || s.destroyed || !s.writable) return this.#replyWritten(req);
    if (this.#batchReqs.length === 0 && s.writableLength === 0) this.#lastWriteMs = coarseNowMs();
    this.#corkForTurn();
    const batch = (this.#batch ??= Buffer.allocUnsafeSlow(REPLY_BATCH_BYTES));
    // A guard: every batched request holds one of the IN_FLIGHT_REQUESTS_MAX slots the batch has room for.
    if (this.#batchReqs.length * C.NBD_SIMPLE_REPLY_BYTES === batch.length) this.#flushBatch();
    writeSimpleReply(batch, this.#batchReqs.length * C.NBD_SIMPLE_REPLY_BYTES, error, h.cookieHi, h.cookieLo);
    this.#batchReqs.push(req);
  }

  /** Hands the batched simple replies to the socket: one copy, one write, one callback. */
  #flushBatch(): void {
    const n = this.#batchReqs.length;
    if (n === 0) return;
    const used = n * C.NBD_SIMPLE_REPLY_BYTES;
    const out = Buffer.allocUnsafe(used);
    this.#batch!.copy(out, 0, 0, used);
    for (const r of this.#batchReqs) this.#queued.push(r);
    this.#batchReqs.length = 0;
    this.#socket.write(out, () => this.#takeBatch(n));
  }

  /** Corks the socket for the rest of this event-loop turn (uncorked at setImmediate). */
  #corkForTurn(): void {
    if (this.#corked) return;
    this.#corked = true;
    this.#socket.cork();
    setImmediate(this.#uncork);
  }

  readonly #uncork = (): void => {
    this.#corked = false;
    if (this.#batchReqs.length > 0 && !this.#closed && this.#socket.writable) this.#flushBatch();
    if (!this.#socket.destroyed) this.#socket.uncork();
  };

  #whenIdle(): Promise<void> {
    if (this.#running === 0) return Promise.resolve();
    return new Promise((resolve) => this.#idleWaiters.push(resolve));
  }

  /**
   * Stops taking requests. The socket keeps being read (the stopped decoder drops the bytes) so the
   * client's EOF is seen and the connection slot is released; a client that never closes is cut off
   * CLOSE_LINGER_MS after our side has ended.
   */
  #beginClose(why: string): void {
    if (this.#closing) return;
    this.#closing = true;
    this.#log.debug({ why }, "closing");
    this.#decoder.stop();
    // A request held for admission is dropped with the rest of the input.
    this.#wait = Wait.None;
    this.#account.unwait();
    this.#resumeReading();
  }

  #endSocket(): void {
    if (this.#corked) this.#uncork();
    this.#socket.end();
    setTimeout(() => this.#socket.destroy(), L.CLOSE_LINGER_MS).unref();
  }

  /** DISC, ABORT and fatal protocol errors: finish what is in flight, flush replies, close. */
  #closeAfterInFlight(): void {
    this.#beginClose("closing after in-flight requests");
    void this.#whenIdle().then(() => this.#endSocket());
  }

  #destroy(): void {
    this.#decoder.stop();
    this.#socket.destroy();
  }

  #finish(): void {
    if (this.#closed) return;
    this.#closed = true;
    this.#closing = true;
    if (this.#handshakeTimer) clearTimeout(this.#handshakeTimer);
    this.#decoder.stop();
    this.#wait = Wait.None;
    // Replies still queued are lost with the socket: give back everything at once.
    for (let r = this.#first; r !== null;) {
      const next = r.next;
      r.prev = r.next = null;
      r.linked = false;
      r = next;
    }
    this.#first = this.#last = null;
    this.#queued = [];
    this.#queuedHead = 0;
    this.#batchReqs = [];
    this.#account.close();
    this.#directory.onClosed(this);
  }
}

/** A dirty bitmap's runs over the request, as block status descriptors (bit 0: dirty). */
function bitmapDescriptors(bits: DirtyBitmap, h: RequestHeader): StatusDescriptor[] {
  return bits
    .extents(h.offset, h.length)
    .map((x) => ({ length: x.length, flags: x.dirty ? NBD_STATE_DIRTY : 0 }));
}
