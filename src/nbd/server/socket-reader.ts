/**
 * Large socket reads. By default Node reads a stream 64 KiB at a time into a new buffer and emits it
 * through the readable-stream machinery. For a 1 MiB write that means 16+ reads, allocations and
 * events. That path alone tops out near 1.4 GB/s here, while the same socket read into 1 MiB buffers
 * through `onread` reaches 2 GB/s. Node offers `onread` only for sockets it creates, so an accepted
 * socket is re-wrapped: a new net.Socket takes over its handle with `onread`, reading into slices of
 * a large slab.
 *
 * Slices are never reused: a payload that a request (or a job's hook) holds keeps its slab alive,
 * and the next read goes into fresh space. When the re-wrap is not possible (a Node without the
 * internals it relies on), the plain 'data' path is used.
 */
import * as net from "node:net";
import { MiB } from "../../core/units.js";

export const READ_SLAB_BYTES = 4 * MiB;
/** A read gets at least this much space; a slab with less left is retired. */
export const READ_SPACE_MIN_BYTES = 1 * MiB;

interface HandleInternals {
  _handle?: { useUserBuffer?: unknown } | null;
}

class ReadSlab {
  #slab = Buffer.allocUnsafe(READ_SLAB_BYTES);
  #pos = 0;

  /** The space for the next read. */
  next(): Buffer {
    if (READ_SLAB_BYTES - this.#pos < READ_SPACE_MIN_BYTES) {
      this.#slab = Buffer.allocUnsafe(READ_SLAB_BYTES);
      this.#pos = 0;
    }
    return this.#slab.subarray(this.#pos);
  }

  /** Claims the n bytes just read into `space`. */
  take(n: number, space: Buffer): Buffer {
    this.#pos += n;
    return space.subarray(0, n);
  }
}

/**
 * Starts reading an accepted socket (the server must use pauseOnConnect) and returns the socket to use
 * from now on, which may be a new object.
 */
export function startReading(accepted: net.Socket, onChunk: (chunk: Buffer) => void): net.Socket {
  const internals = accepted as unknown as HandleInternals;
  const handle = internals._handle;
  if (!handle || typeof handle.useUserBuffer !== "function" || process.env.DRIVETAP_PLAIN_READS === "1") {
    accepted.on("data", onChunk);
    accepted.resume();
    return accepted;
  }
  const slab = new ReadSlab();
  // Detach the handle from the accepted object, then let that object go: destroying it without a
  // handle releases the server's count of it and leaves the file descriptor open for the new socket.
  internals._handle = null;
  accepted.destroy();
  const socket = new net.Socket({
    handle: handle as never,
    allowHalfOpen: true,
    readable: true,
    writable: true,
    onread: {
      buffer: () => slab.next(),
      callback: (n: number, space: Uint8Array) => {
        onChunk(slab.take(n, space as Buffer));
      },
    },
  } as net.SocketConstructorOpts);
  socket.resume();
  return socket;
}
