/**
 * The file driver: raw images with positional I/O on one file descriptor.
 *
 * How reads, writes and flushes reach the kernel is the I/O engine's business (io-engine/): io_uring
 * (one ring per process, one submission per loop turn), sync (synchronous calls for small requests,
 * the threadpool for large ones and while the disk is slow) or threads. The engine is chosen at start
 * for the process, or per node by blockdev-add's `aio`.
 *
 * Discard, write-zeroes and block status use the native addon (fallocate, SEEK_DATA/SEEK_HOLE) when it
 * is built; without it, zeroes are emulated by the node, discard is a no-op, and all is data. Discard
 * promises zeros (capabilities.discardZeroes) only while hole punching works.
 *
 * Every open locks the image in QEMU's scheme (image-lock.ts) before the driver exists, and records the
 * file's identity (device and inode), so the graph can tell that two paths name one file.
 */
import * as fs from "node:fs";
import { BlockError, fromLinuxErrno, systemErrorText, toBlockError } from "../../core/errors.js";
import { MiB } from "../../core/units.js";
import {
  allData,
  type BlockDriver,
  type DriverCapabilities,
  type Extent,
  type ZeroFlags,
} from "../driver.js";
import { processIoEngine, type FileIo, type IoEngine, type IoEngineName } from "./io-engine/index.js";
import { threadsEngine } from "./io-engine/threads.js";
import { assert } from "../../core/assert.js";
import {
  BLK_PERM_RESIZE,
  imagePermissions,
  lockImage,
  updateImageLocks,
  type ImagePermissions,
} from "./image-lock.js";
import { ENXIO, EOPNOTSUPP, native } from "./native.js";

/** Block status stops after this many extents; the caller asks again for the rest. */
export const FILE_EXTENTS_MAX = 1024;
/** preallocation=full writes zeros this much at a time from one shared buffer. */
export const PREALLOC_ZERO_BYTES = 1 * MiB;

/** QEMU's PreallocMode values the file driver does ("metadata" is refused, as QEMU's file driver does). */
export type Preallocation = "off" | "falloc" | "full";

export interface FileDriverOptions {
  readonly readOnly?: boolean;
  /** Force threadpool I/O for every request (for comparison in benchmarks): the threads engine. */
  readonly asyncOnly?: boolean;
  /** The I/O engine; default: the process's (io-engine/index.ts). */
  readonly engine?: IoEngine;
  /** QEMU's force-share: let others hold every permission. Read-only opens only (QEMU's rule). */
  readonly forceShare?: boolean;
  /**
   * Create the file if missing (never truncating it here) and hold the resize permission, for a job
   * target the caller then sizes with truncate() once the lock is held.
   */
  readonly create?: boolean;
}

/** A file's identity: device and inode, whatever path or link reached it. */
export type FileId = string;

export function fileIdOf(st: fs.BigIntStats): FileId {
  return `${st.dev}:${st.ino}`;
}

/** The identity of the file `path` names (links followed), or undefined if there is none. */
export function fileIdAt(path: string): FileId | undefined {
  try {
    return fileIdOf(fs.statSync(path, { bigint: true }));
  } catch {
    return undefined;
  }
}

export class FileDriver implements BlockDriver {
  readonly driverName = "file";
  readonly capabilities: DriverCapabilities;
  readonly path: string;
  /** Device and inode of the open file. */
  readonly fileId: FileId;
  /** This open created the file (an O_EXCL create succeeded). */
  readonly createdFile: boolean;
  /** The permissions this open holds and shares; `locked` says whether they are locked on the file. */
  readonly permissions: ImagePermissions;
  readonly locked: boolean;
  readonly #fd: number;
  /** The engine's handle on #fd: it closes the descriptor once the operations on it have completed. */
  readonly #io: FileIo;
  #size: number;
  #closed = false;
  /** The filesystem answered EOPNOTSUPP to a punch hole: discard keeps the data from now on. */
  #punchUnsupported = false;

