/**
 * The repair a writable open does on an image that a crash left dirty with lazy refcounts, as QEMU
 * does at open (`qemu-img check -r all`): with lazy refcounts the refcount blocks may lag behind the
 * L2 tables, so they cannot be trusted, and allocating from them could hand out a cluster in use.
 *
 * The refcounts are counted again from the metadata that references clusters: the header cluster,
 * the active L1 table and its L2 tables and data clusters, every internal snapshot's table and L1
 * (walked like the active one: a shared L2 table counts once per L1 that points at it, and so do
 * its data clusters), and the bitmaps extension's directory, tables and bitmap clusters when the
 * autoclear bit says they are valid. The walk streams: one L2 table or table chunk at a time, and
 * the counts are one 16-bit entry per cluster of the file as it is (never per guest cluster, so a
 * hostile virtual size costs nothing), at most QCOW2_REPAIR_CLUSTERS_MAX.
 *
 * Then, as QEMU does for the lazy case, the refcount structure is rebuilt: a new refcount table and
 * blocks are written after the end of the file, the header is pointed at them, and the old ones,
 * referenced by nothing, read as free. Nothing the old header points at is overwritten, and the
 * dirty bit stays set until the end, so a crash during the repair leaves an image the next open
 * repairs again. COPIED flags in the active tables that disagree with the counted refcounts are
 * corrected first (QEMU's check does that too). Last, the dirty bit is cleared.
 *
 * Metadata that cannot be counted (an entry beyond the end of the file, unaligned, or a refcount
 * past 16 bits) is not guessed at: the open fails and names `qemu-img check -r all`.
 */
import { BlockError } from "../../../core/errors.js";
import { MiB } from "../../../core/units.js";
import type { BlockDriver } from "../../driver.js";
import {
  compressedExtent,
  entryOffset,
  extensionsOf,
  QCOW2_AUTOCLEAR_BITMAPS,
  QCOW2_EXT_BITMAPS,
  QCOW2_INCOMPAT_DIRTY,
  QCOW2_L1_BYTES_MAX,
  QCOW2_REFTABLE_BYTES_MAX,
  QCOW_OFLAG_COMPRESSED_HI,
  QCOW_OFLAG_COPIED_HI,
  type Qcow2Header,
  readU64,
  writeU64,
} from "./format.js";
import { parseBitmapsExtension, parseDirectory, type BitmapDirEntry } from "./bitmaps.js";
import { REFCOUNT_MAX } from "./refcounts.js";

/** Clusters the repair counts at most: 64 MiB of 16-bit counts (2 TiB files of 64 KiB clusters). */
export const QCOW2_REPAIR_CLUSTERS_MAX = 2 ** 25;
/** QEMU's bound on a snapshot's extra data. */
export const QCOW2_SNAPSHOT_EXTRA_BYTES_MAX = 1024;
/** Bytes of a table (snapshot L1, bitmap table) read at once while streaming through it. */
const TABLE_CHUNK_BYTES = 1 * MiB;

const SNAPSHOT_HEADER_BYTES = 40;

/** What the repair found and changed, for the log. */
export interface RepairSummary {
  /** Clusters whose stored refcount was below the references counted (the dangerous kind). */
  readonly refcountErrors: number;
  /** Clusters whose stored refcount was above the references counted (leaks, now free). */
  readonly leaks: number;
  /** COPIED flags corrected in the active L1 and L2 tables. */
  readonly copiedFixed: number;
  /** The file's size after the repair (the new refcount structure lies at its end). */
  readonly fileBytes: number;
}

function unrepairable(reason: string): BlockError {
  return new BlockError(
    "EPERM",
    `qcow2: the image was not closed cleanly and uses lazy refcounts, and cannot be repaired here: ${reason}; ` +
      "repair it with 'qemu-img check -r all'",
  );
}

/**
 * Rebuilds the refcounts of the dirty lazy-refcount image in `file` (header parsed, `first` its
 * first cluster) and clears its dirty bit. The caller then opens the image again.
 */
