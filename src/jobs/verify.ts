/**
 * Verify: compares a source node with a target node chunk by chunk, by checksum, while guest writes
 * go on, and reports (and on request repairs) the extents where the target differs.
 *
 * - The first pass is lock-free: both sides of a chunk are read at about the same time and hashed. On
 *   a live volume a write can land between the two reads, so a differing chunk is only a suspect.
 * - A suspect is re-checked under the source node's range lock (BlockNode.lockRange): the lock waits
 *   for writes to the chunk already in flight, including a job's after() hook, which is where its copy
 *   to the target finishes, and holds new ones before their hooks run. Only a difference that persists
 *   under the lock is a mismatch. The lock covers one chunk, so a guest waits for at most one re-check.
 * - Under the lock a mismatching chunk is narrowed to 4 KiB sub-chunks, so extents are precise;
 *   adjacent ones merge.
 * - Repair copies the source's sub-chunks to the target under the same lock, then re-reads the target.
 *   New guest writes wait for the lock before a job's hook duplicates them, so a repair never
 *   overwrites newer guest data on the target.
 * - With a job (stream or mirror: anything with source, target and a dirty bitmap), differences in
 *   ranges the job already knows the target misses are reported as pending, not as mismatches, and
 *   are left for the job to resync.
 *
 * Checksums rather than byte comparison: a remote side can later answer with digests instead of data.
 */
import { createHash } from "node:crypto";
import { BlockError } from "../core/errors.js";
import { KiB, MiB } from "../core/units.js";
import type { BlockNode } from "../io/block-node.js";

export const VERIFY_GRANULARITY_DEFAULT = 1 * MiB;
/** A mismatching chunk is narrowed down to this. */
export const VERIFY_SUBCHUNK_BYTES = 4 * KiB;
export const VERIFY_GRANULARITY_MIN = VERIFY_SUBCHUNK_BYTES;
/** Bounds how long a re-check holds guest writes and how much memory a verify takes (two buffers). */
export const VERIFY_GRANULARITY_MAX = 16 * MiB;
/** Extents listed per result list; beyond it bytes are still counted and `truncated` is set. */
export const VERIFY_EXTENTS_MAX = 4096;

const DIGEST = "sha256";

/** What verify needs from a job's dirty bitmap: which clusters the target is known to miss. */
export interface DirtyRanges {
  readonly granularity: number;
  get(cluster: number): boolean;
}

export interface ByteRange {
  readonly offset: number;
  readonly length: number;
}

/** A job whose target should equal its source except where its dirty bitmap says otherwise. */
export interface VerifiableJob {
  readonly source: BlockNode;
  readonly target: BlockNode;
  readonly dirty: DirtyRanges;
  /**
   * Optional: the ranges of the job's own target writes that are not finished (copies from the source
   * whose dirty bits are already clear, background forwards). The target may be behind there without
   * the bitmap saying so; verify counts them as pending.
   */
  copiesInFlight?(): Iterable<ByteRange>;
}

export function isVerifiableJob(job: unknown): job is VerifiableJob {
  if (typeof job !== "object" || job === null) return false;
  const j = job as Partial<Record<keyof VerifiableJob, unknown>>;
  const dirty = j.dirty as Partial<DirtyRanges> | null | undefined;
  return (
    typeof j.source === "object" &&
    j.source !== null &&
    typeof j.target === "object" &&
    j.target !== null &&
    typeof dirty === "object" &&
    dirty !== null &&
    typeof dirty.granularity === "number" &&
    typeof dirty.get === "function" &&
    (j.copiesInFlight === undefined || typeof j.copiesInFlight === "function")
  );
}

export interface VerifyOptions {
  readonly offset?: number;
  /** Bytes from offset; default: to the end. */
  readonly length?: number;
  readonly granularityBytes?: number;
  readonly repair?: boolean;
  /** A job's dirty bitmap: differences inside it are pending, not mismatches. */
  readonly pending?: DirtyRanges;
  /** A job's unfinished target writes (VerifiableJob.copiesInFlight): pending too. */
  readonly copiesInFlight?: () => Iterable<ByteRange>;
}

export interface VerifyExtent {
  offset: number;
  length: number;
  /** Only when repair was asked for: whether the target now equals the source here. */
  repaired?: boolean;
}

