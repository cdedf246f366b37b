/**
 * Loader for the optional native addon (native/drivetap_native.c): fallocate, SEEK_DATA/SEEK_HOLE and
 * OFD byte-range locks, which Node's fs lacks, a hardware CRC-32C, an io_uring ring, dup/socketpair
 * for sockets, and the event loop's adaptive polling. When the addon did not build,
 * `native` is null: the file driver falls back to portable I/O, images are not locked, and
 * block/crc32c.ts uses TypeScript (see docs/ARCHITECTURE.md).
 */
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

export interface NativeCalls {
  /** Each returns >= 0 on success or -errno. */
  punchHole(fd: number, offset: number, length: number): number;
  zeroRange(fd: number, offset: number, length: number): number;
  /** fallocate mode 0: reserve blocks (they read as zeros). */
  allocate(fd: number, offset: number, length: number): number;
  seekData(fd: number, offset: number): number;
  seekHole(fd: number, offset: number): number;
  /**
   * OFD byte-range locks (fcntl F_OFD_SETLK / F_OFD_GETLK). Lock types: LOCK_READ, LOCK_WRITE,
   * LOCK_NONE (unlock). Set never waits: -EAGAIN means another open file description holds a
   * conflicting lock. Test returns the conflicting lock's type, LOCK_NONE if there is none, or -errno.
   * Optional: an addon built before locking was added lacks them.
   */
  ofdSetLock?(fd: number, start: number, length: number, type: number): number;
  ofdTestLock?(fd: number, start: number, length: number, type: number): number;
  /**
   * CRC-32C of the buffers, continuing `seed` (0 to start). Optional: an addon built before it was
   * added lacks it (and the two below).
   */
  crc32c?(buffers: readonly Uint8Array[] | Uint8Array, seed?: number): number;
  /** The C table implementation, even where SSE4.2 is available (for tests). */
  crc32cSoftware?(buffers: readonly Uint8Array[] | Uint8Array, seed?: number): number;
  /** Whether crc32c uses the SSE4.2 crc32 instruction. */
  readonly crc32cHardware?: boolean;
  /** fallocate's mode bits for the io_uring engine's FALLOCATE (the addon knows the platform's values). */
  readonly fallocModes?: {
    readonly punchHole: number;
    readonly zeroRange: number;
    readonly allocate: number;
  };
  /**
   * The io_uring ring (io-engine/io-uring.ts). Absent where the addon was built without
   * <linux/io_uring.h>. uringCreate returns the ring or -errno (setup, op probe or a NOP round trip
   * failed); the queue calls return 0, -EBUSY when the queue is full until the next submit, or -errno.
   * `onCompletions` runs on the event loop when the ring's eventfd fires; it calls uringReap, which
   * fills `completions` with (tag, result) pairs.
   */
  uringCreate?(
    entries: number,
    completions: Int32Array,
    onCompletions: (status: number) => void,
  ): UringHandle | number;
  uringRead?(ring: UringHandle, fd: number, into: Uint8Array, position: number, tag: number): number;
  uringWritev?(
    ring: UringHandle,
    fd: number,
    data: readonly Uint8Array[],
    position: number,
    tag: number,
  ): number;
  uringFsync?(ring: UringHandle, fd: number, datasync: boolean, tag: number): number;
  uringFallocate?(
    ring: UringHandle,
    fd: number,
    mode: number,
    offset: number,
    length: number,
    tag: number,
  ): number;
  /** Entries the kernel took, or -errno; entries it did not take are taken back. */
  uringSubmit?(ring: UringHandle): number;
  /** Drops the queued, unsubmitted entries (as a failed submit would); returns how many. */
  uringDiscardQueued?(ring: UringHandle): number;
  uringReap?(ring: UringHandle): number;
  /** [io_uring_enter calls that submitted, entries submitted, in flight, SQ entries, CQ entries] */
  uringStats?(ring: UringHandle): number[];
  /** 0, or -EBUSY while anything is queued or in flight. */
  uringClose?(ring: UringHandle): number;
  /**
   * fcntl(F_DUPFD_CLOEXEC): a second descriptor of the same socket, or -errno; and socketpair
   * (AF_UNIX, SOCK_STREAM): two connected descriptors, or -errno. nbd/server/tls-worker.ts hands a
   * TLS connection to a worker thread with them. Optional: an older addon lacks them.
   */
  dupCloexec?(fd: number): number;
  unixSocketPair?(): [number, number] | number;
  /**
   * Adaptive polling of the event loop before it sleeps (native/loop_poll.c, io-engine/loop-poll.ts):
   * start (or change the settings) with QEMU's poll-max-ns, poll-grow and poll-shrink, 0 or -errno;
   * stop; and the counters [spins, spins that saw an event, ns spinning, waits that slept, the
   * current window in ns, poll-max-ns]. Optional: an older addon lacks them.
   */
  loopPollStart?(maxNs: number, grow: number, shrink: number): number;
  loopPollStop?(): number;
  loopPollStats?(): number[];
}

/** An opaque ring from uringCreate. */
export type UringHandle = { readonly __uring: unique symbol };

function load(): NativeCalls | null {
  if (process.env.DRIVETAP_NO_NATIVE === "1") return null;
  const require = createRequire(import.meta.url);
  // dist/src/block/drivers -> package root
  const root = join(dirname(fileURLToPath(import.meta.url)), "../../../..");
  try {
    return require(join(root, "build/Release/drivetap_native.node")) as NativeCalls;
  } catch {
    return null;
  }
}

export const native: NativeCalls | null = load();

export const ENXIO = 6;
export const EINTR = 4;
export const EAGAIN = 11;
export const EBUSY = 16;
export const LOCK_READ = 0;
export const LOCK_WRITE = 1;
export const LOCK_NONE = 2;
export const EOPNOTSUPP = 95;
