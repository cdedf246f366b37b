/**
 * Locks on ranges of guest clusters. Every write, write-zeroes and discard holds the clusters it
 * touches, so two requests never allocate (or free and reuse) the same cluster at once, while requests
 * on other clusters run concurrently. A request waits only for holders that arrived before it, so
 * there is no deadlock; an uncontended lock costs a scan of the (short) list of holders.
 */
interface Holder {
  readonly first: number;
  readonly last: number;
  readonly done: Promise<void>;
}

export class ClusterLocks {
  readonly #holders = new Set<Holder>();

  /** Waits for overlapping earlier holders, then holds [first, last]; call the result to release. */
  acquire(first: number, last: number): Promise<() => void> | (() => void) {
    const waitFor: Promise<void>[] = [];
    for (const h of this.#holders) if (h.first <= last && first <= h.last) waitFor.push(h.done);
    let release!: () => void;
    const done = new Promise<void>((resolve) => (release = resolve));
    const holder: Holder = { first, last, done };
    this.#holders.add(holder);
    const unlock = (): void => {
      this.#holders.delete(holder);
      release();
    };
    if (waitFor.length === 0) return unlock;
    return Promise.all(waitFor).then(() => unlock);
  }

  get held(): number {
    return this.#holders.size;
  }
}