export interface VerifyResult {
  checkedBytes: number;
  mismatches: VerifyExtent[];
  mismatchBytes: number;
  pending: VerifyExtent[];
  pendingBytes: number;
  repairedBytes: number;
  /** Chunks that differed in the lock-free pass and were re-checked under the range lock. */
  rechecked: number;
  /** More than VERIFY_EXTENTS_MAX extents in a list: the rest are counted, not listed. */
  truncated: boolean;
}

function digest(buf: Buffer): Buffer {
  return createHash(DIGEST).update(buf).digest();
}

function sameDigest(a: Buffer, b: Buffer): boolean {
  return digest(a).equals(digest(b));
}

function bad(message: string): BlockError {
  return new BlockError("EINVAL", message);
}

/** Checks the arguments; returns [offset, end, granularity]. Errors are sentences for the user. */
function checkArgs(source: BlockNode, target: BlockNode, o: VerifyOptions): [number, number, number] {
  if (source === target) throw bad(`Source and target are the same node '${source.name}'`);
  const size = source.size();
  const targetSize = target.size();
  if (size !== targetSize) {
    throw bad(
      `Source '${source.name}' has ${size} bytes but target '${target.name}' has ${targetSize}: ` +
        `nodes of different sizes cannot be compared`,
    );
  }
  const offset = o.offset ?? 0;
  if (!Number.isSafeInteger(offset) || offset < 0 || offset > size)
    throw bad(`Offset ${offset} is beyond the end of '${source.name}' (${size} bytes)`);
  const length = o.length ?? size - offset;
  if (!Number.isSafeInteger(length) || length < 0 || offset + length > size) {
    throw bad(`Range ${offset}+${length} goes beyond the end of '${source.name}' (${size} bytes)`);
  }
  const granularity = o.granularityBytes ?? VERIFY_GRANULARITY_DEFAULT;
  if (
    !Number.isSafeInteger(granularity) ||
    granularity < VERIFY_GRANULARITY_MIN ||
    granularity > VERIFY_GRANULARITY_MAX ||
    (granularity & (granularity - 1)) !== 0
  ) {
    throw bad(
      `Granularity ${granularity} must be a power of two between ${VERIFY_GRANULARITY_MIN} and ` +
        `${VERIFY_GRANULARITY_MAX}`,
    );
  }
  if (o.repair && target.readOnly) throw bad(`Target '${target.name}' is read-only: it cannot be repaired`);
  if (o.pending && (o.pending.granularity <= 0 || !Number.isSafeInteger(o.pending.granularity)))
    throw bad(`The job's dirty bitmap has no usable granularity`);
  return [offset, offset + length, granularity];
}

/** Accumulates sorted extents, merging adjacent ones with the same repaired state. */
class ExtentList {
  readonly extents: VerifyExtent[] = [];
  bytes = 0;
  truncated = false;

  add(offset: number, length: number, repaired?: boolean): void {
    this.bytes += length;
    const last = this.extents.at(-1);
    if (last && last.offset + last.length === offset && last.repaired === repaired) {
      last.length += length;
      return;
    }
    if (this.extents.length >= VERIFY_EXTENTS_MAX) {
      this.truncated = true;
      return;
    }
    this.extents.push(repaired === undefined ? { offset, length } : { offset, length, repaired });
  }
}

