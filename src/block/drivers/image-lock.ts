/**
 * Image locking in QEMU's scheme (QEMU 7.2's file-posix driver), so that drivetap, qemu-io, qemu-img,
 * qemu-nbd and QEMU itself see each other's use of an image and refuse to break it.
 *
 * A user of an image holds some permissions (QEMU's BLK_PERM_* bits) and lets others hold some. Both
 * are advertised with shared (read) OFD locks on single bytes of the image file: byte 100 + bit for
 * "I hold this permission", byte 200 + bit for "I do not share this permission". Read locks never
 * conflict with each other, so taking them always succeeds; conflicts are found by probing with a write
 * lock (F_OFD_GETLK), which a read lock held by any *other* open file description blocks:
 * - for each permission I want, probe 200 + bit: someone refuses to share it ("Failed to get "write" lock");
 * - for each permission I do not share, probe 100 + bit: someone holds it ("Failed to get shared "write"
 *   lock").
 * OFD locks belong to the open file description, so a second open of the same image inside this
 * process is checked exactly like another process, and closing the descriptor drops its locks.
 *
 * Without the native addon (or with one built before locking existed) nothing is locked: lockImage
 * returns false and the caller runs unlocked (docs/ARCHITECTURE.md, "Image identity and locking").
 */
import { BlockError, fromLinuxErrno } from "../../core/errors.js";
import { EAGAIN, LOCK_NONE, LOCK_READ, LOCK_WRITE, native } from "./native.js";

/** QEMU's permission bits (include/block/block-common.h), named as QEMU names them. */
export const BLK_PERM_CONSISTENT_READ = 0x01;
export const BLK_PERM_WRITE = 0x02;
export const BLK_PERM_WRITE_UNCHANGED = 0x04;
export const BLK_PERM_RESIZE = 0x08;
export const BLK_PERM_ALL = 0x0f;

/** The byte holding "I have permission bit i" is PERM_BASE + i; "I do not share it" is SHARED_BASE + i. */
export const RAW_LOCK_PERM_BASE = 100;
export const RAW_LOCK_SHARED_BASE = 200;
const PERM_BITS = 4;

type LockCall = (fd: number, start: number, length: number, type: number) => number;

/** QEMU's names for the bits, as its messages spell them. */
const PERM_NAMES = ["consistent read", "write", "write unchanged", "resize"] as const;

export interface ImagePermissions {
  /** BLK_PERM_* bits this user holds. */
  readonly perm: number;
  /** BLK_PERM_* bits this user lets others hold. */
  readonly shared: number;
}

/**
 * The permissions of a drivetap node on its image. A reader holds consistent-read; a writer also holds
 * write (and resize when it creates the image). Either lets others read and do unchanging writes, and
 * nothing more, as a QEMU guest device without share-rw does: nobody else may change what we serve or
 * resize it underneath us. force-share (read-only users only, QEMU's rule) shares everything.
 */
export function imagePermissions(o: {
  readOnly: boolean;
  forceShare?: boolean;
  resize?: boolean;
}): ImagePermissions {
  let perm = BLK_PERM_CONSISTENT_READ;
  if (!o.readOnly) perm |= BLK_PERM_WRITE;
  if (o.resize && !o.readOnly) perm |= BLK_PERM_RESIZE;
  const shared = o.forceShare ? BLK_PERM_ALL : BLK_PERM_CONSISTENT_READ | BLK_PERM_WRITE_UNCHANGED;
  return { perm, shared };
}

/** Another user of the image holds or refuses what this open needs. */
export class ImageLockError extends BlockError {
  readonly path: string;
  /** QEMU's name of the permission in conflict ("write", "consistent read", ...). */
  readonly permission: string;
  /** "held": someone holds what we refuse to share; "unshared": someone refuses what we want. */
  readonly conflict: "held" | "unshared";
  constructor(path: string, permission: string, conflict: "held" | "unshared") {
    const what = conflict === "held" ? `shared "${permission}"` : `"${permission}"`;
    super("EPERM", `Failed to get ${what} lock. Is another process using the image [${path}]?`);
    this.name = "ImageLockError";
    this.path = path;
    this.permission = permission;
    this.conflict = conflict;
  }
}

/**
 * What the lock bytes would say if `want` were opened next to `other` on one file, or null when
 * they coexist: "unshared" when `other` refuses a permission `want` takes, "held" when `other`
 * holds one `want` refuses to share. The graph uses it for opens inside this process, which also
 * works where locks are unavailable and lets its message name the node.
 */
export function permissionConflict(
  want: ImagePermissions,
  other: ImagePermissions,
): { permission: string; conflict: "held" | "unshared" } | null {
  for (let i = 0; i < PERM_BITS; i++) {
    if (want.perm & ~other.shared & (1 << i)) return { permission: PERM_NAMES[i], conflict: "unshared" };
  }
  for (let i = 0; i < PERM_BITS; i++) {
    if (other.perm & ~want.shared & (1 << i)) return { permission: PERM_NAMES[i], conflict: "held" };
  }
  return null;
}

