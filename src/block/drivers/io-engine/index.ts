/**
 * Which I/O engine the file driver uses, chosen once at start (`--io-engine`) for the process: the
 * io_uring ring is a process resource, like the libuv threadpool, so it is held here and shared by
 * every file node (which is what lets a job's target writes join the source's submission). `auto`
 * is the synchronous engine, the fastest measured on this kind of machine; io_uring is there when
 * asked for (`--io-engine io_uring`, blockdev-add `aio`).
 * blockdev-add's `aio` (QEMU's option) picks an engine per node.
 */
import { BlockError } from "../../../core/errors.js";
import { IO_ENGINE_NAMES, type IoEngine } from "./engine.js";
import { IoUringEngine } from "./io-uring.js";
import { syncEngine } from "./sync.js";
import { threadsEngine } from "./threads.js";

export { IO_ENGINE_NAMES, type IoEngine, type IoEngineName, type FileIo } from "./engine.js";
export { IoUringEngine } from "./io-uring.js";

export const IO_ENGINE_MODES = ["auto", ...IO_ENGINE_NAMES] as const;
export type IoEngineMode = (typeof IO_ENGINE_MODES)[number];

/** The mode when none is given: DRIVETAP_IO_ENGINE (so a whole test run can pick one), else auto. */
export const DEFAULT_IO_ENGINE_MODE: IoEngineMode =
  parseIoEngineMode(process.env.DRIVETAP_IO_ENGINE) ?? "auto";

export function parseIoEngineMode(value: string | undefined): IoEngineMode | undefined {
  return (IO_ENGINE_MODES as readonly string[]).includes(value ?? "") ? (value as IoEngineMode) : undefined;
}

let uring: IoUringEngine | undefined;
let uringRefusal: string | undefined;

/** The process's ring, set up on first use; throws ENOTSUP with the reason when io_uring cannot be used. */
export function ioUringEngine(): IoUringEngine {
  if (uring) return uring;
  if (uringRefusal === undefined) {
    const made = IoUringEngine.create();
    if (typeof made === "string") uringRefusal = made;
    else return (uring = made);
  }
  throw new BlockError("ENOTSUP", `Unable to use io_uring: ${uringRefusal}`);
}

/** Whether io_uring works here (sets the ring up if nobody has yet). */
export function ioUringAvailable(): boolean {
  try {
    ioUringEngine();
    return true;
  } catch {
    return false;
  }
}

export function engineForMode(mode: IoEngineMode): IoEngine {
  switch (mode) {
    case "auto":
      // Measured on ext4 here (docs/ARCHITECTURE.md): io_uring is slower than the synchronous
      // engine on four of the five serving workloads (buffered writes go to the kernel's io-wq
      // workers; page-cache reads copy on the event loop inside the submit), so auto is sync.
      return syncEngine;
    case "io_uring":
      return ioUringEngine();
    case "sync":
      return syncEngine;
    case "threads":
      return threadsEngine;
  }
}

let processMode: IoEngineMode = DEFAULT_IO_ENGINE_MODE;
let processEngine: IoEngine | undefined;

/** Chooses the process's engine (the daemon's `--io-engine`); io_uring asked for but refused throws. */
export function setProcessIoEngine(mode: IoEngineMode): IoEngine {
  processEngine = engineForMode(mode);
  processMode = mode;
  return processEngine;
}

/** The engine file nodes use unless told otherwise. */
export function processIoEngine(): IoEngine {
  return (processEngine ??= engineForMode(processMode));
}

/** QEMU's BlockdevAioOptions for a file node. */
export type AioOption = "threads" | "native" | "io_uring";

/**
 * blockdev-add's `aio`: absent, the process's engine; `threads` (blocking calls in a thread pool, in
 * QEMU), the process's engine unless that is io_uring, then the synchronous one, drivetap's pool-backed
 * default before io_uring; `io_uring` the ring; `native` (Linux AIO, which QEMU allows only with
 * cache.direct=on) the ring as well, since drivetap's nearest native async interface is io_uring.
 */
export function engineForAio(aio: AioOption | undefined, cacheDirect: boolean): IoEngine {
  if (aio === undefined) return processIoEngine();
  if (aio === "threads") {
    const e = processIoEngine();
    return e.name === "io_uring" ? syncEngine : e;
  }
  if (aio === "native" && !cacheDirect) {
    throw new BlockError(
      "EINVAL",
      "aio=native was specified, but it requires cache.direct=on, which was not specified.",
    );
  }
  return ioUringEngine();
}

/** Drains and tears down the process's ring (daemon shutdown); a later open makes a new one. */
export async function closeIoUring(): Promise<void> {
  const ring = uring;
  if (!ring) return;
  uring = undefined;
  if (processEngine === ring) processEngine = undefined;
  await ring.close();
}

/** The process's ring if one is set up (nothing is set up by asking). */
export function currentIoUring(): IoUringEngine | undefined {
  return uring;
}
