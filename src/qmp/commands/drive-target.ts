/**
 * What drive-backup and drive-mirror share: the target file named by the command. `absolute-paths`
 * creates (or recreates) a sparse raw image of the source's size, as qemu-img create would;
 * `existing` opens the file as it is. A file any node has open is refused, since writing it would
 * destroy that node's data. "The same file" means the same device and inode, whatever path, symlink
 * or hard link names it. The order keeps a refused target untouched: identity check by stat, open
 * without truncating, image locks (another process serving it refuses here), identity check on the
 * open descriptor, and only then the truncation that recreates it.
 */
import * as fs from "node:fs";
import * as path from "node:path";
import { FileDriver } from "../../block/drivers/file.js";
import type { BlockGraph } from "../../graph/block-graph.js";
import type { BlockNode } from "../../io/block-node.js";
import { QmpError } from "../errors.js";

export interface DriveTarget {
  readonly filename: string;
  readonly driver: FileDriver;
  /** Whether this command created the file (so it may give it the source's allocation). */
  readonly created: boolean;
  /** Removes the file if this command created it and the path still names it (a job that never ran). */
  removeCreated(): void;
}

export async function openDriveTarget(
  graph: BlockGraph,
  source: BlockNode,
  target: string,
  mode: "existing" | "absolute-paths" = "absolute-paths",
): Promise<DriveTarget> {
  const filename = path.resolve(target);
  const size = source.size();
  const existed = fs.existsSync(filename);
  if (mode === "existing" && !existed) {
    throw new QmpError("GenericError", `Could not open '${filename}': No such file or directory`);
  }
  const refuseInUse = (usedBy: string[]): void => {
    if (usedBy.includes(source.name)) {
      throw new QmpError(
        "GenericError",
        `Source and target cannot be the same: '${filename}' is the image of node '${source.name}'`,
      );
    }
    if (usedBy.length > 0) {
      throw new QmpError("GenericError", `'${filename}' is in use by node '${usedBy[0]}'`);
    }
  };
  let driver: FileDriver;
  try {
    // A failed open removes a file it created itself, and nothing else; so does a failed check.
    driver = FileDriver.openChecked(filename, { create: mode === "absolute-paths" }, (id) =>
      refuseInUse(graph.nodesWithFile(id)),
    );
  } catch (err) {
    if (err instanceof QmpError) throw err;
    throw new QmpError("GenericError", `Could not open '${filename}': ${(err as Error).message}`);
  }
  // Only a file this command created is removed, and only while the path still names it: a file
  // that existed, or appeared (another process creating it) between the checks, is never deleted.
  const removeCreated = (): void => driver.removeIfCreated();
  const created = mode === "absolute-paths";
  try {
    if (created) {
      driver.truncate(0);
      driver.truncate(size);
    }
  } catch (err) {
    removeCreated();
    await driver.close();
    if (err instanceof QmpError) throw err;
    throw new QmpError("GenericError", `Could not create '${filename}': ${(err as Error).message}`);
  }
  if (driver.size() !== size) {
    removeCreated();
    await driver.close();
    throw new QmpError(
      "GenericError",
      `Source and target image have different sizes (${size} and ${driver.size()})`,
    );
  }
  return { filename, driver, created, removeCreated };
}
