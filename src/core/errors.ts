/**
 * Operating errors and protocol errors, and the one table that maps an errno-like code to the NBD
 * error number on the wire (and, later, to QMP error classes). Assertions (bugs) live in assert.ts.
 */

export type BlockErrorCode =
  | "EPERM"
  | "EIO"
  | "ENOMEM"
  | "EINVAL"
  | "ENOSPC"
  | "EOVERFLOW"
  | "ENOTSUP"
  | "ESHUTDOWN"
  /** A remote device (an NBD target) is unreachable now; jobs treat it as an outage, not a failure. */
  | "ENOTCONN";

/** An error the block layer reports to its caller: bad request, failing disk, shutdown. */
export class BlockError extends Error {
  readonly code: BlockErrorCode;
  constructor(code: BlockErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "BlockError";
    this.code = code;
  }
}

/** The peer sent bytes we cannot accept; the connection answers per spec or closes. */
export class ProtocolError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "ProtocolError";
  }
}

/** NBD error numbers, as the spec lists them. */
export const NBD_ERRNO: Readonly<Record<BlockErrorCode, number>> = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
  // Not in the NBD list: a client of ours only sees it as EIO.
  ENOTCONN: 5,
};

/** NBD error numbers on the wire back to codes (what our NBD client receives). */
export function fromNbdErrno(errno: number): BlockErrorCode {
  for (const [code, n] of Object.entries(NBD_ERRNO)) if (n === errno) return code as BlockErrorCode;
  return "EIO";
}

const SYSTEM_CODES: Readonly<Record<string, BlockErrorCode>> = {
  EPERM: "EPERM",
  EACCES: "EPERM",
  EROFS: "EPERM",
  EIO: "EIO",
  ENOMEM: "ENOMEM",
  EINVAL: "EINVAL",
  ENOSPC: "ENOSPC",
  EDQUOT: "ENOSPC",
  EFBIG: "ENOSPC",
  EOVERFLOW: "EOVERFLOW",
  ENOTSUP: "ENOTSUP",
  EOPNOTSUPP: "ENOTSUP",
  ESHUTDOWN: "ESHUTDOWN",
  ENOTCONN: "ENOTCONN",
};

/** Turns anything thrown below the block layer into a BlockError (unknown system errors become EIO). */
export function toBlockError(err: unknown): BlockError {
  if (err instanceof BlockError) return err;
  const sysCode = (err as { code?: unknown } | null)?.code;
  const code = typeof sysCode === "string" ? (SYSTEM_CODES[sysCode] ?? "EIO") : "EIO";
  const message = err instanceof Error ? err.message : String(err);
  return new BlockError(code, message, { cause: err });
}

/** Linux errno numbers returned (negated) by the native addon. */
const LINUX_ERRNO: Readonly<Record<number, BlockErrorCode>> = {
  1: "EPERM",
  5: "EIO",
  12: "ENOMEM",
  22: "EINVAL",
  28: "ENOSPC",
  75: "EOVERFLOW",
  95: "ENOTSUP",
  108: "ESHUTDOWN",
};

/**
 * The C library's text for a system error (what QEMU prints after its own words, "Could not resize
 * file: File too large"), from a Node system error's code or a BlockError's. Unknown codes fall back
 * to the error's message.
 */
const STRERROR: Readonly<Record<string, string>> = {
  EPERM: "Operation not permitted",
  ENOENT: "No such file or directory",
  EIO: "Input/output error",
  ENOMEM: "Cannot allocate memory",
  EACCES: "Permission denied",
  EEXIST: "File exists",
  ENOTDIR: "Not a directory",
  EISDIR: "Is a directory",
  EINVAL: "Invalid argument",
  EFBIG: "File too large",
  ENOSPC: "No space left on device",
  EROFS: "Read-only file system",
  ELOOP: "Too many levels of symbolic links",
  ENAMETOOLONG: "File name too long",
  EOVERFLOW: "Value too large for defined data type",
  ENOTSUP: "Operation not supported",
  EOPNOTSUPP: "Operation not supported",
  EDQUOT: "Disk quota exceeded",
};

/** Linux errno numbers by name, for the addon's -errno results. */
const ERRNO_NAMES: Readonly<Record<number, string>> = {
  1: "EPERM",
  5: "EIO",
  12: "ENOMEM",
  13: "EACCES",
  22: "EINVAL",
  27: "EFBIG",
  28: "ENOSPC",
  30: "EROFS",
  75: "EOVERFLOW",
  95: "EOPNOTSUPP",
  122: "EDQUOT",
};

export function systemErrorText(err: unknown): string {
  if (typeof err === "number") return STRERROR[ERRNO_NAMES[err] ?? ""] ?? `errno ${err}`;
  const code = (err as { code?: unknown } | null)?.code;
  if (typeof code === "string" && STRERROR[code]) return STRERROR[code];
  return err instanceof Error ? err.message : String(err);
}

export function fromLinuxErrno(errno: number, what: string): BlockError {
  return new BlockError(LINUX_ERRNO[errno] ?? "EIO", `${what}: errno ${errno}`);
}
