/**
 * The guard on a raw image whose format was probed rather than given: a write that would put qcow2's
 * magic into its first bytes fails with EPERM, as QEMU restricts writes to block 0 of a probed raw
 * image. Without it a guest could turn its disk into a qcow2 header naming any host file as its
 * backing file, and the next probing open would serve that file to the guest.
 */
import { BlockError } from "../../core/errors.js";
import type { BlockDriver, WriteFlags } from "../driver.js";
import { QCOW_MAGIC } from "../drivers/qcow2/format.js";
import { FilterDriver } from "./filter.js";

/** Bytes at the start of the image that probing looks at. */
const PROBED_BYTES = 4;

export class ProbedRawGuard extends FilterDriver {
  constructor(next: BlockDriver) {
    super(next.driverName, next);
  }

  override pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    if (offset >= PROBED_BYTES) return this.next.pwrite(offset, data, flags);
    return this.#checkedWrite(offset, data, flags);
  }

  async #checkedWrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    const head = Buffer.alloc(PROBED_BYTES);
    await this.next.pread(0, head);
    let pos = offset;
    for (const b of data) {
      for (let i = 0; i < b.length && pos < PROBED_BYTES; i++) head[pos++] = b[i];
      if (pos >= PROBED_BYTES) break;
    }
    if (head.readUInt32BE(0) === QCOW_MAGIC) {
      throw new BlockError(
        "EPERM",
        "writing a qcow2 header to a raw image whose format was probed is refused (serve it with --format raw)",
      );
    }
    return this.next.pwrite(offset, data, flags);
  }
}
