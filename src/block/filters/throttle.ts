/**
 * The `throttle` filter (QEMU's block/throttle.c): every read, write, write-zeroes and discard waits
 * for its throttle group's limits before it reaches the child. Flush and block status pass at once,
 * as in QEMU: they move no guest data. Closing the node fails what still waits with ESHUTDOWN.
 */
import type { BlockDriver, WriteFlags, ZeroFlags } from "../driver.js";
import { FilterDriver } from "./filter.js";
import type { ThrottleGroup, ThrottleMember } from "./throttle-group.js";

export class ThrottleDriver extends FilterDriver {
  readonly #member: ThrottleMember;

  constructor(next: BlockDriver, group: ThrottleGroup, nodeName: string, ownsNext = true) {
    super("throttle", next, ownsNext);
    this.#member = group.join(nodeName);
  }

  get group(): ThrottleGroup {
    return this.#member.group;
  }

  /** Requests of this node waiting for the group's limits. */
  get queued(): number {
    return this.#member.queued;
  }

  override pread(offset: number, into: Buffer): Promise<void> {
    const wait = this.#member.admit(false, into.length);
    return wait ? wait.then(() => super.pread(offset, into)) : super.pread(offset, into);
  }
  override pwrite(offset: number, data: readonly Buffer[], flags: WriteFlags): Promise<void> {
    let bytes = 0;
    for (const b of data) bytes += b.length;
    const wait = this.#member.admit(true, bytes);
    return wait ? wait.then(() => super.pwrite(offset, data, flags)) : super.pwrite(offset, data, flags);
  }
  override pwriteZeroes(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const wait = this.#member.admit(true, length);
    return wait
      ? wait.then(() => super.pwriteZeroes(offset, length, flags))
      : super.pwriteZeroes(offset, length, flags);
  }
  override pdiscard(offset: number, length: number): Promise<void> {
    const wait = this.#member.admit(true, length);
    return wait ? wait.then(() => super.pdiscard(offset, length)) : super.pdiscard(offset, length);
  }
  override abortQueued(): void {
    this.group.abort(this.#member);
    super.abortQueued();
  }
  override close(): Promise<void> {
    this.group.leave(this.#member);
    return super.close();
  }
}
