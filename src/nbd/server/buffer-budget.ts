/**
 * The daemon-wide budget for request and reply buffers: write payloads from the moment their header
 * is read, read replies from allocation until the socket has taken them.
 *
 * Every connection gets an account. Its first `reservedBytes` come from a share set aside for it, so a
 * client with a few small requests in flight is never kept waiting by others; anything beyond comes
 * from the shared rest, granted first come first served. A connection asks for one request at a time
 * (its decoder holds while it waits), so the queue holds at most one entry per connection, and a
 * release hands the freed bytes to the oldest waiter before the releasing connection can ask again:
 * one busy connection cannot starve the others. Requests that do not fit wait unstarted.
 */
import { assert } from "../../core/assert.js";

export class BufferBudget {
  readonly totalBytes: number;
  readonly reservedBytes: number;
  /** Bytes of the shared part in use (the reserved parts are accounted per account). */
  #sharedUsed = 0;
  readonly #sharedBytes: number;
  readonly #waiters: BudgetAccount[] = [];
  #usedBytes = 0;

  /**
   * @param totalBytes the whole budget
   * @param accountsMax how many accounts may exist at once; each gets `reservedBytes` set aside
   * @param reservedBytes the per-account share (the reserved shares take at most half the budget)
   */
  constructor(totalBytes: number, accountsMax: number, reservedBytes: number) {
    this.totalBytes = totalBytes;
    this.reservedBytes = Math.min(reservedBytes, Math.floor(totalBytes / 2 / accountsMax));
    this.#sharedBytes = totalBytes - this.reservedBytes * accountsMax;
  }

  /** The largest single grant that can ever succeed (requests above it must be refused). */
  get grantBytesMax(): number {
    return this.#sharedBytes + this.reservedBytes;
  }

  get usedBytes(): number {
    return this.#usedBytes;
  }

  open(): BudgetAccount {
    return new BudgetAccount(this);
  }

  /** Bytes of the shared part an account holding `held` uses. */
  #sharedPart(held: number): number {
    return Math.max(0, held - this.reservedBytes);
  }

  /** Grants n bytes at once if they fit and nobody waits ahead (for the shared part). */
  tryTake(a: BudgetAccount, n: number): boolean {
    const extra = this.#sharedPart(a.heldBytes + n) - this.#sharedPart(a.heldBytes);
    if (extra > 0 && (this.#waiters.length > 0 || this.#sharedUsed + extra > this.#sharedBytes)) return false;
    this.#sharedUsed += extra;
    this.#count(a, n);
    return true;
  }

  #count(a: BudgetAccount, n: number): void {
    a.heldBytes += n;
    this.#usedBytes += n;
  }

  wait(a: BudgetAccount): void {
    assert(!this.#waiters.includes(a), "an account waits for one grant at a time");
    this.#waiters.push(a);
  }

  unwait(a: BudgetAccount): void {
    const i = this.#waiters.indexOf(a);
    if (i >= 0) this.#waiters.splice(i, 1);
  }

  give(a: BudgetAccount, n: number): void {
    assert(n <= a.heldBytes, "an account gives back more than it holds");
    const freed = this.#sharedPart(a.heldBytes) - this.#sharedPart(a.heldBytes - n);
    a.heldBytes -= n;
    this.#usedBytes -= n;
    this.#sharedUsed -= freed;
    this.#wakeWaiters();
  }

  /** Grants the oldest waiters, in order, as long as each one's request fits. */
  #wakeWaiters(): void {
    while (this.#waiters.length > 0) {
      const a = this.#waiters[0];
      const n = a.wantedBytes;
      const extra = this.#sharedPart(a.heldBytes + n) - this.#sharedPart(a.heldBytes);
      if (this.#sharedUsed + extra > this.#sharedBytes) return;
      this.#waiters.shift();
      this.#sharedUsed += extra;
      this.#count(a, n);
      a.granted();
    }
  }
}

/** One connection's holdings and its (at most one) waiting request. */
export class BudgetAccount {
  readonly #budget: BufferBudget;
  heldBytes = 0;
  wantedBytes = 0;
  #onGranted: ((bytes: number) => void) | null = null;
  #closed = false;

  constructor(budget: BufferBudget) {
    this.#budget = budget;
  }

  /**
   * Takes n bytes now (true), or queues for them and returns false; onGranted(n) then runs once they
   * are held. One request at a time: the caller does not ask again before onGranted.
   */
  take(n: number, onGranted: (bytes: number) => void): boolean {
    assert(!this.#closed && this.#onGranted === null, "budget take while closed or already waiting");
    if (this.#budget.tryTake(this, n)) return true;
    this.wantedBytes = n;
    this.#onGranted = onGranted;
    this.#budget.wait(this);
    return false;
  }

  /** Called by the budget when a queued request is granted. */
  granted(): void {
    const cb = this.#onGranted!;
    const n = this.wantedBytes;
    this.#onGranted = null;
    this.wantedBytes = 0;
    cb(n);
  }

  give(n: number): void {
    if (this.#closed || n === 0) return;
    this.#budget.give(this, n);
  }

  /** Leaves the queue (the waiting request was dropped); what is held stays held. */
  unwait(): void {
    if (this.#onGranted === null) return;
    this.#budget.unwait(this);
    this.#onGranted = null;
    this.wantedBytes = 0;
  }

  /** Gives everything back and leaves the queue; later gives are ignored. */
  close(): void {
    if (this.#closed) return;
    this.#budget.unwait(this);
    this.#onGranted = null;
    const held = this.heldBytes;
    if (held > 0) this.#budget.give(this, held);
    this.#closed = true;
  }
}
