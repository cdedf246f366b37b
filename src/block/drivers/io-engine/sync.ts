/**
 * The synchronous engine (drivetap's I/O before io_uring): small requests use synchronous
 * pread/pwritev on the event loop, because on this kind of machine the threadpool hop costs more
 * than a page-cache copy of 4 KiB (docs/ARCHITECTURE.md has the numbers). Synchronous calls stall
 * every connection while the disk is slow, so the cost is bounded: a call that takes longer than
 * SYNC_IO_SLOW_MS switches the file to threadpool I/O for ASYNC_BACKOFF_MS, and requests above
 * SYNC_IO_BYTES_MAX always use the threadpool. fdatasync always does.
 */
import * as fs from "node:fs";
import { performance } from "node:perf_hooks";
import { toBlockError } from "../../../core/errors.js";
import { KiB } from "../../../core/units.js";
import { remainingIov } from "../fs-async.js";
import { nativeFallocate, readZeroFilled, type FallocMode, type FileIo, type IoEngine } from "./engine.js";
import { ThreadsFileIo } from "./threads.js";

export const SYNC_IO_BYTES_MAX = 128 * KiB;
export const SYNC_IO_SLOW_MS = 4;
export const ASYNC_BACKOFF_MS = 500;
const DONE: Promise<void> = Promise.resolve();

class SyncFileIo implements FileIo {
  readonly engine = "sync";
  readonly #fd: number;
  /** Large requests, flushes and slow periods go here; it also owns closing the descriptor. */
  readonly #threads: ThreadsFileIo;
  #asyncUntilMs = 0;

  constructor(fd: number) {
    this.#fd = fd;
    this.#threads = new ThreadsFileIo(fd);
  }

  /** The start time of a synchronous call for `length` bytes, or -1 when it goes to the threadpool. */
  #syncStart(length: number): number {
    if (length > SYNC_IO_BYTES_MAX) return -1;
    const now = performance.now();
    return now >= this.#asyncUntilMs ? now : -1;
  }

  #timed(startMs: number): void {
    const now = performance.now();
    if (now - startMs > SYNC_IO_SLOW_MS) this.#asyncUntilMs = now + ASYNC_BACKOFF_MS;
  }

  /** Not async, as writev: a small read completes synchronously and hands back a settled promise. */
  read(into: Buffer, position: number): Promise<number> {
    const t0 = this.#syncStart(into.length);
    if (t0 < 0) return this.#threads.read(into, position);
    try {
      return Promise.resolve(this.#readSync(into, position, t0));
    } catch (err) {
      return Promise.reject(toBlockError(err));
    }
  }

  /** The driver's pread, the hot read path: a small read returns the one shared settled promise. */
  readFull(into: Buffer, position: number): Promise<void> {
    const t0 = this.#syncStart(into.length);
    if (t0 < 0) return readZeroFilled(this.#threads, into, position);
    try {
      const done = this.#readSync(into, position, t0);
      if (done < into.length) into.fill(0, done);
    } catch (err) {
      return Promise.reject(toBlockError(err));
    }
    return DONE;
  }

  #readSync(into: Buffer, position: number, t0: number): number {
    let done = 0;
    while (done < into.length) {
      const n = fs.readSync(this.#fd, into, done, into.length - done, position + done);
      if (n === 0) break;
      done += n;
    }
    this.#timed(t0);
    return done;
  }

  /** Not async: a small write completes synchronously and hands back a settled promise. */
  writev(data: readonly Buffer[], position: number, total: number): Promise<void> {
    const t0 = this.#syncStart(total);
    if (t0 < 0) return this.#threads.writev(data, position, total);
    try {
      let done = fs.writevSync(this.#fd, data as Buffer[], position);
      while (done < total) done += fs.writevSync(this.#fd, remainingIov(data, done), position + done);
      this.#timed(t0);
    } catch (err) {
      return Promise.reject(toBlockError(err));
    }
    return DONE;
  }

  fdatasync(): Promise<void> {
    return this.#threads.fdatasync();
  }

  async fallocate(mode: FallocMode, offset: number, length: number): Promise<number> {
    return nativeFallocate(this.#fd, mode, offset, length);
  }

  close(): Promise<void> {
    return this.#threads.close();
  }
}

export const syncEngine: IoEngine = {
  name: "sync",
  open: (fd) => new SyncFileIo(fd),
};
