/**
 * What a sync=top job (backup or mirror) must give its target: the source's top layer. A range the
 * source's top layer does not allocate (its data comes from a backing image, `Extent.backing`) is
 * left alone, since a sync=top target shares that backing image (drive-backup and drive-mirror create
 * it so) and reads the same there. A hole of the top layer itself (a qcow2 zero cluster, a hole of a
 * raw image) is left alone only where the target already reads zeros: a zero cluster over a backing
 * image that holds data must reach the target as zeros, or the target would show the old data
 * through its own backing file.
 */
import type { Extent } from "../block/driver.js";
import type { BlockNode } from "../io/block-node.js";

/** Calls `copy` for every run of the source the target must receive for sync=top, in order. */
export async function forEachTopRange(
  source: BlockNode,
  target: BlockNode,
  copy: (offset: number, length: number) => void,
): Promise<void> {
  const size = source.size();
  let pos = 0;
  while (pos < size) {
    const extents = await source.blockStatus(pos, size - pos);
    for (const x of extents) {
      if (x.backing) continue;
      if (!x.hole) copy(x.offset, x.length);
      else for (const [o, n] of await notZeroOn(target, x)) copy(o, n);
    }
    const last = extents[extents.length - 1];
    pos = last.offset + last.length;
  }
}

/** The parts of `x` that `target` does not read as zeros. */
async function notZeroOn(target: BlockNode, x: Extent): Promise<Array<[number, number]>> {
  const out: Array<[number, number]> = [];
  const end = Math.min(x.offset + x.length, target.size());
  let pos = x.offset;
  while (pos < end) {
    const extents = await target.blockStatus(pos, end - pos);
    for (const t of extents) {
      const stop = Math.min(t.offset + t.length, end);
      if (!t.zero) out.push([t.offset, stop - t.offset]);
      pos = stop;
    }
  }
  return out;
}
