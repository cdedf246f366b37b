/**
 * Loader for the optional native addon (native/drivetap_native.c): fallocate, SEEK_DATA/SEEK_HOLE and
 * OFD byte-range locks, which Node's fs lacks, a hardware CRC-32C, and dup/socketpair for sockets.
 * When the addon did not build, `native` is null: the file driver falls back to portable I/O, images are not locked, and
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
  /**
   * fcntl(F_DUPFD_CLOEXEC): a second descriptor of the same socket, or -errno; and socketpair
   * (AF_UNIX, SOCK_STREAM): two connected descriptors, or -errno. nbd/server/tls-worker.ts hands a
   * TLS connection to a worker thread with them. Optional: an older addon lacks them.
   */
  dupCloexec?(fd: number): number;
  unixSocketPair?(): [number, number] | number;
}

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
export const EAGAIN = 11;
export const LOCK_READ = 0;
export const LOCK_WRITE = 1;
export const LOCK_NONE = 2;
export const EOPNOTSUPP = 95;