  private constructor(
    path: string,
    fd: number,
    st: fs.BigIntStats,
    engine: IoEngine,
    permissions: ImagePermissions,
    locked: boolean,
    createdFile: boolean,
  ) {
    this.path = path;
    this.createdFile = createdFile;
    this.fileId = fileIdOf(st);
    this.permissions = permissions;
    this.locked = locked;
    this.#fd = fd;
    this.#size = Number(st.size);
    this.#io = engine.open(fd);
    const punchWorks = (): boolean => native !== null && !this.#punchUnsupported;
    this.capabilities = {
      zeroes: native ? "native" : "emulate",
      fua: "emulate",
      discard: native !== null,
      // A punched hole reads as zeros. Until the filesystem says it cannot punch, discard zeroes.
      get discardZeroes(): boolean {
        return punchWorks();
      },
      blockStatus: native !== null,
    };
  }

  /**
   * Opens and locks the image. A lock conflict throws ImageLockError (QEMU's message); the file is
   * then closed untouched, and other opens of it keep their locks (they are per open description).
   */
  static open(path: string, options: FileDriverOptions = {}): FileDriver {
    const readOnly = options.readOnly ?? false;
    if (options.forceShare && !readOnly) {
      throw new BlockError("EINVAL", "force-share=on can only be used with read-only images");
    }
    const { O_RDONLY, O_RDWR, O_CREAT, O_EXCL } = fs.constants;
    let fd: number;
    // Whether this open made the file (O_EXCL says so for certain): only then may anyone remove it.
    let createdFile = false;
    // A FIFO would block the event loop inside open() until a writer came (a backing name in a
    // hostile image header can name one): refuse it before opening. The fstat below still checks
    // what was opened.
    if (fs.statSync(path, { throwIfNoEntry: false })?.isFIFO()) {
      throw new BlockError("EINVAL", `${path}: not a regular file`);
    }
    try {
      if (readOnly || !options.create) fd = fs.openSync(path, readOnly ? O_RDONLY : O_RDWR);
      else {
        try {
          fd = fs.openSync(path, O_RDWR | O_CREAT | O_EXCL, 0o644);
          createdFile = true;
        } catch (err) {
          if ((err as NodeJS.ErrnoException).code !== "EEXIST") throw err;
          // There already (or a symlink, dangling or not): open it, creating through the link.
          fd = fs.openSync(path, O_RDWR | O_CREAT, 0o644);
        }
      }
    } catch (err) {
      throw toBlockError(err);
    }
    let id: FileId | undefined;
    try {
      const st = fs.fstatSync(fd, { bigint: true });
      id = fileIdOf(st);
      if (!st.isFile()) throw new BlockError("EINVAL", `${path}: not a regular file`);
      const permissions = imagePermissions({
        readOnly,
        forceShare: options.forceShare,
        resize: options.create,
      });
      const locked = lockImage(fd, path, permissions);
      const engine = options.engine ?? (options.asyncOnly ? threadsEngine : processIoEngine());
      return new FileDriver(path, fd, st, engine, permissions, locked, createdFile);
    } catch (err) {
      // A file this open created is removed again, if the path still names it.
      if (createdFile && id !== undefined && fileIdAt(path) === id) fs.rmSync(path, { force: true });
      fs.closeSync(fd);
      throw toBlockError(err);
    }
  }

  /**
   * Opens `path` (with `options`; `create` to make or remake it) only if `refuse(id)` lets it:
   * `refuse` throws when the file must not be written, for example because a node has it open. It
   * runs on what the path names before the open, so nothing is created or touched, and on the
   * descriptor after it, in case the path changed meanwhile. A file this open created is removed
   * again if that second check fails.
   */
  static openChecked(path: string, options: FileDriverOptions, refuse: (id: FileId) => void): FileDriver {
    const before = fileIdAt(path);
    if (before !== undefined) refuse(before);
    const driver = FileDriver.open(path, options);
    try {
      if (driver.fileId !== before) refuse(driver.fileId);
    } catch (err) {
      driver.removeIfCreated();
      void driver.close();
      throw err;
    }
    return driver;
  }

