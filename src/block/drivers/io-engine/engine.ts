/**
 * The interface between the file driver and the way its I/O reaches the kernel. An engine opens a
 * FileIo per file descriptor; the driver only ever calls those methods. Three engines: `sync`
 * (synchronous calls on the event loop for small requests, the threadpool for the rest: sync.ts),
 * `threads` (the libuv threadpool for everything: threads.ts) and `io_uring` (one ring per process,
 * submitted once per loop turn: io-uring.ts). index.ts chooses one at start.
 */
import { BlockError, fromLinuxErrno, systemErrorText } from "../../../core/errors.js";
import { EOPNOTSUPP, native } from "../native.js";

export const IO_ENGINE_NAMES = ["io_uring", "sync", "threads"] as const;
export type IoEngineName = (typeof IO_ENGINE_NAMES)[number];

/** fallocate's modes, as the addon gives them (allocate, punch a hole, zero a range; the last two keep the size). */
export type FallocMode = "allocate" | "punchHole" | "zeroRange";

export interface FileIo {
  readonly engine: IoEngineName;
  /** Reads from `position` until `into` is full or the file ends; resolves to the bytes read. */
  read(into: Buffer, position: number): Promise<number>;
  /** Fills `into` from `position`, with zeros past the file's end (the driver's pread). */
  readFull(into: Buffer, position: number): Promise<void>;
  /** Writes all `total` bytes of `data` at `position` (short writes are continued). */
  writev(data: readonly Buffer[], position: number, total: number): Promise<void>;
  fdatasync(): Promise<void>;
  /** fallocate: 0, or -errno (the driver decides what EOPNOTSUPP means). */
  fallocate(mode: FallocMode, offset: number, length: number): Promise<number>;
  /** Closes the descriptor once every operation started on it has completed. */
  close(): Promise<void>;
}

export interface IoEngine {
  readonly name: IoEngineName;
  /** Takes over `fd`: its FileIo closes it. */
  open(fd: number): FileIo;
}

/** readFull from read: zeros past what the read found (a file shorter than its advertised size). */
export function readZeroFilled(io: FileIo, into: Buffer, position: number): Promise<void> {
  return io.read(into, position).then((done) => {
    if (done < into.length) into.fill(0, done);
  });
}

/** A BlockError for an operation's -errno result, with the C library's text. */
export function ioError(errno: number, what: string): BlockError {
  const e = fromLinuxErrno(errno, what);
  return new BlockError(e.code, `${what}: ${systemErrorText(errno)}`);
}

/** The addon's synchronous fallocate: 0 or -errno (-EOPNOTSUPP without the addon). */
export function nativeFallocate(fd: number, mode: FallocMode, offset: number, length: number): number {
  if (!native) return -EOPNOTSUPP;
  if (mode === "punchHole") return native.punchHole(fd, offset, length);
  if (mode === "zeroRange") return native.zeroRange(fd, offset, length);
  return typeof native.allocate === "function" ? native.allocate(fd, offset, length) : -EOPNOTSUPP;
}
