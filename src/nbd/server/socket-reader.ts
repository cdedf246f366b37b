/**
 * Large socket reads into recycled slabs.
 *
 * By default Node reads a stream 64 KiB at a time into a new buffer and emits it through the
 * readable-stream machinery. For a 1 MiB write that means 16+ reads, allocations and events, and that
 * path alone tops out near 1.4 GB/s here. Reading the same socket through `onread` into large buffers
 * is faster, but only if the buffers are reused: fresh multi-megabyte buffers cost a page fault per
 * 4 KiB. Measured with fio seq write 1M QD8: 64 KiB 'data' chunks 1.5 GB/s, fresh 4 MiB slabs 1.1 GB/s,
 * recycled slabs 2.8 GB/s.
 *
 * So each connection reads into slices of a slab from a shared pool. A slab goes back to the pool only
 * when nothing references it any more: the decoder retains each chunk it buffers and releases it once
 * consumed, and a write's payload pieces are retained until the request has ended (which is after
 * every write hook's after(): see io/tracked-request.ts for the buffer lifetime contract).
 *
 * Node offers `onread` only for sockets it creates, so an accepted socket is re-wrapped: a new
 * net.Socket takes over its handle. When that is not possible (a Node without the internals it relies
 * on, or DRIVETAP_PLAIN_READS=1), the plain 'data' path is used and the tracker does nothing.
 *
 * After STARTTLS the TLS socket reads the raw one, and its decrypted bytes (a TLS record, at most
 * 16 KiB, at a time) come out through the same stream machinery: a fresh allocation, an ArrayBuffer
 * and a readable-stream push per record. startTlsReading gives the TLS socket the `onread` treatment
 * too (Node's TLS layer copies each record into the buffer a JS listener provides), so TLS reads also
 * land in recycled slabs.
 */
import * as net from "node:net";
import type * as tls from "node:tls";
import { KiB, MiB } from "../../core/units.js";
import type { ChunkTracker } from "../protocol/decoder.js";

export const READ_SLAB_BYTES = 2 * MiB;
/** A read gets at least this much space; a slab with less left is retired. */
export const READ_SPACE_MIN_BYTES = 256 * KiB;
/**
 * Idle slabs kept for reuse, across all connections: all of them, since a dropped slab is 2 MiB of
 * garbage that lives until the next full collection (connection churn made that add up).
 */
export const FREE_SLABS_MAX = 32;
/**
 * Slabs alive at once, across all connections (64 MiB). Each connection keeps one as its current
 * slab, so without this bound 128 connections would pin 256 MiB of read buffers. Past it, reads go
 * into small one-shot buffers that the garbage collector takes back.
 */
export const SLABS_MAX = 32;
/** The size of a one-shot read buffer, used when every slab is taken. */
export const FALLBACK_READ_BYTES = 64 * KiB;

interface Slab {
  readonly buf: Buffer;
  /** Chunks buffered by a decoder plus payload pieces held by requests. */
  refs: number;
  current: boolean;
  /** A one-shot buffer outside the pool: used for one read, then left to the garbage collector. */
  readonly oneShot: boolean;
}

class SlabPool {
  readonly #bySlab = new Map<ArrayBufferLike, Slab>();
  readonly #free: Slab[] = [];

  acquire(): Slab {
    const s =
      this.#free.pop() ??
      (this.#bySlab.size < SLABS_MAX
        ? this.#create()
        : { buf: Buffer.allocUnsafe(FALLBACK_READ_BYTES), refs: 0, current: false, oneShot: true });
    s.current = true;
    return s;
  }

  #create(): Slab {
    const s: Slab = { buf: Buffer.allocUnsafeSlow(READ_SLAB_BYTES), refs: 0, current: false, oneShot: false };
    this.#bySlab.set(s.buf.buffer, s);
    return s;
  }

  retire(s: Slab): void {
    s.current = false;
    if (s.oneShot) return;
    if (s.refs === 0) this.#recycle(s);
  }

  retain(b: Buffer): void {
    const s = this.#bySlab.get(b.buffer);
    if (s) s.refs++;
  }

  release(b: Buffer): void {
    const s = this.#bySlab.get(b.buffer);
    if (s && --s.refs === 0 && !s.current) this.#recycle(s);
  }

  #recycle(s: Slab): void {
    if (this.#free.length < FREE_SLABS_MAX) this.#free.push(s);
    else this.#bySlab.delete(s.buf.buffer);
  }
}

