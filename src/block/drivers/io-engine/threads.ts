/** The threadpool engine: every operation runs on the libuv threadpool (Node's async fs calls). */
import { toBlockError } from "../../../core/errors.js";
import { fdatasyncAsync, readAsync, remainingIov, writevAsync } from "../fs-async.js";
import { nativeFallocate, readZeroFilled, type FallocMode, type FileIo, type IoEngine } from "./engine.js";
import { FdLifetime } from "./fd-lifetime.js";

/** Reads until `into` is full or the file ends, on the threadpool. */
export async function readFullAsync(fd: number, into: Buffer, position: number): Promise<number> {
  let done = 0;
  try {
    while (done < into.length) {
      const n = await readAsync(fd, into, done, position + done);
      if (n === 0) break;
      done += n;
    }
  } catch (err) {
    throw toBlockError(err);
  }
  return done;
}

/** Writes all of `data`, continuing short writes, on the threadpool. */
export async function writevFullAsync(
  fd: number,
  data: readonly Buffer[],
  position: number,
  total: number,
): Promise<void> {
  try {
    let done = await writevAsync(fd, data, position);
    while (done < total) done += await writevAsync(fd, remainingIov(data, done), position + done);
  } catch (err) {
    throw toBlockError(err);
  }
}

export async function fdatasyncFull(fd: number): Promise<void> {
  try {
    await fdatasyncAsync(fd);
  } catch (err) {
    throw toBlockError(err);
  }
}

export class ThreadsFileIo implements FileIo {
  readonly engine = "threads";
  readonly #fd: FdLifetime;

  constructor(fd: number) {
    this.#fd = new FdLifetime(fd);
  }

  async #tracked<T>(op: Promise<T>): Promise<T> {
    this.#fd.begin();
    try {
      return await op;
    } finally {
      this.#fd.end();
    }
  }

  read(into: Buffer, position: number): Promise<number> {
    return this.#tracked(readFullAsync(this.#fd.fd, into, position));
  }

  readFull(into: Buffer, position: number): Promise<void> {
    return readZeroFilled(this, into, position);
  }

  writev(data: readonly Buffer[], position: number, total: number): Promise<void> {
    return this.#tracked(writevFullAsync(this.#fd.fd, data, position, total));
  }

  fdatasync(): Promise<void> {
    return this.#tracked(fdatasyncFull(this.#fd.fd));
  }

  // fallocate has no threadpool form in Node; the addon's call is synchronous (metadata only).
  async fallocate(mode: FallocMode, offset: number, length: number): Promise<number> {
    return nativeFallocate(this.#fd.fd, mode, offset, length);
  }

  close(): Promise<void> {
    return this.#fd.close();
  }
}

export const threadsEngine: IoEngine = {
  name: "threads",
  open: (fd) => new ThreadsFileIo(fd),
};