export async function repairLazyRefcounts(
  file: BlockDriver,
  header: Qcow2Header,
  first: Buffer,
): Promise<RepairSummary> {
  const cb = header.clusterBytes;
  const fileBytes = file.size();
  const fileClusters = Math.ceil(fileBytes / cb);
  if (fileClusters > QCOW2_REPAIR_CLUSTERS_MAX) {
    throw unrepairable(`the file has ${fileClusters} clusters, more than ${QCOW2_REPAIR_CLUSTERS_MAX}`);
  }
  const counts = new Uint16Array(fileClusters);
  const ref = (offset: number, bytes: number, what: string): void => {
    if (bytes <= 0) return;
    if (offset + bytes > fileClusters * cb) {
      throw unrepairable(`${what} at ${offset} lies beyond the end of the file`);
    }
    const last = Math.floor((offset + bytes - 1) / cb);
    for (let c = Math.floor(offset / cb); c <= last; c++) {
      if (counts[c] === REFCOUNT_MAX) throw unrepairable(`the cluster at ${c * cb} has too many references`);
      counts[c]++;
    }
  };
  const aligned = (offset: number, what: string): void => {
    if (offset % cb !== 0 || offset === Infinity)
      throw unrepairable(`${what} offset ${offset} is not aligned`);
  };
  const l2 = Buffer.alloc(cb);

  /** Counts an L1 table's L2 tables and their clusters. */
  const countL1 = async (l1: Buffer, what: string): Promise<void> => {
    for (let i = 0; i < l1.length; i += 8) {
      const l2Offset = entryOffset(l1.readUInt32BE(i), l1.readUInt32BE(i + 4));
      if (l2Offset === 0) continue;
      aligned(l2Offset, `${what} L2 table`);
      ref(l2Offset, cb, `${what} L2 table`);
      await file.pread(l2Offset, l2);
      for (let j = 0; j < cb; j += 8) {
        const hi = l2.readUInt32BE(j);
        const lo = l2.readUInt32BE(j + 4);
        if (hi & QCOW_OFLAG_COMPRESSED_HI) {
          const c = compressedExtent(hi, lo, header.clusterBits);
          ref(c.offset, c.bytes, `${what} compressed cluster`);
          continue;
        }
        const host = entryOffset(hi, lo);
        if (host === 0) continue;
        aligned(host, `${what} data cluster`);
        ref(host, cb, `${what} data cluster`);
      }
    }
  };

  ref(0, cb, "the header");
  const l1 = Buffer.alloc(header.l1Entries * 8);
  if (l1.length > 0) {
    await file.pread(header.l1Offset, l1);
    ref(header.l1Offset, l1.length, "the L1 table");
    await countL1(l1, "an active");
  }
  await countSnapshots(file, header, ref, aligned, countL1);
  await countBitmaps(file, header, first, ref, aligned);

  const copiedFixed = await fixCopied(file, header, l1, counts);
  const { refcountErrors, leaks } = await compareOld(file, header, counts);
  const newEnd = await writeRefcounts(file, header, counts);

  // The image is consistent again: clear the dirty bit.
  const b = Buffer.alloc(8);
  writeU64(b, 0, header.incompatible & ~QCOW2_INCOMPAT_DIRTY);
  await file.pwrite(72, [b], {});
  await file.flush();
  return { refcountErrors, leaks, copiedFixed, fileBytes: Math.max(fileBytes, newEnd) };
}

type Ref = (offset: number, bytes: number, what: string) => void;
type Aligned = (offset: number, what: string) => void;

/** Each snapshot's L1 table (walked like the active one) and the snapshot table itself. */
async function countSnapshots(
  file: BlockDriver,
  header: Qcow2Header,
  ref: Ref,
  aligned: Aligned,
  countL1: (l1: Buffer, what: string) => Promise<void>,
): Promise<void> {
  let at = header.snapshotsOffset;
  const head = Buffer.alloc(SNAPSHOT_HEADER_BYTES);
  for (let s = 0; s < header.snapshots; s++) {
    await file.pread(at, head);
    const l1Offset = readU64(head, 0);
    const l1Entries = head.readUInt32BE(8);
    const idBytes = head.readUInt16BE(12);
    const nameBytes = head.readUInt16BE(14);
    const extraBytes = head.readUInt32BE(36);
    if (extraBytes > QCOW2_SNAPSHOT_EXTRA_BYTES_MAX) {
      throw unrepairable(`snapshot ${s} has ${extraBytes} bytes of extra data`);
    }
    at += Math.ceil((SNAPSHOT_HEADER_BYTES + extraBytes + idBytes + nameBytes) / 8) * 8;
    if (l1Entries * 8 > QCOW2_L1_BYTES_MAX) throw unrepairable(`snapshot ${s}'s L1 table is too large`);
    if (l1Entries === 0) continue;
    aligned(l1Offset, `snapshot ${s}'s L1 table`);
    ref(l1Offset, l1Entries * 8, `snapshot ${s}'s L1 table`);
    // One chunk of the L1 at a time: its L2 tables are read one by one anyway.
    const chunkEntries = TABLE_CHUNK_BYTES / 8;
    for (let i = 0; i < l1Entries; i += chunkEntries) {
      const chunk = Buffer.alloc(Math.min(chunkEntries, l1Entries - i) * 8);
      await file.pread(l1Offset + i * 8, chunk);
      await countL1(chunk, `snapshot ${s}'s`);
    }
  }
  if (header.snapshots > 0) ref(header.snapshotsOffset, at - header.snapshotsOffset, "the snapshot table");
}

