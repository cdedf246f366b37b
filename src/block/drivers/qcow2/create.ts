/**
 * Creates an empty qcow2 v3 image (16-bit refcounts, deflate) in a child driver whose storage is
 * empty: header, refcount table, refcount blocks and L1 table, in that order from cluster 0, as
 * qemu-img lays them out. The blockdev-create job and `drivetap create` both use it.
 */
import { BlockError } from "../../../core/errors.js";
import type { BlockDriver } from "../../driver.js";
import {
  encodeHeader,
  QCOW2_CLUSTER_BITS_MAX,
  QCOW2_CLUSTER_BITS_MIN,
  QCOW2_DEFAULT_CLUSTER_BYTES,
  QCOW2_L1_BYTES_MAX,
  QCOW2_REFTABLE_BYTES_MAX,
  QCOW2_VIRTUAL_SIZE_MAX,
  writeU64,
} from "./format.js";

export interface CreateQcow2Options {
  readonly clusterSize?: number;
  /** The backing file's name as stored (relative names resolve against the new image's directory). */
  readonly backingFile?: string;
  readonly backingFmt?: string;
}

export async function createQcow2(
  file: BlockDriver,
  size: number,
  o: CreateQcow2Options = {},
): Promise<void> {
  const cb = o.clusterSize ?? QCOW2_DEFAULT_CLUSTER_BYTES;
  const bits = Math.log2(cb);
  if (!Number.isInteger(bits) || bits < QCOW2_CLUSTER_BITS_MIN || bits > QCOW2_CLUSTER_BITS_MAX) {
    throw new BlockError("EINVAL", "Cluster size must be a power of two between 512 and 2048k");
  }
  if (!Number.isSafeInteger(size) || size < 0 || size > QCOW2_VIRTUAL_SIZE_MAX) {
    throw new BlockError("EINVAL", `qcow2: image size ${size} is out of range`);
  }
  if (o.backingFmt !== undefined && o.backingFile === undefined) {
    throw new BlockError("EINVAL", "qcow2: a backing format needs a backing file");
  }
  const l2Entries = cb / 8;
  const l1Entries = Math.ceil(size / (cb * l2Entries));
  if (l1Entries * 8 > QCOW2_L1_BYTES_MAX)
    throw new BlockError("EINVAL", "qcow2: image size too large for this cluster size");
  const l1Clusters = Math.max(1, Math.ceil((l1Entries * 8) / cb));
  const blockEntries = cb / 2;
  // Header + table + blocks + L1 must all be covered by the blocks, which the table must hold.
  let tableClusters = 1;
  let blocks = 1;
  for (;;) {
    const total = 1 + tableClusters + blocks + l1Clusters;
    const needBlocks = Math.ceil(total / blockEntries);
    const needTable = Math.ceil((needBlocks * 8) / cb);
    if (needBlocks === blocks && needTable === tableClusters) break;
    blocks = needBlocks;
    tableClusters = needTable;
  }
  if (tableClusters * cb > QCOW2_REFTABLE_BYTES_MAX)
    throw new BlockError("EINVAL", "qcow2: image size too large");
  const tableOffset = cb;
  const blocksOffset = tableOffset + tableClusters * cb;
  const l1Offset = blocksOffset + blocks * cb;
  const total = 1 + tableClusters + blocks + l1Clusters;

  const header = encodeHeader({
    clusterBits: bits,
    sizeBytes: size,
    l1Entries,
    l1Offset,
    refcountTableOffset: tableOffset,
    refcountTableClusters: tableClusters,
    backingFile: o.backingFile,
    backingFormat: o.backingFmt,
  });
  const table = Buffer.alloc(tableClusters * cb);
  for (let b = 0; b < blocks; b++) writeU64(table, b * 8, blocksOffset + b * cb);
  const refblocks = Buffer.alloc(blocks * cb);
  for (let c = 0; c < total; c++) refblocks.writeUInt16BE(1, c * 2);
  const l1 = Buffer.alloc(l1Clusters * cb);
  // Metadata first, header last: a half-created image has no valid magic.
  await file.pwrite(tableOffset, [table, refblocks, l1], {});
  await file.flush();
  await file.pwrite(0, [header, Buffer.alloc(cb - header.length)], {});
  await file.flush();
}
