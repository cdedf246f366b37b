/**
 * A token bucket for background copying (a job's `speed`, bytes per second; 0 = unlimited). A copy
 * asks for its bytes before it starts; the bucket says how long to wait. Waits are cut short by
 * wake() (speed changed, job paused or cancelled), after which the caller re-checks its state.
 */
export const RATE_SLICE_MS = 100;

export class TokenBucket {
  #bytesPerSecond: number;
  #available = 0;
  #lastMs = Date.now();
  #wakers = new Set<() => void>();

  constructor(bytesPerSecond: number) {
    this.#bytesPerSecond = bytesPerSecond;
  }

  get speed(): number {
    return this.#bytesPerSecond;
  }

  setSpeed(bytesPerSecond: number): void {
    this.#bytesPerSecond = bytesPerSecond;
    this.#available = 0;
    this.#lastMs = Date.now();
    this.wake();
  }

  /** Wakes every waiter early. */
  wake(): void {
    const w = [...this.#wakers];
    this.#wakers.clear();
    for (const f of w) f();
  }

  #refill(): void {
    const now = Date.now();
    // Allow at most one slice of burst, so a long idle period does not turn into a flood.
    const cap = Math.max(this.#bytesPerSecond * (RATE_SLICE_MS / 1000), 1);
    this.#available = Math.min(cap, this.#available + ((now - this.#lastMs) / 1000) * this.#bytesPerSecond);
    this.#lastMs = now;
  }

  /**
   * Takes `bytes` from the bucket, waiting as needed. Returns false if woken early (the caller should
   * re-check whether to go on and ask again).
   */
  async take(bytes: number): Promise<boolean> {
    if (this.#bytesPerSecond <= 0) return true;
    this.#refill();
    if (this.#available >= bytes || this.#available >= this.#bytesPerSecond * (RATE_SLICE_MS / 1000)) {
      this.#available -= bytes;
      return true;
    }
    const waitMs = Math.ceil(((bytes - this.#available) / this.#bytesPerSecond) * 1000);
    const woken = await new Promise<boolean>((resolve) => {
      const timer = setTimeout(
        () => {
          this.#wakers.delete(waker);
          resolve(false);
        },
        Math.min(waitMs, 1000),
      );
      const waker = (): void => {
        clearTimeout(timer);
        resolve(true);
      };
      this.#wakers.add(waker);
    });
    if (woken) return false;
    this.#refill();
    this.#available -= bytes;
    return true;
  }
}
