/**
 * What drive-backup and drive-mirror share: the target file named by the command, raw or qcow2.
 * `absolute-paths` creates (or recreates) it with the source's size: a sparse raw file, as qemu-img
 * create would, or an empty qcow2 (createQcow2) whose backing file is the one QEMU gives it (the
 * source's backing image for sync=top, the source itself for sync=none, none otherwise). `existing`
 * opens the file as it is: a qcow2 with the backing chain its header names. Without `format`, a new
 * file takes the source's format and an existing one is probed, as QEMU does.
 *
 * A file any node has open is refused, since writing it would destroy that node's data, and so is a
 * file in any node's backing chain (the source's own backing file, above all). "The same file" means
 * the same device and inode, whatever path, symlink or hard link names it. The order keeps a refused
 * target untouched: identity check by stat, open without truncating, image locks (another process
 * serving it refuses here), identity check on the open descriptor, and only then the truncation
 * that recreates it. A qcow2 target's backing files are opened read-only and must not be open for
 * writing by any node.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import type { BlockDriver } from "../../block/driver.js";
import { FileDriver, type FileId } from "../../block/drivers/file.js";
import { imagePermissions } from "../../block/drivers/image-lock.js";
import { createQcow2 } from "../../block/drivers/qcow2/create.js";
import {
  openQcow2Over,
  probeFormat,
  resolveBackingPath,
  type ImageFormat,
} from "../../block/drivers/qcow2/image.js";
import { Qcow2Driver } from "../../block/drivers/qcow2/qcow2.js";
import { FilterDriver } from "../../block/filters/filter.js";
import type { BlockGraph } from "../../graph/block-graph.js";
import { backingChain } from "../../graph/chain.js";
import type { BlockNode } from "../../io/block-node.js";
import { QmpError } from "../errors.js";

export const DRIVE_TARGET_FORMATS = ["raw", "qcow2"] as const;

/**
 * Which backing file a new qcow2 target names, QEMU's choice by sync mode: `source-backing` (sync=top:
 * the target holds the top layer and shares the rest), `source` (sync=none: the target holds old
 * data of overwritten clusters, over the live source), or `none`.
 */
export type TargetBacking = "none" | "source-backing" | "source";

export interface DriveTargetOptions {
  readonly mode?: "existing" | "absolute-paths";
  readonly format?: ImageFormat;
  readonly backing: TargetBacking;
}

export interface DriveTarget {
  readonly filename: string;
  /** What the target node's driver is: the file itself (raw) or a qcow2 driver over it. */
  readonly driver: BlockDriver;
  readonly format: ImageFormat;
  /** The target file (for a raw target that this command created: its allocation). */
  readonly file: FileDriver;
  /** Whether this command created the file (so it may give it the source's allocation). */
  readonly created: boolean;
  /** Removes the file if this command created it and the path still names it (a job that never ran). */
  removeCreated(): void;
}

/** The format a node serves: qcow2 for a qcow2 driver, raw for everything else (QEMU's "file" too). */
function formatOf(driver: BlockDriver): ImageFormat {
  return driver instanceof Qcow2Driver ? "qcow2" : "raw";
}

/** The image files a driver stack reads below its own file: every backing image's file, in order. */
function backingFiles(driver: BlockDriver): FileDriver[] {
  const out: FileDriver[] = [];
  let d: BlockDriver | null = driver;
  for (;;) {
    while (d instanceof FilterDriver) d = d.next;
    if (!(d instanceof Qcow2Driver) || d.backing === null) return out;
    d = d.backing;
    let file: BlockDriver = d instanceof Qcow2Driver ? d.file : d;
    while (file instanceof FilterDriver) file = file.next;
    if (file instanceof FileDriver) out.push(file);
  }
}

/** The outermost node that reads file `id` as a backing image, if any. */
function nodeWithBackingFile(graph: BlockGraph, id: FileId): string | undefined {
  for (const node of graph.nodes()) {
    if (backingFiles(node.driver).some((f) => f.fileId === id)) return graph.outermostParent(node.name);
  }
  return undefined;
}

/**
 * The backing image a new target names: its file name and format (QEMU writes both into the header).
 * The chain's layers (graph/chain.ts) name each layer's own file, never a URI.
 */
function newTargetBacking(
  graph: BlockGraph,
  source: BlockNode,
  backing: TargetBacking,
): { file: string; format: ImageFormat } | null {
  if (backing === "none") return null;
  const chain = backingChain(graph, source.name);
  if (backing === "source") {
    // Without a file of its own (memory, null-co, nbd) nothing can name the source; the target
    // holds only the old data either way.
    const own = chain[0]!;
    return own.filename === undefined ? null : { file: path.resolve(own.filename), format: own.format };
  }
  const below = chain[1];
  if (below === undefined) return null;
  if (below.filename === undefined) {
    throw new QmpError(
      "GenericError",
      below.nodeName !== undefined
        ? `The backing node '${below.nodeName}' of '${source.name}' has no file name`
        : `The backing image of '${source.name}' has no file name`,
    );
  }
  return { file: path.resolve(below.filename), format: below.format };
}

