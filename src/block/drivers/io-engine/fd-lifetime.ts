/**
 * Counts the operations in flight on one descriptor, so that close() waits for them: a descriptor
 * closed under an operation could be reused by the next open and receive that operation's data.
 */
import * as fs from "node:fs";

export class FdLifetime {
  readonly fd: number;
  #inflight = 0;
  #closing: Promise<void> | undefined;
  #wake: (() => void) | undefined;

  constructor(fd: number) {
    this.fd = fd;
  }

  begin(): void {
    this.#inflight++;
  }

  end(): void {
    this.#inflight--;
    if (this.#inflight === 0 && this.#wake) this.#wake();
  }

  /** Resolves once nothing is in flight and the descriptor is closed; later calls share it. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      if (this.#inflight > 0) await new Promise<void>((resolve) => (this.#wake = resolve));
      fs.closeSync(this.fd);
    })();
    return this.#closing;
  }
}
