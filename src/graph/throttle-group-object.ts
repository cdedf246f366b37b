/**
 * `throttle-group` objects: QEMU's ThrottleGroupProperties (`limits`, a ThrottleLimits, and the
 * same members spelled flat with an `x-` prefix) turned into a ThrottleGroup that throttle nodes
 * join by id. The flat spellings win over `limits` whatever their order, as in QEMU 7.2, and are
 * fixed once the object exists; `limits` can be changed later (qom-set).
 */
import { ThrottleGroup } from "../block/filters/throttle-group.js";
import {
  applyLimits,
  NO_LIMITS,
  THROTTLE_BURST_LENGTH_MAX,
  THROTTLE_LIMIT_NAMES,
  ThrottleConfigError,
  type ThrottleLimits,
} from "../core/throttle.js";

/** `x-bps-total`, ..., `x-iops-size`: the flat spellings of every ThrottleLimits member. */
export const THROTTLE_FLAT_NAMES: readonly string[] = THROTTLE_LIMIT_NAMES.map((n) => `x-${n}`);

export interface ThrottleGroupObject {
  readonly id: string;
  readonly qomType: "throttle-group";
  readonly group: ThrottleGroup;
}

/** Builds the group; throws ThrottleConfigError with QEMU's texts. */
export function createThrottleGroup(
  id: string,
  limits: ThrottleLimits | undefined,
  flat: Readonly<Record<string, number | undefined>>,
): ThrottleGroupObject {
  const merged: Record<string, number | undefined> = { ...limits };
  for (const name of THROTTLE_FLAT_NAMES) {
    const v = flat[name];
    if (v === undefined) continue;
    if (v < 0) throw new ThrottleConfigError("Property values cannot be negative");
    if (name.endsWith("-max-length") && v > THROTTLE_BURST_LENGTH_MAX) {
      throw new ThrottleConfigError(`${name} value must be in the range [0, ${THROTTLE_BURST_LENGTH_MAX}]`);
    }
    merged[name.slice(2)] = v;
  }
  return { id, qomType: "throttle-group", group: new ThrottleGroup(id, applyLimits(NO_LIMITS, merged)) };
}