/** Whether this build can lock images (the addon is loaded and has the OFD calls). */
export function imageLockingAvailable(): boolean {
  return typeof native?.ofdSetLock === "function" && typeof native.ofdTestLock === "function";
}

/**
 * Takes the lock bytes for `p` on `fd` and checks for conflicts with every other open of the file.
 * Returns false (and locks nothing) when locking is unavailable. On a conflict or error it drops
 * what it took and throws; the descriptor is the caller's to close.
 */
export function lockImage(fd: number, path: string, p: ImagePermissions): boolean {
  if (!imageLockingAvailable()) return false;
  const set = native!.ofdSetLock!;
  const test = native!.ofdTestLock!;
  try {
    for (let i = 0; i < PERM_BITS; i++) {
      const bit = 1 << i;
      if (p.perm & bit) take(set, fd, RAW_LOCK_PERM_BASE + i);
      if (!(p.shared & bit)) take(set, fd, RAW_LOCK_SHARED_BASE + i);
    }
    for (let i = 0; i < PERM_BITS; i++) {
      const bit = 1 << i;
      if (p.perm & bit && probe(test, fd, RAW_LOCK_SHARED_BASE + i)) {
        throw new ImageLockError(path, PERM_NAMES[i], "unshared");
      }
    }
    for (let i = 0; i < PERM_BITS; i++) {
      const bit = 1 << i;
      if (!(p.shared & bit) && probe(test, fd, RAW_LOCK_PERM_BASE + i)) {
        throw new ImageLockError(path, PERM_NAMES[i], "held");
      }
    }
  } catch (err) {
    unlockImage(fd);
    throw err;
  }
  return true;
}

/** The lock bytes a user with permissions `p` holds. */
function lockBytes(p: ImagePermissions): number[] {
  const bytes: number[] = [];
  for (let i = 0; i < PERM_BITS; i++) {
    const bit = 1 << i;
    if (p.perm & bit) bytes.push(RAW_LOCK_PERM_BASE + i);
    if (!(p.shared & bit)) bytes.push(RAW_LOCK_SHARED_BASE + i);
  }
  return bytes;
}

/**
 * Changes the locks an open holds from `from` to `to` (QEMU's permission update: block_resize takes
 * "resize" for the truncate and gives it back). Bytes `to` needs are taken and checked against every
 * other open first; on a conflict only those are dropped again and `from` stays as it was. Returns
 * false (and changes nothing) when locking is unavailable.
 */
export function updateImageLocks(
  fd: number,
  path: string,
  from: ImagePermissions,
  to: ImagePermissions,
): boolean {
  if (!imageLockingAvailable()) return false;
  const set = native!.ofdSetLock!;
  const test = native!.ofdTestLock!;
  const held = new Set(lockBytes(from));
  const wanted = lockBytes(to);
  const added = wanted.filter((b) => !held.has(b));
  try {
    for (const b of added) take(set, fd, b);
    for (let i = 0; i < PERM_BITS; i++) {
      const bit = 1 << i;
      if (to.perm & bit & ~from.perm && probe(test, fd, RAW_LOCK_SHARED_BASE + i)) {
        throw new ImageLockError(path, PERM_NAMES[i], "unshared");
      }
      if (~to.shared & bit & from.shared && probe(test, fd, RAW_LOCK_PERM_BASE + i)) {
        throw new ImageLockError(path, PERM_NAMES[i], "held");
      }
    }
  } catch (err) {
    for (const b of added) set(fd, b, 1, LOCK_NONE);
    throw err;
  }
  for (const b of held) if (!wanted.includes(b)) set(fd, b, 1, LOCK_NONE);
  return true;
}

/** Drops every lock byte this descriptor holds (closing it does the same). */
export function unlockImage(fd: number): void {
  if (!imageLockingAvailable()) return;
  native!.ofdSetLock!(fd, RAW_LOCK_PERM_BASE, PERM_BITS, LOCK_NONE);
  native!.ofdSetLock!(fd, RAW_LOCK_SHARED_BASE, PERM_BITS, LOCK_NONE);
}

function take(set: LockCall, fd: number, byte: number): void {
  const r = set(fd, byte, 1, LOCK_READ);
  // Only a write lock blocks a read lock, and QEMU's scheme never holds one for long.
  if (r === -EAGAIN) throw new BlockError("EPERM", `Failed to lock byte ${byte}`);
  if (r < 0) throw fromLinuxErrno(-r, `Failed to lock byte ${byte}`);
}

/** True when another open file description holds a lock on `byte`. */
function probe(test: LockCall, fd: number, byte: number): boolean {
  const r = test(fd, byte, 1, LOCK_WRITE);
  if (r < 0) throw fromLinuxErrno(-r, `Failed to test lock byte ${byte}`);
  return r !== LOCK_NONE;
}
