/**
 * Adaptive polling of the event loop (`--poll-max-ns`, the name of QEMU's iothread property): before
 * the loop sleeps in epoll_wait, the addon (native/loop_poll.c) polls for up to a window that grows
 * while requests keep arriving within poll-max-ns of each other and shrinks to 0 when they do not.
 *
 * Why: with one request in flight, a client's write wakes a loop that has gone to sleep, and on a
 * virtual machine the wake of a sleeping CPU goes through the hypervisor; measured here (2 vCPUs,
 * docs/ARCHITECTURE.md), 4 KiB QD1 writes took 75 µs a round trip with the loop sleeping between
 * requests and 44 µs with it polling. The price is CPU while a client keeps the daemon busy at low
 * depth: the loop spins instead of sleeping, up to poll-max-ns per wait. An idle daemon does not spin
 * (its waits are long, so the window stays 0); a loaded one does not need to (an event is ready).
 */
import { native } from "../native.js";

/** QEMU's iothreads poll for up to 32 µs; a round trip here needs more (the client's side of it). */
export const POLL_MAX_NS_DEFAULT = 65_536;
/** The window doubles while it grows (QEMU's poll-grow default, 0, means 2) ... */
export const POLL_GROW_DEFAULT = 2;
/** ... and drops to 0 after a long wait (QEMU's poll-shrink default, 0, means reset). */
export const POLL_SHRINK_DEFAULT = 0;
/** poll-max-ns above this is refused: a second of spinning per wait is a mistake, not a setting. */
export const POLL_MAX_NS_LIMIT = 1_000_000_000;

export interface LoopPollStats {
  readonly maxNs: number;
  readonly windowNs: number;
  /** Waits that spun first, and those whose spin saw an event (no sleep). */
  readonly spins: number;
  readonly hits: number;
  readonly spinNs: number;
  /** Waits that slept in the kernel. */
  readonly sleeps: number;
}

/** The mode when none is given: DRIVETAP_POLL_MAX_NS (so a whole test run can set it), else the default. */
export function defaultPollMaxNs(): number {
  const v = process.env.DRIVETAP_POLL_MAX_NS;
  if (v === undefined || v === "") return POLL_MAX_NS_DEFAULT;
  const n = parsePollMaxNs(v);
  if (n === undefined)
    throw new Error(`DRIVETAP_POLL_MAX_NS: expected 0..${POLL_MAX_NS_LIMIT} ns, got '${v}'`);
  return n;
}

/** A whole number of ns in 0..POLL_MAX_NS_LIMIT, or undefined. */
export function parsePollMaxNs(value: string): number | undefined {
  if (!/^\d+$/.test(value)) return undefined;
  const n = Number(value);
  return n <= POLL_MAX_NS_LIMIT ? n : undefined;
}

let active = false;

/**
 * Sets the process's polling (0 stops it). False when the addon lacks it: the loop then sleeps as
 * libuv does, which is correct, only slower at low depth.
 */
export function setLoopPolling(
  maxNs: number,
  grow = POLL_GROW_DEFAULT,
  shrink = POLL_SHRINK_DEFAULT,
): boolean {
  if (!native?.loopPollStart || !native.loopPollStop) return false;
  if (maxNs === 0) {
    native.loopPollStop();
    active = false;
    return true;
  }
  const r = native.loopPollStart(maxNs, grow, shrink);
  active = r === 0;
  return active;
}

/** The counters while polling is on, else undefined. */
export function loopPollStats(): LoopPollStats | undefined {
  if (!active || !native?.loopPollStats) return undefined;
  const [spins, hits, spinNs, sleeps, windowNs, maxNs] = native.loopPollStats();
  return { maxNs: maxNs!, windowNs: windowNs!, spins: spins!, hits: hits!, spinNs: spinNs!, sleeps: sleeps! };
}
