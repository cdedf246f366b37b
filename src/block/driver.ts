/**
 * The BlockDriver interface: the small async contract every storage backend implements. Drivers do
 * the I/O they are asked for and nothing else; bounds, tracking, hooks, and the emulation of what a
 * driver lacks (write-zeroes, FUA) live in one place above them, io/block-node.ts.
 */

export interface DriverCapabilities {
  /** "native": pwriteZeroes is implemented (it may still throw ENOTSUP for one request); "emulate": never call it. */
  readonly zeroes: "native" | "emulate";
  /** "native": the driver honours flags.fua itself; "emulate": the node flushes after the write. */
  readonly fua: "native" | "emulate";
  /** Whether pdiscard does anything; discard is advisory, so a no-op is always correct. */
  readonly discard: boolean;
  /**
   * A promise that a successful pdiscard leaves the whole range reading as zeros. Jobs rely on it
   * (stream, mirror: the target must read what the source reads), so set it only where it always
   * holds. It may turn false while the driver is open (the file driver learns that its filesystem
   * cannot punch holes) but never turns true, so a caller that reads it after the discard returned
   * and still sees true knows that discard zeroed.
   */
  readonly discardZeroes: boolean;
  /** Whether blockStatus can report holes; otherwise everything is data. */
  readonly blockStatus: boolean;
}

export interface WriteFlags {
  /** Force unit access: durable before the call returns. */
  readonly fua?: boolean;
}

export interface ZeroFlags extends WriteFlags {
  /** The range may be deallocated (NBD: NO_HOLE not set). */
  readonly mayTrim?: boolean;
  /** Fail with ENOTSUP instead of doing anything slower than a metadata operation. */
  readonly fastZero?: boolean;
}

/** One run of the same allocation state. */
export interface Extent {
  readonly offset: number;
  readonly length: number;
  /** Not allocated: reads return zeros and cost nothing. */
  readonly hole: boolean;
  /** Known to read as zeros. */
  readonly zero: boolean;
  /**
   * This layer allocates nothing here: what is read comes from a backing image (QEMU's "not
   * allocated" in the top layer). sync=top jobs skip such ranges when the target shares that backing
   * image. Absent means false: a hole without a backing image is just a hole.
   */
  readonly backing?: boolean;
}

/**
 * The link of a driver that reaches its storage over a network (the NBD client). Jobs watch it: while
 * it is down they record what the target misses, and when it comes back they resync.
 */
export interface RemoteLink {
  readonly connected: boolean;
  /** Calls `listener` on every change; returns the function that stops it. */
  watch(listener: (connected: boolean) => void): () => void;
}

export interface BlockDriver {
  /** A short name: "file", "memory", "null". */
  readonly driverName: string;
  readonly capabilities: DriverCapabilities;
  /** Present on drivers whose storage is remote. */
  readonly link?: RemoteLink;
  /** Size in bytes; it changes only through resize(). */
  size(): number;
  /**
   * Grows or shrinks the disk (block_resize). Absent on drivers that cannot (null, journal, the NBD
   * client). The node calls it drained, with nothing in flight; grown space reads as zeros.
   */
  resize?(sizeBytes: number): Promise<void>;
  /** Fills `into` with the bytes at offset. The caller has checked bounds. */
  pread(offset: number, into: Buffer): Promise<void>;
  /** Writes the buffers back to back at offset. The buffers must not be changed by the driver. */
  pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void>;
  /** Zeroes a range without a data buffer; may throw ENOTSUP to ask the node to emulate. */
  pwriteZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void>;
  pdiscard(offset: number, length: number): Promise<void>;
  flush(): Promise<void>;
  /** Extents covering at least the start of [offset, offset+length), in order, without gaps. */
  blockStatus(offset: number, length: number): Promise<Extent[]>;
  close(): Promise<void>;
  /**
   * Fails, with ESHUTDOWN, requests the driver holds back before they reach storage (a throttle's
   * queue), so that closing its node does not wait for them. Drivers without such a queue omit it.
   */
  abortQueued?(): void;
}

/** Block status for drivers that cannot see holes: the whole range is data. */
export function allData(offset: number, length: number): Extent[] {
  return [{ offset, length, hole: false, zero: false }];
}