/** Compares (and repairs) source and target over a range; see the module comment. */
export async function verifyNodes(
  source: BlockNode,
  target: BlockNode,
  options: VerifyOptions = {},
): Promise<VerifyResult> {
  const [start, end, granularity] = checkArgs(source, target, options);
  const repair = options.repair ?? false;
  const pendingMap = options.pending;
  const mismatches = new ExtentList();
  const pending = new ExtentList();
  let repairedBytes = 0;
  let rechecked = 0;
  const sourceBuf = Buffer.allocUnsafe(Math.min(granularity, Math.max(end - start, 1)));
  const targetBuf = Buffer.allocUnsafe(sourceBuf.length);

  /**
   * Where the job says the target is behind in [pos, pos + length): dirty clusters and unfinished
   * copies. A range goes dirty -> copying -> in sync, and under the lock nothing makes it behind
   * again, so a range behind at the re-read shows up in a view taken before it or in one taken after.
   */
  const behindView = (pos: number, length: number): ByteRange[] => {
    const out: ByteRange[] = [];
    if (pendingMap) {
      const g = pendingMap.granularity;
      for (let c = Math.floor(pos / g); c * g < pos + length; c++) {
        if (!pendingMap.get(c)) continue;
        const last = out.at(-1);
        if (last && last.offset + last.length === c * g)
          out[out.length - 1] = { offset: last.offset, length: last.length + g };
        else out.push({ offset: c * g, length: g });
      }
    }
    for (const r of options.copiesInFlight?.() ?? []) {
      if (r.offset < pos + length && r.offset + r.length > pos)
        out.push({ offset: r.offset, length: r.length });
    }
    return out;
  };
  let behind: ByteRange[] = [];
  const isPending = (abs: number): boolean =>
    behind.some((r) => r.offset <= abs && abs < r.offset + r.length);
  /** The next byte after `abs` where being pending may change. */
  const nextBoundary = (abs: number): number => {
    let next = Infinity;
    for (const r of behind) {
      if (r.offset > abs) next = Math.min(next, r.offset);
      else if (r.offset + r.length > abs) next = Math.min(next, r.offset + r.length);
    }
    return next;
  };

  /** Re-checks one chunk under the range lock: narrows, classifies and repairs. */
  const recheck = async (pos: number, s: Buffer, t: Buffer): Promise<void> => {
    const unlock = await source.lockRange(pos, s.length);
    try {
      rechecked++;
      const before = behindView(pos, s.length);
      await Promise.all([source.read(pos, s), target.read(pos, t)]);
      if (sameDigest(s, t)) return;
      behind = [...before, ...behindView(pos, s.length)];
      // Sub-chunks at absolute multiples of VERIFY_SUBCHUNK_BYTES, so results do not depend on offset.
      let sub = pos;
      while (sub < pos + s.length) {
        const subEnd = Math.min(
          pos + s.length,
          (Math.floor(sub / VERIFY_SUBCHUNK_BYTES) + 1) * VERIFY_SUBCHUNK_BYTES,
        );
        const from = sub - pos;
        const to = subEnd - pos;
        if (!sameDigest(s.subarray(from, to), t.subarray(from, to))) {
          await classify(sub, s.subarray(from, to), t.subarray(from, to));
        }
        sub = subEnd;
      }
    } finally {
      unlock();
    }
  };

  /** One differing sub-chunk, split where what the job says is behind begins or ends. */
  const classify = async (offset: number, s: Buffer, t: Buffer): Promise<void> => {
    let from = 0;
    while (from < s.length) {
      const p = isPending(offset + from);
      let to = from;
      do to = Math.min(s.length, nextBoundary(offset + to) - offset);
      while (to < s.length && isPending(offset + to) === p);
      const length = to - from;
      if (p) pending.add(offset + from, length);
      else if (!repair) mismatches.add(offset + from, length);
      else {
        const fixed = await repairRange(offset + from, s.subarray(from, to), t.subarray(from, to));
        if (fixed) repairedBytes += length;
        mismatches.add(offset + from, length, fixed);
      }
      from = to;
    }
  };

  /** Writes the source's bytes to the target and reads them back; true if they now match. */
  const repairRange = async (offset: number, s: Buffer, t: Buffer): Promise<boolean> => {
    await target.write(offset, [s]);
    await target.read(offset, t);
    return sameDigest(s, t);
  };

  let pos = start;
  while (pos < end) {
    const chunkEnd = Math.min(end, (Math.floor(pos / granularity) + 1) * granularity);
    const s = sourceBuf.subarray(0, chunkEnd - pos);
    const t = targetBuf.subarray(0, chunkEnd - pos);
    await Promise.all([source.read(pos, s), target.read(pos, t)]);
    if (!sameDigest(s, t)) await recheck(pos, s, t);
    pos = chunkEnd;
  }

  return {
    checkedBytes: end - start,
    mismatches: mismatches.extents,
    mismatchBytes: mismatches.bytes,
    pending: pending.extents,
    pendingBytes: pending.bytes,
    repairedBytes,
    rechecked,
    truncated: mismatches.truncated || pending.truncated,
  };
}
