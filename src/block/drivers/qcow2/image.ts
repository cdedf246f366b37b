/**
 * Opening image files by format: probing raw or qcow2 by the magic, and qcow2 backing chains. A
 * backing file is opened read-only (with its image locks, through FileDriver.open), in the format
 * the header's backing_fmt names or else probed, with relative names resolved against the directory
 * of the image that names them, as QEMU does. Chains are bounded by BACKING_CHAIN_DEPTH_MAX, which
 * also ends a chain that loops.
 */
import { dirname } from "node:path";
import { BlockError } from "../../../core/errors.js";
import type { BlockDriver } from "../../driver.js";
import { FileDriver, type FileDriverOptions } from "../file.js";
import { QCOW_MAGIC } from "./format.js";
import type { RepairSummary } from "./check.js";
import { Qcow2Driver } from "./qcow2.js";

export const BACKING_CHAIN_DEPTH_MAX = 16;

export type ImageFormat = "raw" | "qcow2";

export const IMAGE_FORMATS: readonly ImageFormat[] = ["raw", "qcow2"];

/** The warning for a backing file whose format the header did not name (QEMU probes it too). */
export function probedBackingMessage(path: string, format: ImageFormat): string {
  return `backing format of '${path}' not given, probed as ${format}`;
}

/** "qcow2" when the first bytes are qcow2's magic, else "raw". */
export async function probeFormat(file: BlockDriver): Promise<ImageFormat> {
  if (file.size() < 4) return "raw";
  const magic = Buffer.alloc(4);
  await file.pread(0, magic);
  return magic.readUInt32BE(0) === QCOW_MAGIC ? "qcow2" : "raw";
}

/** The backing file's path: as stored if absolute, else next to the image that names it. */
export function resolveBackingPath(imagePath: string, backingFile: string): string {
  if (/^[a-z][a-z0-9+.-]*:/i.test(backingFile) && !backingFile.startsWith("file:")) {
    throw new BlockError(
      "ENOTSUP",
      `qcow2: backing file '${backingFile}' names a protocol; only plain file names are supported`,
    );
  }
  const name = backingFile.startsWith("file:") ? backingFile.slice(5) : backingFile;
  if (name.startsWith("/")) return name;
  // QEMU joins the strings without normalising: "dir/link/../x" means what the kernel makes of it.
  return `${dirname(imagePath)}/${name}`;
}

export interface OpenImageOptions extends FileDriverOptions {
  /** Forced format; omitted: probed (and `onProbe` is told what was guessed). */
  readonly format?: ImageFormat;
  readonly onProbe?: (path: string, format: ImageFormat) => void;
  /** How deep in a backing chain this image is (0: the top). */
  readonly depth?: number;
  /** qcow2: the backing driver to use instead of the one the header names (null: none). */
  readonly backing?: BlockDriver | null;
}

/**
 * Opens `path` as raw (the FileDriver itself) or qcow2 (a Qcow2Driver over it, with its backing
 * chain unless `backing` is given). On failure everything opened so far is closed again.
 */
export async function openImage(path: string, o: OpenImageOptions = {}): Promise<BlockDriver> {
  const depth = o.depth ?? 0;
  if (depth > BACKING_CHAIN_DEPTH_MAX) {
    throw new BlockError(
      "EINVAL",
      `qcow2: backing chain deeper than ${BACKING_CHAIN_DEPTH_MAX} images (a loop?) at '${path}'`,
    );
  }
  const file = FileDriver.open(path, o);
  try {
    let format = o.format;
    if (format === undefined) {
      format = await probeFormat(file);
      o.onProbe?.(path, format);
    }
    if (format === "raw") return file;
    return await openQcow2Over(file, path, {
      readOnly: o.readOnly,
      backing: o.backing,
      depth,
      onProbe: o.onProbe,
    });
  } catch (err) {
    await file.close();
    throw err;
  }
}

/**
 * A qcow2 driver over an open file (`path` is its name, for resolving the backing file). `backing`
 * undefined opens what the header names; null or a driver overrides it.
 */
export async function openQcow2Over(
  file: BlockDriver,
  path: string | undefined,
  o: {
    readOnly?: boolean;
    backing?: BlockDriver | null;
    depth?: number;
    ownsFile?: boolean;
    onProbe?: (path: string, format: ImageFormat) => void;
    /** A crash-dirty image with lazy refcounts was repaired (writable opens only). */
    onRepair?: (summary: RepairSummary) => void;
  },
): Promise<Qcow2Driver> {
  // A file node a removed qcow2 node wrote through has grown with that node's allocations, and its
  // size is the one it had at open: the new driver must see the whole image.
  if (file instanceof FileDriver) file.refreshSize();
  const plain = await Qcow2Driver.open(file, { readOnly: true, backing: null, ownsFile: false });
  const { backingFile, backingFormat } = plain.header;
  await plain.close();
  let backing: BlockDriver | null = null;
  let ownsBacking = false;
  if (o.backing !== undefined) backing = o.backing;
  else if (backingFile !== null) {
    if (path === undefined) {
      throw new BlockError(
        "EINVAL",
        `qcow2: backing file '${backingFile}' cannot be resolved: the image has no file name`,
      );
    }
    let format: ImageFormat | undefined;
    if (backingFormat !== null) {
      if (backingFormat !== "raw" && backingFormat !== "qcow2" && backingFormat !== "file") {
        throw new BlockError(
          "ENOTSUP",
          `qcow2: backing format '${backingFormat}' is not supported (raw or qcow2)`,
        );
      }
      format = backingFormat === "qcow2" ? "qcow2" : "raw";
    }
    backing = await openImage(resolveBackingPath(path, backingFile), {
      readOnly: true,
      format,
      depth: (o.depth ?? 0) + 1,
      onProbe: o.onProbe,
    });
    ownsBacking = true;
  }
  try {
    return await Qcow2Driver.open(file, {
      readOnly: o.readOnly,
      backing,
      ownsBacking,
      ownsFile: o.ownsFile ?? true,
      onRepair: o.onRepair,
    });
  } catch (err) {
    if (ownsBacking) await backing?.close();
    throw err;
  }
}
