/** The null driver: reads zeros, drops writes. For benchmarks of the layers above the driver. */
import { allData, type BlockDriver, type DriverCapabilities, type Extent } from "../driver.js";

export class NullDriver implements BlockDriver {
  readonly driverName = "null";
  readonly capabilities: DriverCapabilities = {
    zeroes: "native",
    fua: "native",
    discard: true,
    // It reads zeros whatever was done to it.
    discardZeroes: true,
    blockStatus: true,
  };
  readonly #size: number;

  constructor(size: number) {
    this.#size = size;
  }
  size(): number {
    return this.#size;
  }
  async pread(_offset: number, into: Buffer): Promise<void> {
    into.fill(0);
  }
  async pwrite(): Promise<void> {}
  async pwriteZeroes(): Promise<void> {}
  async pdiscard(): Promise<void> {}
  async flush(): Promise<void> {}
  async blockStatus(offset: number, length: number): Promise<Extent[]> {
    return allData(offset, length).map((e) => ({ ...e, zero: true }));
  }
  async close(): Promise<void> {}
}
