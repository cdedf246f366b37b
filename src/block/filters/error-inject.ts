/**
 * A filter that fails chosen operations with a chosen error, switchable at run time (QMP
 * `x-error-inject`). For testing error policies; not for production data paths.
 */
import { BlockError, type BlockErrorCode } from "../../core/errors.js";
import type { BlockDriver, WriteFlags, ZeroFlags } from "../driver.js";
import { FilterDriver } from "./filter.js";

export interface ErrorInjectSettings {
  failReads: boolean;
  failWrites: boolean;
  failFlush: boolean;
  errno: BlockErrorCode;
}

export class ErrorInjectDriver extends FilterDriver {
  readonly settings: ErrorInjectSettings;
  /** Operations failed so far. */
  injected = 0;

  constructor(next: BlockDriver, settings: Partial<ErrorInjectSettings> = {}, ownsNext = true) {
    super("error-inject", next, ownsNext);
    this.settings = { failReads: false, failWrites: false, failFlush: false, errno: "EIO", ...settings };
  }

  #fail(what: string): never {
    this.injected++;
    throw new BlockError(this.settings.errno, `injected ${this.settings.errno} on ${what}`);
  }

  override pread(offset: number, into: Buffer): Promise<void> {
    if (this.settings.failReads) this.#fail("read");
    return super.pread(offset, into);
  }
  override pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    if (this.settings.failWrites) this.#fail("write");
    return super.pwrite(offset, data, flags);
  }
  override pwriteZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (this.settings.failWrites) this.#fail("write-zeroes");
    return super.pwriteZeroes(offset, length, flags);
  }
  override pdiscard(offset: number, length: number): Promise<void> {
    if (this.settings.failWrites) this.#fail("discard");
    return super.pdiscard(offset, length);
  }
  override flush(): Promise<void> {
    if (this.settings.failFlush) this.#fail("flush");
    return super.flush();
  }
}
