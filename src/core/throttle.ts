/**
 * I/O limits as QEMU's util/throttle.c defines them: six leaky buckets (bytes and operations, each
 * total, read and write), each with an average rate, an optional burst rate `max` that may be
 * sustained for `burstLength` seconds, and the level of what was admitted and has not leaked out yet.
 * A request may start when every bucket it counts against is below its size; it is accounted when it
 * starts, so one request may overshoot a bucket by its own size. Pure: time is passed in, in
 * nanoseconds, so the maths can be tested against a model. The group that queues requests and owns
 * the timer is block/filters/throttle-group.ts.
 */

/** QEMU's THROTTLE_VALUE_MAX: the largest rate (and rate times burst length) a bucket accepts. */
export const THROTTLE_VALUE_MAX = 1_000_000_000_000_000;
/** Burst lengths are C `unsigned` in QEMU. */
export const THROTTLE_BURST_LENGTH_MAX = 4_294_967_295;
/** Without a burst rate a bucket still holds a tenth of a second of its average (QEMU's choice). */
export const THROTTLE_DEFAULT_BUCKET_SECONDS = 0.1;
/** With a burst rate, the burst bucket holds a tenth of a second at that rate. */
export const THROTTLE_BURST_BUCKET_SECONDS = 0.1;
const NS_PER_S = 1e9;

/** In QEMU's BucketType order, which is also the order throttle_is_valid checks them in. */
export const BUCKET_TYPES = [
  "bps-total",
  "bps-read",
  "bps-write",
  "iops-total",
  "iops-read",
  "iops-write",
] as const;
export type BucketType = (typeof BUCKET_TYPES)[number];

/** What a bucket is set to; `burstLength` in seconds. */
export interface BucketLimit {
  readonly avg: number;
  readonly max: number;
  readonly burstLength: number;
}

export interface ThrottleConfig {
  readonly buckets: Readonly<Record<BucketType, BucketLimit>>;
  /** iops-size: an operation larger than this counts as size/opSize operations (0: every one counts 1). */
  readonly opSize: number;
}

/** A config refused, with QEMU's message. */
export class ThrottleConfigError extends Error {}

const UNLIMITED: BucketLimit = { avg: 0, max: 0, burstLength: 1 };

export const NO_LIMITS: ThrottleConfig = {
  buckets: Object.fromEntries(BUCKET_TYPES.map((t) => [t, UNLIMITED])) as Record<BucketType, BucketLimit>,
  opSize: 0,
};

/** QEMU's ThrottleLimits member names: `bps-total`, `bps-total-max`, `bps-total-max-length`, ..., `iops-size`. */
export const THROTTLE_LIMIT_NAMES: readonly string[] = [
  ...BUCKET_TYPES.flatMap((t) => [t, `${t}-max`, `${t}-max-length`]),
  "iops-size",
];

/** ThrottleLimits as QMP carries it: any subset of THROTTLE_LIMIT_NAMES, integers. */
export type ThrottleLimits = Readonly<Record<string, number | undefined>>;

/**
 * Applies `limits` over `base` (members not given keep their value, as QEMU's qom-set of `limits`
 * does) and validates the result. Throws ThrottleConfigError with QEMU's texts.
 */
export function applyLimits(base: ThrottleConfig, limits: ThrottleLimits): ThrottleConfig {
  const buckets = { ...base.buckets } as Record<BucketType, BucketLimit>;
  for (const t of BUCKET_TYPES) {
    const avg = limits[t];
    const max = limits[`${t}-max`];
    const length = limits[`${t}-max-length`];
    if (length !== undefined && (length < 0 || length > THROTTLE_BURST_LENGTH_MAX)) {
      // QEMU takes a negative length as a huge unsigned one; a range error says what is wrong.
      throw new ThrottleConfigError(
        `${t}-max-length value must be in the range [0, ${THROTTLE_BURST_LENGTH_MAX}]`,
      );
    }
    buckets[t] = {
      avg: avg ?? buckets[t].avg,
      max: max ?? buckets[t].max,
      burstLength: length ?? buckets[t].burstLength,
    };
  }
  let opSize = base.opSize;
  const size = limits["iops-size"];
  if (size !== undefined) {
    // QEMU takes a negative size as a huge unsigned one, which never splits anything: refuse it instead.
    if (size < 0 || size > THROTTLE_VALUE_MAX) {
      throw new ThrottleConfigError(`iops-size must be within [0, ${THROTTLE_VALUE_MAX}]`);
    }
    opSize = size;
  }
  const config = { buckets, opSize };
  validateThrottleConfig(config);
  return config;
}

/** The config as QMP's ThrottleLimits, every member present (what qom-get of `limits` answers). */
export function configToLimits(config: ThrottleConfig): Record<string, number> {
  const out: Record<string, number> = {};
  for (const t of BUCKET_TYPES) {
    const b = config.buckets[t];
    out[t] = b.avg;
    out[`${t}-max`] = b.max;
    out[`${t}-max-length`] = b.burstLength;
  }
  out["iops-size"] = config.opSize;
  return out;
}

