/**
 * What block-stream and block-commit share: which clusters the layers of a backing chain hold
 * (QEMU's bdrv_is_allocated_above), and the copy of one range from a chain's view into an image.
 */
import type { BlockDriver } from "../block/driver.js";
import { Qcow2Driver } from "../block/drivers/qcow2/qcow2.js";

/** Stream and commit copy at most this much per step (and hold a guest range lock at most this long). */
export const CHAIN_COPY_BYTES_MAX = 1024 * 1024;

/**
 * Whether some layer of `layers` (top first) holds [offset, ...), and for how many bytes (up to
 * `length`) the answer holds. A qcow2 layer holds what it has allocated (data or zero clusters); a
 * layer without backing (raw) holds what its block status says is not a hole. Past a layer's end
 * counts as held: the layer above reads zeros there, which dropping the layer must keep.
 */
export async function allocatedInLayers(
  layers: readonly BlockDriver[],
  offset: number,
  length: number,
): Promise<{ allocated: boolean; bytes: number }> {
  let bytes = length;
  for (const layer of layers) {
    if (offset >= layer.size()) return { allocated: true, bytes };
    bytes = Math.min(bytes, layer.size() - offset);
    const here = await allocatedIn(layer, offset, bytes);
    if (here.allocated) return here;
    bytes = here.bytes;
  }
  return { allocated: false, bytes };
}

async function allocatedIn(
  layer: BlockDriver,
  offset: number,
  length: number,
): Promise<{ allocated: boolean; bytes: number }> {
  if (layer instanceof Qcow2Driver) return layer.allocatedHere(offset, length);
  const [first] = await layer.blockStatus(offset, length);
  if (first === undefined) return { allocated: true, bytes: length };
  const bytes = Math.max(Math.min(first.offset + first.length - offset, length), 1);
  return { allocated: !first.hole, bytes };
}

/**
 * The runs of [offset, offset + length) that `layers` hold: what a stream or commit must copy there.
 */
export async function heldRuns(
  layers: readonly BlockDriver[],
  offset: number,
  length: number,
): Promise<Array<{ offset: number; length: number }>> {
  const out: Array<{ offset: number; length: number }> = [];
  for (let pos = offset; pos < offset + length;) {
    const r = await allocatedInLayers(layers, pos, offset + length - pos);
    if (r.allocated) {
      const last = out[out.length - 1];
      if (last && last.offset + last.length === pos) last.length += r.bytes;
      else out.push({ offset: pos, length: r.bytes });
    }
    pos += r.bytes;
  }
  return out;
}