export async function openDriveTarget(
  graph: BlockGraph,
  source: BlockNode,
  target: string,
  o: DriveTargetOptions,
): Promise<DriveTarget> {
  const mode = o.mode ?? "absolute-paths";
  const filename = path.resolve(target);
  const size = source.size();
  const existed = fs.existsSync(filename);
  if (mode === "existing" && !existed) {
    throw new QmpError("GenericError", `Could not open '${filename}': No such file or directory`);
  }
  const created = mode === "absolute-paths";
  // Everything that can be refused is refused before the file is opened, let alone created.
  const newFormat = o.format ?? formatOf(source.driver);
  const backing = created ? newTargetBacking(graph, source, o.backing) : null;
  // QEMU refuses a raw target for sync=none too; drivetap's raw sync=none target (the old data of
  // overwritten clusters, zeros elsewhere) predates qcow2 targets and stays.
  if (created && newFormat === "raw" && backing !== null && o.backing === "source-backing") {
    throw new QmpError("GenericError", "Backing file not supported for file format 'raw'");
  }
  const refuseInUse = (id: FileId): void => {
    const usedBy = graph.nodesWithFile(id);
    if (usedBy.includes(source.name)) {
      throw new QmpError(
        "GenericError",
        `Source and target cannot be the same: '${filename}' is the image of node '${source.name}'`,
      );
    }
    if (usedBy.length > 0) {
      throw new QmpError("GenericError", `'${filename}' is in use by node '${usedBy[0]}'`);
    }
    const reader = nodeWithBackingFile(graph, id);
    if (reader !== undefined) {
      throw new QmpError(
        "GenericError",
        `'${filename}' is a backing file of node '${reader}' and cannot be a backup or mirror target`,
      );
    }
  };
  let file: FileDriver;
  try {
    // A failed open removes a file it created itself, and nothing else; so does a failed check.
    file = FileDriver.openChecked(filename, { create: created }, refuseInUse);
  } catch (err) {
    if (err instanceof QmpError) throw err;
    throw new QmpError("GenericError", `Could not open '${filename}': ${(err as Error).message}`);
  }
  // Only a file this command created is removed, and only while the path still names it: a file
  // that existed, or appeared (another process creating it) between the checks, is never deleted.
  const removeCreated = (): void => file.removeIfCreated();
  let driver: BlockDriver = file;
  let format: ImageFormat = newFormat;
  try {
    if (created) {
      file.truncate(0);
      if (format === "raw") file.truncate(size);
      else {
        await createQcow2(file, size, { backingFile: backing?.file, backingFmt: backing?.format });
        file.refreshSize();
      }
    } else {
      const probed = await probeFormat(file);
      format = o.format ?? probed;
      if (format === "qcow2" && probed !== "qcow2") {
        throw new QmpError("GenericError", "Image is not in qcow2 format");
      }
    }
    if (format === "qcow2") driver = await openQcow2Target(graph, file, filename, o.backing === "source");
  } catch (err) {
    await driver.close();
    if (driver !== file) await file.close();
    removeCreated();
    if (err instanceof QmpError) throw err;
    const what = created ? "create" : "open";
    throw new QmpError("GenericError", `Could not ${what} '${filename}': ${(err as Error).message}`);
  }
  if (driver.size() !== size) {
    await driver.close();
    removeCreated();
    throw new QmpError(
      "GenericError",
      `Source and target image have different sizes (${size} and ${driver.size()})`,
    );
  }
  return { filename, driver, format, file, created, removeCreated };
}

/**
 * The qcow2 driver over the target file, with the backing chain its header names (read-only: a
 * partial-cluster write fills from it) unless `noBacking` (sync=none: the header names the live
 * source, which QEMU does not open either; whole-cluster copies never read below). A missing
 * backing file is reported as QEMU reports it, and a backing file some node writes is refused.
 */
async function openQcow2Target(
  graph: BlockGraph,
  file: FileDriver,
  filename: string,
  noBacking: boolean,
): Promise<Qcow2Driver> {
  if (noBacking) return openQcow2Over(file, filename, { backing: null, ownsFile: true });
  const header = await Qcow2Driver.open(file, { readOnly: true, backing: null, ownsFile: false });
  const named = header.header.backingFile;
  await header.close();
  if (named !== null) {
    const below = resolveBackingPath(filename, named);
    if (!fs.existsSync(below)) {
      throw new QmpError(
        "GenericError",
        `Could not open backing file: Could not open '${below}': No such file or directory`,
      );
    }
  }
  let driver: Qcow2Driver;
  try {
    // The target node owns the file from here on: closing it closes the file and the chain.
    driver = await openQcow2Over(file, filename, { ownsFile: true });
  } catch (err) {
    if (named === null) throw err;
    throw new QmpError("GenericError", `Could not open backing file: ${(err as Error).message}`);
  }
  const readOnly = imagePermissions({ readOnly: true });
  try {
    for (const f of backingFiles(driver)) graph.checkFileOpen(f.fileId, readOnly, f.path);
  } catch (err) {
    await driver.close();
    throw new QmpError("GenericError", (err as Error).message);
  }
  return driver;
}