  /** Removes the file if this open created it and the path still names it; nothing else is ever deleted. */
  removeIfCreated(): void {
    if (this.createdFile && fileIdAt(this.path) === this.fileId) fs.rmSync(this.path, { force: true });
  }

  /** Sets the file's length (a job target being created; needs an open made with `create`). */
  truncate(sizeBytes: number): void {
    assert(
      (this.permissions.perm & BLK_PERM_RESIZE) !== 0,
      "FileDriver.truncate without the resize permission",
    );
    this.#ftruncate(sizeBytes);
  }

  #ftruncate(sizeBytes: number): void {
    try {
      fs.ftruncateSync(this.#fd, sizeBytes);
    } catch (err) {
      throw new BlockError(toBlockError(err).code, `Could not resize file: ${systemErrorText(err)}`);
    }
    this.#size = sizeBytes;
  }

  /** Reads the file's size again after writes past its end (a format written into it, blockdev-create). */
  refreshSize(): void {
    this.#size = Number(fs.fstatSync(this.#fd).size);
  }

  /**
   * Grows or shrinks the file (block_resize, blockdev-create), with QEMU's preallocation modes for
   * the grown part and QEMU's error texts. An open without the resize permission takes it for the
   * call (its lock byte, checked against every other open, as QEMU's permission update does) and
   * gives it back: a process that refuses to share resize (qemu-nbd) keeps the file's size.
   */
  async resize(sizeBytes: number, preallocation: Preallocation = "off"): Promise<void> {
    if (!Number.isSafeInteger(sizeBytes) || sizeBytes < 0) {
      throw new BlockError("EINVAL", "Could not resize file: Invalid argument");
    }
    const current = this.#size;
    if (preallocation !== "off" && sizeBytes < current) {
      throw new BlockError("EINVAL", "Cannot use preallocation for shrinking files");
    }
    const held = this.permissions;
    const widened = { perm: held.perm | BLK_PERM_RESIZE, shared: held.shared };
    const relock = this.locked && (held.perm & BLK_PERM_RESIZE) === 0;
    if (relock) updateImageLocks(this.#fd, this.path, held, widened);
    try {
      if (preallocation === "off") this.#ftruncate(sizeBytes);
      else if (preallocation === "falloc") this.#fallocate(current, sizeBytes);
      else await this.#writeZeroesTo(current, sizeBytes);
    } finally {
      if (relock) updateImageLocks(this.#fd, this.path, widened, held);
    }
  }

  #fallocate(from: number, to: number): void {
    if (to === from) return;
    // fallocate mode 0 reserves the blocks and extends the file to `to`.
    const r =
      native && typeof native.allocate === "function"
        ? native.allocate(this.#fd, from, to - from)
        : -EOPNOTSUPP;
    if (r < 0) {
      throw new BlockError(
        r === -EOPNOTSUPP ? "ENOTSUP" : fromLinuxErrno(-r, "fallocate").code,
        `Could not preallocate new data: ${systemErrorText(-r)}`,
      );
    }
    this.#size = to;
  }

  async #writeZeroesTo(from: number, to: number): Promise<void> {
    // Sizing first lets the filesystem allocate the whole range in fewer, larger extents.
    this.#ftruncate(to);
    const zeros = Buffer.alloc(Math.min(PREALLOC_ZERO_BYTES, Math.max(to - from, 1)));
    try {
      for (let pos = from; pos < to; pos += zeros.length) {
        const n = Math.min(zeros.length, to - pos);
        await this.#io.writev([n === zeros.length ? zeros : zeros.subarray(0, n)], pos, n);
      }
    } catch (err) {
      throw new BlockError(
        toBlockError(err).code,
        `Could not write zeros for preallocation: ${systemErrorText(err)}`,
      );
    }
    try {
      await this.#io.fdatasync();
    } catch (err) {
      throw new BlockError(toBlockError(err).code, `Could not flush file to disk: ${systemErrorText(err)}`);
    }
  }

  /** Whether the native addon (fallocate, SEEK_DATA, image locks) is in use. */
  static get nativeAvailable(): boolean {
    return native !== null;
  }

  size(): number {
    return this.#size;
  }

  /** The engine this file's I/O goes through (query-named-block-nodes shows it). */
  get ioEngine(): IoEngineName {
    return this.#io.engine;
  }

  /**
   * Not async (the read path is as hot as the write path): the engine's own promise. A file shorter
   * than its advertised size reads as zeros past its end.
   */
  pread(offset: number, into: Buffer): Promise<void> {
    return this.#io.readFull(into, offset);
  }

  /** Not async: the sync engine completes a small write at once and hands back a settled promise. */
  pwrite(offset: number, data: readonly Buffer[]): Promise<void> {
    let total = 0;
    for (const b of data) total += b.length;
    return this.#io.writev(data, offset, total);
  }

  async pwriteZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (!native) throw new BlockError("ENOTSUP", "write-zeroes needs the native addon");
    let r = -EOPNOTSUPP;
    // Once the filesystem has said it cannot punch holes, don't ask again on every request.
    if (flags.mayTrim && !this.#punchUnsupported) {
      r = await this.#io.fallocate("punchHole", offset, length);
      if (r === -EOPNOTSUPP) this.#punchUnsupported = true;
    }
    if (r < 0) r = await this.#io.fallocate("zeroRange", offset, length);
    if (r === -EOPNOTSUPP) throw new BlockError("ENOTSUP", "filesystem cannot zero a range in place");
    if (r < 0) throw fromLinuxErrno(-r, "fallocate");
  }