/** The bitmap directory, each bitmap's table and its clusters, when the extension is valid. */
async function countBitmaps(
  file: BlockDriver,
  header: Qcow2Header,
  first: Buffer,
  ref: Ref,
  aligned: Aligned,
): Promise<void> {
  if (header.version !== 3 || !(header.autoclear & QCOW2_AUTOCLEAR_BITMAPS)) return;
  const data = extensionsOf(first, header).find((e) => e.type === QCOW2_EXT_BITMAPS)?.data;
  if (data === undefined) return;
  // The same checked parsers (and bounds) as the driver's open (bitmaps.ts).
  const g = { clusterBytes: header.clusterBytes, sizeBytes: header.sizeBytes, fileBytes: file.size() };
  let entries: BitmapDirEntry[];
  try {
    const ext = parseBitmapsExtension(data, g.clusterBytes, g.fileBytes);
    ref(ext.directoryOffset, ext.directoryBytes, "the bitmap directory");
    const dir = Buffer.alloc(ext.directoryBytes);
    await file.pread(ext.directoryOffset, dir);
    entries = parseDirectory(dir, ext.count, g);
  } catch (err) {
    if (err instanceof BlockError && err.message.startsWith("qcow2:")) throw unrepairable(err.message);
    throw err;
  }
  for (const e of entries) {
    const what = `bitmap '${e.name}'`;
    ref(e.tableOffset, e.tableEntries * 8, `${what}'s table`);
    const chunkEntries = TABLE_CHUNK_BYTES / 8;
    for (let i = 0; i < e.tableEntries; i += chunkEntries) {
      const chunk = Buffer.alloc(Math.min(chunkEntries, e.tableEntries - i) * 8);
      await file.pread(e.tableOffset + i * 8, chunk);
      for (let j = 0; j < chunk.length; j += 8) {
        const off = entryOffset(chunk.readUInt32BE(j), chunk.readUInt32BE(j + 4));
        if (off === 0) continue;
        aligned(off, `${what}'s data cluster`);
        ref(off, header.clusterBytes, `${what}'s data cluster`);
      }
    }
  }
}

/**
 * Sets COPIED in the active L1 and L2 entries exactly where the counted refcount is 1: the driver
 * writes in place only where COPIED is set, so a wrong flag would overwrite a snapshot's data.
 */
async function fixCopied(
  file: BlockDriver,
  header: Qcow2Header,
  l1: Buffer,
  counts: Uint16Array,
): Promise<number> {
  const cb = header.clusterBytes;
  const l2 = Buffer.alloc(cb);
  let fixed = 0;
  const flip = (t: Buffer, at: number, want: boolean): boolean => {
    const hi = t.readUInt32BE(at);
    if (((hi & QCOW_OFLAG_COPIED_HI) !== 0) === want) return false;
    t.writeUInt32BE((want ? hi | QCOW_OFLAG_COPIED_HI : hi & ~QCOW_OFLAG_COPIED_HI) >>> 0, at);
    fixed++;
    return true;
  };
  for (let i = 0; i < l1.length; i += 8) {
    const l2Offset = entryOffset(l1.readUInt32BE(i), l1.readUInt32BE(i + 4));
    if (l2Offset === 0) continue;
    if (flip(l1, i, counts[l2Offset / cb] === 1))
      await file.pwrite(header.l1Offset + i, [l1.subarray(i, i + 8)], {});
    await file.pread(l2Offset, l2);
    let changed = false;
    for (let j = 0; j < cb; j += 8) {
      const hi = l2.readUInt32BE(j);
      if (hi & QCOW_OFLAG_COMPRESSED_HI) continue;
      const host = entryOffset(hi, l2.readUInt32BE(j + 4));
      if (host !== 0 && flip(l2, j, counts[host / cb] === 1)) changed = true;
    }
    if (changed) await file.pwrite(l2Offset, [l2], {});
  }
  return fixed;
}

