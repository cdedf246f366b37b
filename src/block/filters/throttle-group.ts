/**
 * A throttle group (QMP `object-add qom-type=throttle-group`): one set of limits shared by every
 * throttle node that names it. A request starts at once while the buckets allow and nothing of its
 * direction is queued in the group; otherwise it waits in its node's queue. Waiting requests are
 * released in round-robin over the member nodes, one request per turn (QEMU's throttle-groups.c
 * does the same), so a node with a deep queue cannot starve another. One timer per group, armed for
 * the earliest moment a queued request may start, does all the waking.
 */
import { assert } from "../../core/assert.js";
import { BlockError } from "../../core/errors.js";
import { ThrottleState, hasLimits, type ThrottleConfig } from "../../core/throttle.js";

/** Requests waiting in one group at once, over all its members. NBD admits at most 128 x 256. */
export const THROTTLE_QUEUED_MAX = 65_536;

/** Time and timers, replaceable in tests. */
export interface ThrottleClock {
  nowNs(): number;
  setTimer(fn: () => void, delayMs: number): unknown;
  clearTimer(handle: unknown): void;
}

export const realThrottleClock: ThrottleClock = {
  nowNs: () => performance.now() * 1e6,
  setTimer: (fn, delayMs) => setTimeout(fn, delayMs),
  clearTimer: (handle) => clearTimeout(handle as NodeJS.Timeout),
};

interface Waiter {
  readonly bytes: number;
  readonly resolve: () => void;
  readonly reject: (err: Error) => void;
}

const READ = 0;
const WRITE = 1;

/** One node's place in a group: its two queues (reads, writes). */
export class ThrottleMember {
  readonly group: ThrottleGroup;
  readonly name: string;
  readonly queues: [Waiter[], Waiter[]] = [[], []];

  constructor(group: ThrottleGroup, name: string) {
    this.group = group;
    this.name = name;
  }

  /** Resolves when a request of `bytes` may start; null when it may start now (no promise made). */
  admit(isWrite: boolean, bytes: number): Promise<void> | null {
    return this.group.admit(this, isWrite, bytes);
  }

  get queued(): number {
    return this.queues[READ].length + this.queues[WRITE].length;
  }
}

export class ThrottleGroup {
  readonly id: string;
  readonly #clock: ThrottleClock;
  readonly #state: ThrottleState;
  #limited: boolean;
  readonly #members: ThrottleMember[] = [];
  /** Requests queued per direction over all members. */
  readonly #pending = [0, 0];
  /** Where the round-robin looks first, per direction. */
  readonly #turn = [0, 0];
  #timer: unknown = null;
  /** Requests that had to wait, since the group was made (a test and a diagnosis counter). */
  delayed = 0;

  constructor(id: string, config: ThrottleConfig, clock: ThrottleClock = realThrottleClock) {
    this.id = id;
    this.#clock = clock;
    this.#state = new ThrottleState(config, clock.nowNs());
    this.#limited = hasLimits(config);
  }

  get config(): ThrottleConfig {
    return this.#state.config;
  }

  /** New limits apply at once, with empty buckets; waiting requests are re-checked against them. */
  setConfig(config: ThrottleConfig): void {
    this.#state.setConfig(config, this.#clock.nowNs());
    this.#limited = hasLimits(config);
    this.#disarm();
    this.#dispatch();
  }

  get memberCount(): number {
    return this.#members.length;
  }

  get queued(): number {
    return this.#pending[READ] + this.#pending[WRITE];
  }

  join(name: string): ThrottleMember {
    const m = new ThrottleMember(this, name);
    this.#members.push(m);
    return m;
  }

  /** Fails every request the member has waiting with ESHUTDOWN (its node is closing). */
  abort(member: ThrottleMember): void {
    for (const dir of [READ, WRITE]) {
      const waiters = member.queues[dir].splice(0);
      this.#pending[dir] -= waiters.length;
      for (const w of waiters) {
        w.reject(new BlockError("ESHUTDOWN", `throttle node ${member.name} closed while the request waited`));
      }
    }
    if (this.queued === 0) this.#disarm();
  }

  /** Removes the member (failing what it has waiting); the others keep their turns. */
  leave(member: ThrottleMember): void {
    this.abort(member);
    const i = this.#members.indexOf(member);
    if (i < 0) return;
    this.#members.splice(i, 1);
    for (const dir of [READ, WRITE]) if (this.#turn[dir] > i) this.#turn[dir]--;
  }

  admit(member: ThrottleMember, isWrite: boolean, bytes: number): Promise<void> | null {
    if (!this.#limited) return null;
    const dir = isWrite ? WRITE : READ;
    // Nothing queued ahead of it: it may pass if the buckets allow. Else it queues, so it cannot
    // overtake requests that waited.
    if (this.#pending[dir] === 0 && this.#state.waitNs(isWrite, this.#clock.nowNs()) === 0) {
      this.#state.account(isWrite, bytes);
      return null;
    }
    if (this.queued >= THROTTLE_QUEUED_MAX) {
      return Promise.reject(
        new BlockError("ENOMEM", `throttle group ${this.id}: ${THROTTLE_QUEUED_MAX} requests already wait`),
      );
    }
    return new Promise<void>((resolve, reject) => {
      member.queues[dir].push({ bytes, resolve, reject });
      this.#pending[dir]++;
      this.delayed++;
      this.#arm();
    });
  }

  #disarm(): void {
    if (this.#timer !== null) this.#clock.clearTimer(this.#timer);
    this.#timer = null;
  }

  /** Arms the group's one timer for the earliest moment a queued request may start. */
  #arm(): void {
    if (this.#timer !== null) return;
    const now = this.#clock.nowNs();
    let waitNs = Infinity;
    for (const dir of [READ, WRITE]) {
      if (this.#pending[dir] > 0) waitNs = Math.min(waitNs, this.#state.waitNs(dir === WRITE, now));
    }
    if (waitNs === Infinity) return;
    this.#timer = this.#clock.setTimer(
      () => {
        this.#timer = null;
        this.#dispatch();
      },
      Math.ceil(waitNs / 1e6),
    );
  }

  /** Starts every queued request the buckets allow now, in round-robin, then re-arms for the rest. */
  #dispatch(): void {
    for (const dir of [READ, WRITE]) {
      const isWrite = dir === WRITE;
      while (this.#pending[dir] > 0) {
        if (this.#limited && this.#state.waitNs(isWrite, this.#clock.nowNs()) > 0) break;
        const waiter = this.#nextWaiter(dir);
        if (this.#limited) this.#state.account(isWrite, waiter.bytes);
        waiter.resolve();
      }
    }
    this.#arm();
  }

  #nextWaiter(dir: number): Waiter {
    const n = this.#members.length;
    for (let k = 0; k < n; k++) {
      const i = (this.#turn[dir] + k) % n;
      const waiter = this.#members[i].queues[dir].shift();
      if (waiter) {
        this.#turn[dir] = (i + 1) % n;
        this.#pending[dir]--;
        return waiter;
      }
    }
    assert(false, `throttle group ${this.id}: ${this.#pending[dir]} pending but no member has one`);
  }
}