  async pdiscard(offset: number, length: number): Promise<void> {
    if (!native || this.#punchUnsupported) return;
    const r = await this.#io.fallocate("punchHole", offset, length);
    // Discard is advisory: a filesystem without hole punching keeps the data, which is allowed, but
    // from now on discard no longer promises zeros (capabilities.discardZeroes turns false before
    // this returns, so a job that checks it afterwards sees the truth).
    if (r === -EOPNOTSUPP) this.#punchUnsupported = true;
    else if (r < 0) throw fromLinuxErrno(-r, "fallocate(PUNCH_HOLE)");
  }

  /**
   * Reserves blocks for a range (fallocate), so later writes there cost what writes to an allocated
   * file cost. Returns false when the platform or filesystem cannot (nothing changes then).
   */
  preallocate(offset: number, length: number): boolean {
    if (!native || typeof native.allocate !== "function" || length <= 0) return false;
    return native.allocate(this.#fd, offset, length) === 0;
  }

  flush(): Promise<void> {
    return this.#io.fdatasync();
  }

  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    if (!native) return allData(offset, length);
    const out: Extent[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end && out.length < FILE_EXTENTS_MAX) {
      const data = native.seekData(this.#fd, pos);
      if (data === -ENXIO) {
        // No data from pos to the end of the file.
        out.push({ offset: pos, length: end - pos, hole: true, zero: true });
        break;
      }
      if (data < 0) return out.length ? out : allData(offset, length);
      if (data > pos) {
        const stop = Math.min(data, end);
        out.push({ offset: pos, length: stop - pos, hole: true, zero: true });
        pos = stop;
        continue;
      }
      const hole = native.seekHole(this.#fd, pos);
      const stop = hole < 0 ? end : Math.min(hole, end);
      out.push({ offset: pos, length: stop - pos, hole: false, zero: false });
      pos = stop;
    }
    return out;
  }

  async close(): Promise<void> {
    if (this.#closed) return;
    this.#closed = true;
    await this.#io.close();
  }
}