/** QEMU's throttle_is_valid, with its messages, checked in its order. */
export function validateThrottleConfig(config: ThrottleConfig): void {
  const b = config.buckets;
  const mixes = (kind: "bps" | "iops", field: "avg" | "max"): boolean =>
    b[`${kind}-total`][field] > 0 && (b[`${kind}-read`][field] > 0 || b[`${kind}-write`][field] > 0);
  if (mixes("bps", "avg") || mixes("iops", "avg") || mixes("bps", "max") || mixes("iops", "max")) {
    throw new ThrottleConfigError(
      "bps/iops/max total values and read/write values cannot be used at the same time",
    );
  }
  if (config.opSize > 0 && !b["iops-total"].avg && !b["iops-read"].avg && !b["iops-write"].avg) {
    throw new ThrottleConfigError("iops size requires an iops value to be set");
  }
  for (const t of BUCKET_TYPES) {
    const { avg, max, burstLength } = b[t];
    if (avg < 0 || max < 0 || avg > THROTTLE_VALUE_MAX || max > THROTTLE_VALUE_MAX) {
      throw new ThrottleConfigError(`bps/iops/max values must be within [0, ${THROTTLE_VALUE_MAX}]`);
    }
    if (burstLength === 0) throw new ThrottleConfigError("the burst length cannot be 0");
    if (burstLength > 1 && !max) throw new ThrottleConfigError("burst length set without burst rate");
    if (max && burstLength > THROTTLE_VALUE_MAX / max) {
      throw new ThrottleConfigError("burst length too high for this burst rate");
    }
    if (max && !avg) throw new ThrottleConfigError("bps_max/iops_max require corresponding bps/iops values");
    if (max && max < avg) throw new ThrottleConfigError("bps_max/iops_max cannot be lower than bps/iops");
  }
}

/** True when any bucket has a rate: a config without one never delays anything. */
export function hasLimits(config: ThrottleConfig): boolean {
  return BUCKET_TYPES.some((t) => config.buckets[t].avg > 0);
}

/** A bucket's limits and its levels (units: bytes or operations). */
export interface LeakyBucket extends BucketLimit {
  level: number;
  burstLevel: number;
}

/** Lets `deltaNs` of time drain the bucket at its average rate (and the burst level at the burst rate). */
export function leakBucket(bucket: LeakyBucket, deltaNs: number): void {
  bucket.level = Math.max(bucket.level - (bucket.avg * deltaNs) / NS_PER_S, 0);
  if (bucket.burstLength > 1) {
    bucket.burstLevel = Math.max(bucket.burstLevel - (bucket.max * deltaNs) / NS_PER_S, 0);
  }
}

/**
 * How many units the bucket holds before it throttles to the average: `max` for `burstLength`
 * seconds with a burst rate, else a tenth of a second of the average.
 */
export function bucketSize(bucket: BucketLimit): number {
  return bucket.max ? bucket.max * bucket.burstLength : bucket.avg * THROTTLE_DEFAULT_BUCKET_SECONDS;
}

/** Nanoseconds until the bucket lets the next request start (0: now). */
export function bucketWaitNs(bucket: LeakyBucket): number {
  if (!bucket.avg) return 0;
  const extra = bucket.level - bucketSize(bucket);
  if (extra > 0) return (extra * NS_PER_S) / bucket.avg;
  // Below the main size, a burst longer than a second is still held to `max` per second.
  if (bucket.burstLength > 1) {
    const burstExtra = bucket.burstLevel - bucket.max * THROTTLE_BURST_BUCKET_SECONDS;
    if (burstExtra > 0) return (burstExtra * NS_PER_S) / bucket.max;
  }
  return 0;
}

/** The buckets a read or a write counts against: [bytes total, ops total, bytes rw, ops rw]. */
const CHECKED: Readonly<Record<"read" | "write", readonly BucketType[]>> = {
  read: ["bps-total", "iops-total", "bps-read", "iops-read"],
  write: ["bps-total", "iops-total", "bps-write", "iops-write"],
};

/** The six buckets of one config and the time they last leaked. */
export class ThrottleState {
  #config: ThrottleConfig;
  #buckets: Record<BucketType, LeakyBucket>;
  #previousLeakNs: number;

  constructor(config: ThrottleConfig, nowNs: number) {
    this.#config = config;
    this.#buckets = ThrottleState.#fresh(config);
    this.#previousLeakNs = nowNs;
  }

  static #fresh(config: ThrottleConfig): Record<BucketType, LeakyBucket> {
    return Object.fromEntries(
      BUCKET_TYPES.map((t) => [t, { ...config.buckets[t], level: 0, burstLevel: 0 }]),
    ) as Record<BucketType, LeakyBucket>;
  }

  get config(): ThrottleConfig {
    return this.#config;
  }

  /** A new config starts with empty buckets, as QEMU's throttle_config does. */
  setConfig(config: ThrottleConfig, nowNs: number): void {
    this.#config = config;
    this.#buckets = ThrottleState.#fresh(config);
    this.#previousLeakNs = nowNs;
  }

  level(type: BucketType): number {
    return this.#buckets[type].level;
  }

  #leak(nowNs: number): void {
    const delta = nowNs - this.#previousLeakNs;
    if (delta <= 0) return;
    this.#previousLeakNs = nowNs;
    for (const t of BUCKET_TYPES) leakBucket(this.#buckets[t], delta);
  }

  /** Leaks up to `nowNs`, then says how long a read or write must wait before it may start. */
  waitNs(isWrite: boolean, nowNs: number): number {
    this.#leak(nowNs);
    let wait = 0;
    for (const t of CHECKED[isWrite ? "write" : "read"])
      wait = Math.max(wait, bucketWaitNs(this.#buckets[t]));
    return wait;
  }

  /** Counts a request that starts now: its bytes, and 1 operation (or bytes / iops-size). */
  account(isWrite: boolean, bytes: number): void {
    const opSize = this.#config.opSize;
    const units = opSize && bytes > opSize ? bytes / opSize : 1;
    const [bps, ops, bpsRw, opsRw] = CHECKED[isWrite ? "write" : "read"];
    for (const [t, amount] of [
      [bps, bytes],
      [ops, units],
      [bpsRw, bytes],
      [opsRw, units],
    ] as const) {
      const b = this.#buckets[t];
      b.level += amount;
      if (b.burstLength > 1) b.burstLevel += amount;
    }
  }
}
