/**
 * What stream and mirror share: applying a guest's hooked request to the job's target, and the rule
 * for discards, which is that the target must read what the source reads.
 *
 * A discard is advisory (NBD_CMD_TRIM may be ignored; qemu-nbd ignores it without --discard=unmap),
 * so forwarding it as a discard can leave the target with old data where the source reads zeros. So:
 * - what the source reads after its discard decides (sourceDiscard): zeros if its driver promises
 *   that (capabilities.discardZeroes); its old data if the node never called the driver (discard not
 *   supported); otherwise nobody knows, and the range is marked dirty so the job copies it from the
 *   source;
 * - when the source reads zeros, the target gets write-zeroes that may trim (NBD WRITE_ZEROES without
 *   NO_HOLE), which a target must make read as zeros; only a target whose own discard promises zeros
 *   gets the discard itself (a journal then records the guest's discard as it was).
 */
import { BlockError, toBlockError } from "../core/errors.js";
import type { BlockDriver } from "../block/driver.js";
import type { BlockNode } from "../io/block-node.js";
import type { TrackedRequest } from "../io/tracked-request.js";

/**
 * What the source reads after a discard that succeeded: "zeroes", "unchanged" (the node does not call
 * a driver without discard support, so the old data stays) or "unknown" (the driver may or may not
 * have kept the data: copy the range from the source). Asked in before() to choose what to forward,
 * and again after the source's discard returned, because discardZeroes can turn false meanwhile.
 */
export type SourceDiscard = "zeroes" | "unchanged" | "unknown";

export function sourceDiscard(source: BlockNode): SourceDiscard {
  const caps = source.driver.capabilities;
  if (!caps.discard) return "unchanged";
  return caps.discardZeroes ? "zeroes" : "unknown";
}

function discardZeroes(driver: BlockDriver): boolean {
  const caps = driver.capabilities;
  return caps.discard && caps.discardZeroes;
}

/**
 * Applies `req` (write, write-zeroes, discard or flush, with its FUA and trim flags) to `target`, with
 * `data` as the write's buffers (the writer's own, or a copy). A discard makes the target read zeros
 * (see the top of this file): call it for a discard only when the source reads zeros after it. Returns
 * the error instead of throwing, so a caller can start it in before() and look at it in after().
 */
export function applyToTarget(
  target: BlockNode,
  req: TrackedRequest,
  data: readonly Buffer[] | null,
): Promise<Error | undefined> {
  // Not async: one promise per request instead of two (this runs for every guest write).
  let op: Promise<void>;
  try {
    switch (req.kind) {
      case "write":
        op = target.write(req.offset, data!, req.flags.fua ? FUA : NO_FUA);
        break;
      case "zero":
        op = target.writeZeroes(req.offset, req.length, { fua: req.flags.fua, mayTrim: req.flags.mayTrim });
        break;
      case "discard":
        op = discardZeroes(target.driver)
          ? target.discard(req.offset, req.length, { fua: req.flags.fua }).then(() => {
              // The target learned meanwhile that its discard keeps data: zero the range after all.
              if (!discardZeroes(target.driver)) return zeroesFor(target, req);
            })
          : zeroesFor(target, req);
        break;
      case "flush":
        op = target.flush();
        break;
      default:
        return Promise.resolve(undefined);
    }
  } catch (err) {
    return Promise.resolve(toBlockError(err));
  }
  return op.then(succeeded, toBlockError);
}

/** Write-zeroes that may trim: the node writes real zeros when the driver cannot (or says ENOTSUP). */
function zeroesFor(target: BlockNode, req: TrackedRequest): Promise<void> {
  return target.writeZeroes(req.offset, req.length, req.flags.fua ? FUA_MAY_TRIM : MAY_TRIM);
}

const MAY_TRIM = Object.freeze({ mayTrim: true });
const FUA_MAY_TRIM = Object.freeze({ mayTrim: true, fua: true });
const FUA = Object.freeze({ fua: true });
const NO_FUA = Object.freeze({ fua: false });
const succeeded = (): undefined => undefined;

/**
 * Whether a target error is an outage (the remote target is unreachable: ENOTCONN, or its link is
 * down) rather than a failure. Jobs record what an unreachable target misses and resync later; a
 * failure goes through on-target-error.
 */
export function isTargetOutage(target: BlockNode, err: Error): boolean {
  const link = target.driver.link;
  return (err instanceof BlockError && err.code === "ENOTCONN") || (link !== undefined && !link.connected);
}
