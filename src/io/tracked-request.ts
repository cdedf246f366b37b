/**
 * A tracked request: one I/O in flight through a BlockNode, with what a job needs to see it. For writes
 * it carries the writer's own buffers (the seed's change), so a hook can duplicate the data without
 * reading the source. The buffers are owned by the request: nobody reuses or changes them until the
 * request has ended, and every hook that keeps a reference past its after() call must copy.
 */
import type { WriteFlags, ZeroFlags } from "../block/driver.js";

export type RequestKind = "read" | "write" | "zero" | "discard" | "flush" | "block-status" | "cache";

/** Kinds that change the disk (and flush, which write hooks also see). */
export type HookedKind = "write" | "zero" | "discard" | "flush";

export class TrackedRequest {
  readonly id: number;
  readonly kind: RequestKind;
  readonly offset: number;
  readonly length: number;
  /** For "write": the data, back to back. Null otherwise. */
  readonly data: readonly Buffer[] | null;
  readonly flags: ZeroFlags & WriteFlags;
  /** Overlapping writes wait for this one to end before touching the disk. */
  serialising: boolean;
  #waiters: Array<() => void> | null = null;
  #ended = false;

  constructor(
    id: number,
    kind: RequestKind,
    offset: number,
    length: number,
    data: readonly Buffer[] | null,
    flags: ZeroFlags & WriteFlags,
    serialising: boolean,
  ) {
    this.id = id;
    this.kind = kind;
    this.offset = offset;
    this.length = length;
    this.data = data;
    this.flags = flags;
    this.serialising = serialising;
  }

  get ended(): boolean {
    return this.#ended;
  }

  /** Resolves when the request has ended (successfully or not). */
  whenEnded(): Promise<void> {
    if (this.#ended) return Promise.resolve();
    return new Promise((resolve) => (this.#waiters ??= []).push(resolve));
  }

  end(): void {
    this.#ended = true;
    const waiters = this.#waiters;
    this.#waiters = null;
    if (waiters) for (const w of waiters) w();
  }
}

/**
 * A write hook, attached to a node by a job. before() runs after the request has waited for
 * overlapping serialising requests and before the driver; after() runs once the driver has finished,
 * with the driver's error if it failed. A hook that throws fails the guest's request; a hook that only
 * wants to report catches its own errors. after() is not called when before() of any hook threw.
 */
export interface WriteHook {
  readonly name: string;
  /** Make every hooked write serialising, so overlapping writes reach source and hook in one order. */
  readonly serialise?: boolean;
  before?(req: TrackedRequest): void | Promise<void>;
  after?(req: TrackedRequest, error: Error | undefined): void | Promise<void>;
}
