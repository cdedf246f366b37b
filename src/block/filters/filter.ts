/**
 * The pass-through filter: wraps the next driver and forwards every call. A filter overrides only
 * what it changes (see error-inject.ts).
 */
import { BlockError } from "../../core/errors.js";
import type {
  BlockDriver,
  DriverCapabilities,
  Extent,
  RemoteLink,
  WriteFlags,
  ZeroFlags,
} from "../driver.js";

export class FilterDriver implements BlockDriver {
  readonly driverName: string;
  readonly next: BlockDriver;
  /** False when `next` belongs to another node (a child given by node name): close leaves it open. */
  readonly ownsNext: boolean;

  constructor(driverName: string, next: BlockDriver, ownsNext = true) {
    this.driverName = driverName;
    this.next = next;
    this.ownsNext = ownsNext;
  }
  get capabilities(): DriverCapabilities {
    return this.next.capabilities;
  }
  get link(): RemoteLink | undefined {
    return this.next.link;
  }
  size(): number {
    return this.next.size();
  }
  /** A filter has its child's size, so resizing it resizes the child, if the child can. */
  resize(sizeBytes: number): Promise<void> {
    if (!this.next.resize) {
      return Promise.reject(new BlockError("ENOTSUP", "Image format driver does not support resize"));
    }
    return this.next.resize(sizeBytes);
  }
  pread(offset: number, into: Buffer): Promise<void> {
    return this.next.pread(offset, into);
  }
  pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    return this.next.pwrite(offset, data, flags);
  }
  pwriteZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    return this.next.pwriteZeroes(offset, length, flags);
  }
  pdiscard(offset: number, length: number): Promise<void> {
    return this.next.pdiscard(offset, length);
  }
  flush(): Promise<void> {
    return this.next.flush();
  }
  blockStatus(offset: number, length: number): Promise<Extent[]> {
    return this.next.blockStatus(offset, length);
  }
  close(): Promise<void> {
    return this.ownsNext ? this.next.close() : Promise.resolve();
  }
  abortQueued(): void {
    // A child that belongs to another node keeps serving that node.
    if (this.ownsNext) this.next.abortQueued?.();
  }
}
