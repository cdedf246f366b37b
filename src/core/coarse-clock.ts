/**
 * A wall clock read once per tick of a 100 ms timer instead of per call. The NBD server stamps every
 * request and reply with it (ages for diagnosis, idle and stall bounds of seconds), where a
 * Date.now() per event showed up at 4 KiB QD32. The timer is unref'd: it never keeps a process alive.
 */
export const COARSE_CLOCK_RESOLUTION_MS = 100;

let nowMs = Date.now();
let timer: NodeJS.Timeout | null = null;

/** Milliseconds since the epoch, at most COARSE_CLOCK_RESOLUTION_MS behind Date.now(). */
export function coarseNowMs(): number {
  if (timer === null) {
    nowMs = Date.now();
    timer = setInterval(() => (nowMs = Date.now()), COARSE_CLOCK_RESOLUTION_MS);
    timer.unref();
  }
  return nowMs;
}
