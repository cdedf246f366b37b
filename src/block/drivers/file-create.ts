/**
 * blockdev-create for the file driver (QEMU's BlockdevCreateOptionsFile: filename, size,
 * preallocation, nocow). As QEMU's file driver does, an existing file is reused and truncated to
 * zero before it is sized, so its old contents are gone. Unlike QEMU 7.2, which truncated a file
 * that one of its own nodes had open without a parent, a file any node has open is refused first
 * (the caller's `refuse`, by device and inode): creating must never destroy a disk in use.
 */
import { BlockError, systemErrorText } from "../../core/errors.js";
import { FileDriver, type FileId, type Preallocation } from "./file.js";
import { ImageLockError } from "./image-lock.js";

export interface FileCreateOptions {
  readonly filename: string;
  readonly size: number;
  readonly preallocation?: Preallocation | "metadata";
  /** Btrfs copy-on-write off; accepted and ignored elsewhere, as QEMU ignores a failed ioctl. */
  readonly nocow?: boolean;
}

export async function createFileImage(o: FileCreateOptions, refuse: (id: FileId) => void): Promise<void> {
  const preallocation = o.preallocation ?? "off";
  // QEMU creates the file and then fails; refusing first leaves nothing behind.
  if (preallocation === "metadata") {
    throw new BlockError("EINVAL", "Unsupported preallocation mode: metadata");
  }
  let driver: FileDriver;
  try {
    driver = FileDriver.openChecked(o.filename, { create: true }, refuse);
  } catch (err) {
    // A lock conflict and a refusal have their own words; a failed open gets QEMU's.
    if (err instanceof ImageLockError || !(err instanceof BlockError) || !err.cause) throw err;
    throw new BlockError(err.code, `Could not create '${o.filename}': ${systemErrorText(err.cause)}`);
  }
  try {
    await driver.resize(0);
    await driver.resize(o.size, preallocation);
  } finally {
    await driver.close();
  }
}
