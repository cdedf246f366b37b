/** What stream and mirror share: applying a guest's hooked request to the job's target. */
import { BlockError, toBlockError } from "../core/errors.js";
import type { BlockNode } from "../io/block-node.js";
import type { TrackedRequest } from "../io/tracked-request.js";

/**
 * Applies `req` (write, write-zeroes, discard or flush, with its FUA and trim flags) to `target`, with
 * `data` as the write's buffers (the writer's own, or a copy). Returns the error instead of throwing,
 * so a caller can start it in before() and look at it in after().
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
        op = target.discard(req.offset, req.length, { fua: req.flags.fua });
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
