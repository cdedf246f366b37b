/**
 * Rewriting the backing file name and format in a qcow2 header at runtime (block-stream, block-commit
 * and blockdev-snapshot change an image's backing). Pure: cluster 0 in, cluster 0 out.
 *
 * The header fields stay as they are except the backing name's offset and length. Every header
 * extension is kept in its order (feature table, bitmaps, anything unknown) except the backing
 * format, which is written first when there is a backing, as qemu-img does. The name follows the
 * end-of-extensions marker. All of it must fit in cluster 0: a name that does not is refused here,
 * before anything is written.
 */
import { BlockError } from "../../../core/errors.js";
import {
  encodeExtension,
  headerExtensions,
  QCOW2_BACKING_NAME_BYTES_MAX,
  QCOW2_EXT_BACKING_FORMAT,
  QCOW2_HEADER_V2_BYTES,
} from "./format.js";

/** What a header names as its backing image: a file name and its format ("raw", "qcow2"). */
export interface BackingName {
  readonly file: string;
  readonly format: string;
}

/**
 * Cluster 0 (`first`, as read from the image: `min(clusterBytes, file size)` bytes) with the backing
 * name replaced by `backing` (null: none). The result has the same length, zero-padded, so nothing of
 * the old name or extensions is left behind. `headerBytes` is the parsed header's length (v2: 72).
 */
export function withBackingName(
  first: Buffer,
  headerBytes: number,
  clusterBytes: number,
  backing: BackingName | null,
): Buffer {
  const name = backing === null ? null : Buffer.from(backing.file, "utf8");
  if (name !== null && (name.length === 0 || name.length > QCOW2_BACKING_NAME_BYTES_MAX)) {
    throw new BlockError(
      "EINVAL",
      `qcow2: backing file name of ${name.length} bytes is not allowed (1 to ${QCOW2_BACKING_NAME_BYTES_MAX})`,
    );
  }
  const start = Math.max(headerBytes, QCOW2_HEADER_V2_BYTES);
  const kept = headerExtensions(first, start, clusterBytes).filter(
    (e) => e.type !== QCOW2_EXT_BACKING_FORMAT,
  );
  const parts: Buffer[] = [Buffer.from(first.subarray(0, start))];
  const ext = (type: number, data: Buffer): number => parts.push(encodeExtension(type, data));
  if (backing !== null) ext(QCOW2_EXT_BACKING_FORMAT, Buffer.from(backing.format, "utf8"));
  for (const e of kept) ext(e.type, e.data);
  parts.push(Buffer.alloc(8)); // end of extensions
  const nameOffset = parts.reduce((n, p) => n + p.length, 0);
  const used = nameOffset + (name?.length ?? 0);
  if (used > Math.min(clusterBytes, first.length)) {
    throw new BlockError(
      "EINVAL",
      `qcow2: the backing file name '${backing?.file}' does not fit in the image's first cluster ` +
        `with its header and extensions (${used} of ${Math.min(clusterBytes, first.length)} bytes)`,
    );
  }
  const out = Buffer.alloc(first.length);
  let at = 0;
  for (const p of parts) at += p.copy(out, at);
  if (name !== null) name.copy(out, nameOffset);
  // backing_file_offset (u64) and backing_file_size (u32).
  out.writeUInt32BE(0, 8);
  out.writeUInt32BE(name === null ? 0 : nameOffset, 12);
  out.writeUInt32BE(name?.length ?? 0, 16);
  return out;
}