/**
 * Compares the stored refcounts (where the old table and blocks can be read) with the counted ones.
 * The old table and blocks themselves are not leaks: the rebuild replaces them.
 */
async function compareOld(
  file: BlockDriver,
  header: Qcow2Header,
  counts: Uint16Array,
): Promise<{ refcountErrors: number; leaks: number }> {
  const cb = header.clusterBytes;
  const blockEntries = cb / 2;
  const table = Buffer.alloc(header.refcountTableClusters * cb);
  await file.pread(header.refcountTableOffset, table);
  const blockAt = (ti: number): number => {
    const off = ti * 8 < table.length ? readU64(table, ti * 8) : 0;
    return off !== 0 && off % cb === 0 && off + cb <= counts.length * cb ? off : 0;
  };
  const replaced = new Set<number>();
  for (let c = 0; c < header.refcountTableClusters; c++) replaced.add(header.refcountTableOffset / cb + c);
  for (let ti = 0; ti < table.length / 8; ti++) if (blockAt(ti) !== 0) replaced.add(blockAt(ti) / cb);
  const block = Buffer.alloc(cb);
  let refcountErrors = 0;
  let leaks = 0;
  for (let start = 0; start < counts.length; start += blockEntries) {
    const off = blockAt(start / blockEntries);
    if (off !== 0) await file.pread(off, block);
    else block.fill(0);
    for (let k = 0; k < blockEntries && start + k < counts.length; k++) {
      const stored = block.readUInt16BE(k * 2);
      const want = counts[start + k];
      if (stored < want) refcountErrors++;
      else if (stored > want && !replaced.has(start + k)) leaks++;
    }
  }
  return { refcountErrors, leaks };
}

/**
 * Writes a new refcount table and blocks after the end of the file (counts for the file's clusters,
 * 1 for the new structure's own) and points the header at them. Returns the new end of the image.
 */
async function writeRefcounts(file: BlockDriver, header: Qcow2Header, counts: Uint16Array): Promise<number> {
  const cb = header.clusterBytes;
  const be = cb / 2;
  const start = counts.length;
  // A block for every range that holds a counted cluster, and for the ranges the new structure
  // covers; the table covers them all. Both sizes depend on each other: iterate to the fixed point.
  const used = new Set<number>();
  for (let c = 0; c < counts.length; c++) if (counts[c] !== 0) used.add(Math.floor(c / be));
  let tableClusters = 1;
  let blocks: number[] = [];
  for (;;) {
    const end = start + tableClusters + blocks.length;
    const ranges = new Set(used);
    for (let r = Math.floor(start / be); r <= Math.floor((end - 1) / be); r++) ranges.add(r);
    const want = [...ranges].sort((a, b) => a - b);
    const needTable = Math.max(1, Math.ceil(((want[want.length - 1] + 1) * 8) / cb));
    if (needTable === tableClusters && want.length === blocks.length) break;
    tableClusters = needTable;
    blocks = want;
  }
  if (tableClusters * cb > QCOW2_REFTABLE_BYTES_MAX)
    throw unrepairable("the refcount table would be too large");
  const end = start + tableClusters + blocks.length;
  const table = Buffer.alloc(tableClusters * cb);
  const block = Buffer.alloc(cb);
  for (let k = 0; k < blocks.length; k++) {
    const r = blocks[k];
    const at = (start + tableClusters + k) * cb;
    writeU64(table, r * 8, at);
    block.fill(0);
    for (let i = 0; i < be; i++) {
      const c = r * be + i;
      const v = c < counts.length ? counts[c] : c < end ? 1 : 0;
      if (v !== 0) block.writeUInt16BE(v, i * 2);
    }
    await file.pwrite(at, [block], {});
  }
  await file.pwrite(start * cb, [table], {});
  await file.flush();
  const h = Buffer.alloc(12);
  writeU64(h, 0, start * cb);
  h.writeUInt32BE(tableClusters, 8);
  await file.pwrite(48, [h], {});
  await file.flush();
  return end * cb;
}
