/** A promise-chain mutex: critical sections that await run one at a time, in arrival order. */
export class Mutex {
  #tail: Promise<unknown> = Promise.resolve();

  run<T>(section: () => Promise<T>): Promise<T> {
    const result = this.#tail.then(section);
    // The next section waits for this one to settle, whether it failed or not.
    this.#tail = result.catch(() => {});
    return result;
  }
}