const pool = new SlabPool();

/** What the connection uses to retain and release the buffers it reads. */
export const slabTracker: ChunkTracker = {
  retain: (b) => pool.retain(b),
  release: (b) => pool.release(b),
};

/** Where a socket's reads land: slab space (SlabReader), or fresh buffers (FreshReadSpace). */
export interface ReadSpace {
  /** Space for the next read. */
  next(): Buffer;
  /** The n bytes just read into `space`, as a chunk. */
  take(n: number, space: Buffer): Buffer;
  /** Reading has ended (the socket closed, or another reads it now). */
  close(): void;
}

/** One connection's read position in its current slab. */
class SlabReader implements ReadSpace {
  #slab: Slab = pool.acquire();
  #pos = 0;
  #closed = false;

  next(): Buffer {
    // Closed (the socket went to TLS, which reads into its own buffers): no slab is held any more.
    if (this.#closed) return Buffer.allocUnsafe(FALLBACK_READ_BYTES);
    const slab = this.#slab;
    if (slab.oneShot ? this.#pos > 0 : READ_SLAB_BYTES - this.#pos < READ_SPACE_MIN_BYTES) {
      pool.retire(this.#slab);
      this.#slab = pool.acquire();
      this.#pos = 0;
    }
    return this.#slab.buf.subarray(this.#pos);
  }

  take(n: number, space: Buffer): Buffer {
    this.#pos += n;
    return space.subarray(0, n);
  }

  /** Gives the current slab back; safe to call twice (a slab must never be recycled twice). */
  close(): void {
    if (this.#closed) return;
    this.#closed = true;
    pool.retire(this.#slab);
  }
}

/**
 * Read space in fresh buffers of `bytes`, each filled by successive reads before the next is made
 * (at least READ_SPACE_MIN_FRESH_BYTES left for a read). For a reader whose chunks are held by socket
 * writes of unknown lifetime (a TLS worker relays them), which the slab pool's reference counts do
 * not see: the garbage collector takes a buffer back once every chunk of it has been written. One
 * allocation per `bytes` read instead of one per TLS record or 64 KiB read.
 */
export class FreshReadSpace implements ReadSpace {
  readonly #bytes: number;
  #buf: Buffer;
  #pos = 0;

  constructor(bytes: number) {
    this.#bytes = bytes;
    this.#buf = Buffer.allocUnsafeSlow(bytes);
  }

  next(): Buffer {
    if (this.#bytes - this.#pos < READ_SPACE_MIN_FRESH_BYTES) {
      this.#buf = Buffer.allocUnsafeSlow(this.#bytes);
      this.#pos = 0;
    }
    return this.#buf.subarray(this.#pos);
  }

  take(n: number, space: Buffer): Buffer {
    this.#pos += n;
    return space.subarray(0, n);
  }

  close(): void {}
}

/** A fresh read buffer with less than this left is replaced (one TLS record's plaintext at most). */
export const READ_SPACE_MIN_FRESH_BYTES = 16 * KiB;

const readers = new WeakMap<net.Socket, ReadSpace>();

/**
 * Ends slab reads on a socket from startReading whose reading has been taken over (STARTTLS: the
 * TLS socket reads into buffers of its own). Without this its current slab stays checked out,
 * unused, until the connection closes, and 32 TLS clients would hold every slab.
 */
export function stopSlabReads(socket: net.Socket): void {
  readers.get(socket)?.close();
}

interface HandleInternals {
  _handle?: { useUserBuffer?: unknown } | null;
}

function plainReadsForced(): boolean {
  return process.env.DRIVETAP_PLAIN_READS === "1";
}

/**
 * Starts reading an accepted socket (the server must use pauseOnConnect) and returns the socket to use
 * from now on, which may be a new object. Chunks go to onChunk; the caller's decoder retains them.
 */
export function startReading(accepted: net.Socket, onChunk: (chunk: Buffer) => void): net.Socket {
  const internals = accepted as unknown as HandleInternals;
  const handle = internals._handle;
  if (!handle || typeof handle.useUserBuffer !== "function" || plainReadsForced()) {
    accepted.on("data", onChunk);
    accepted.resume();
    return accepted;
  }
  // Detach the handle from the accepted object, then let that object go: destroying it without a
  // handle releases the server's count of it and leaves the file descriptor open for the new socket.
  internals._handle = null;
  accepted.destroy();
  return slabSocket({ handle: handle as never }, onChunk);
}

/**
 * A socket over a descriptor the caller owns (one end of a socketpair, tls-worker.ts), read into slabs
 * like startReading's; the plain 'data' path under DRIVETAP_PLAIN_READS=1. Closing it closes `fd`.
 */
export function startFdReading(
  fd: number,
  onChunk: (chunk: Buffer) => void,
  space: () => ReadSpace = () => new SlabReader(),
): net.Socket {
  if (plainReadsForced()) {
    const socket = new net.Socket({ fd, allowHalfOpen: true, readable: true, writable: true });
    socket.on("data", onChunk);
    return socket;
  }
  return slabSocket({ fd }, onChunk, space());
}

function slabSocket(
  source: { readonly handle: never } | { readonly fd: number },
  onChunk: (chunk: Buffer) => void,
  reader: ReadSpace = new SlabReader(),
): net.Socket {
  const options = {
    ...source,
    allowHalfOpen: true,
    readable: true,
    writable: true,
    onread: {
      buffer: () => reader.next(),
      callback: (n: number, space: Uint8Array) => {
        onChunk(reader.take(n, space as Buffer));
      },
    },
  };
  const socket = new net.Socket(options as unknown as net.SocketConstructorOpts);
  socket.once("close", () => reader.close());
  readers.set(socket, reader);
  socket.resume();
  return socket;
}

/** The private symbols under which a net.Socket keeps its `onread` buffer, generator and callback. */
interface OnreadSymbols {
  readonly buffer: symbol;
  readonly generator: symbol;
  readonly callback: symbol;
}

let onreadSymbolsFound: OnreadSymbols | null | undefined;

/**
 * Node keeps a socket's `onread` state under module-private symbols, set on every net.Socket; they
 * are looked up once, by description, on a socket made for the purpose (null if this Node has none).
 */
function onreadSymbols(): OnreadSymbols | null {
  if (onreadSymbolsFound !== undefined) return onreadSymbolsFound;
  const probe = new net.Socket();
  const byName = new Map(Object.getOwnPropertySymbols(probe).map((s) => [s.description, s]));
  probe.destroy();
  const buffer = byName.get("kBuffer");
  const generator = byName.get("kBufferGen");
  const callback = byName.get("kBufferCb");
  onreadSymbolsFound = buffer && generator && callback ? { buffer, generator, callback } : null;
  return onreadSymbolsFound;
}

/**
 * Starts reading a TLS socket just made over an accepted one (before its first read, which Node
 * starts on the next tick), into slabs like startReading; the plain 'data' path when this Node lacks
 * what that needs or DRIVETAP_PLAIN_READS=1.
 */
export function startTlsReading(
  secure: tls.TLSSocket,
  onChunk: (chunk: Buffer) => void,
  space: () => ReadSpace = () => new SlabReader(),
): void {
  const handle = (secure as unknown as HandleInternals)._handle;
  const symbols = onreadSymbols();
  if (!handle || typeof handle.useUserBuffer !== "function" || symbols === null || plainReadsForced()) {
    secure.on("data", onChunk);
    return;
  }
  const reader = space();
  const first = reader.next();
  // What net.Socket's constructor sets up for an `onread` option (its read callback reads these),
  // and what it then asks of the handle.
  const state = secure as unknown as Record<symbol, unknown>;
  state[symbols.buffer] = first;
  state[symbols.generator] = () => reader.next();
  state[symbols.callback] = (n: number, space: Uint8Array) => {
    onChunk(reader.take(n, space as Buffer));
  };
  (handle.useUserBuffer as (b: Buffer) => void).call(handle, first);
  secure.once("close", () => reader.close());
  // Flowing, as the 'data' path is: without it the readable side never emits 'end' at the peer's EOF.
  secure.resume();
}
