/**
 * Loader for the optional native addon (native/drivetap_native.c): fallocate and SEEK_DATA/SEEK_HOLE,
 * which Node's fs lacks. When the addon did not build, `native` is null and the file driver falls back
 * to portable I/O (see docs/ARCHITECTURE.md).
 */
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";

export interface NativeCalls {
  /** Each returns >= 0 on success or -errno. */
  punchHole(fd: number, offset: number, length: number): number;
  zeroRange(fd: number, offset: number, length: number): number;
  /** fallocate mode 0: reserve blocks (they read as zeros). */
  allocate(fd: number, offset: number, length: number): number;
  seekData(fd: number, offset: number): number;
  seekHole(fd: number, offset: number): number;
}

function load(): NativeCalls | null {
  if (process.env.DRIVETAP_NO_NATIVE === "1") return null;
  const require = createRequire(import.meta.url);
  // dist/src/block/drivers -> package root
  const root = join(dirname(fileURLToPath(import.meta.url)), "../../../..");
  try {
    return require(join(root, "build/Release/drivetap_native.node")) as NativeCalls;
  } catch {
    return null;
  }
}

export const native: NativeCalls | null = load();

export const ENXIO = 6;
export const EOPNOTSUPP = 95;
