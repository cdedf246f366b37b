/** NBD wire constants, spelled as the NBD specification (doc/proto.md) spells them. */

export const NBD_MAGIC = 0x4e42444d41474943n; // "NBDMAGIC"
export const NBD_IHAVEOPT = 0x49484156454f5054n; // "IHAVEOPT"
export const NBD_REP_MAGIC = 0x3e889045565a9n;
export const NBD_REQUEST_MAGIC = 0x25609513;
export const NBD_SIMPLE_REPLY_MAGIC = 0x67446698;
export const NBD_STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server) and client flags.
export const NBD_FLAG_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_NO_ZEROES = 1 << 1;
export const NBD_FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const NBD_FLAG_C_NO_ZEROES = 1 << 1;

// Options.
export const NBD_OPT_EXPORT_NAME = 1;
export const NBD_OPT_ABORT = 2;
export const NBD_OPT_LIST = 3;
export const NBD_OPT_STARTTLS = 5;
export const NBD_OPT_INFO = 6;
export const NBD_OPT_GO = 7;
export const NBD_OPT_STRUCTURED_REPLY = 8;
export const NBD_OPT_LIST_META_CONTEXT = 9;
export const NBD_OPT_SET_META_CONTEXT = 10;

// Option reply types.
export const NBD_REP_ACK = 1;
export const NBD_REP_SERVER = 2;
export const NBD_REP_INFO = 3;
export const NBD_REP_META_CONTEXT = 4;
export const NBD_REP_FLAG_ERROR = 0x80000000;
// The error replies are written as unsigned numbers, as the decoder reads the field: `FLAG | n`
// in JavaScript would be a negative 32-bit integer that never equals a reply's type.
export const NBD_REP_ERR_UNSUP = 0x80000001;
export const NBD_REP_ERR_POLICY = 0x80000002;
export const NBD_REP_ERR_INVALID = 0x80000003;
export const NBD_REP_ERR_PLATFORM = 0x80000004;
export const NBD_REP_ERR_TLS_REQD = 0x80000005;
export const NBD_REP_ERR_UNKNOWN = 0x80000006;
export const NBD_REP_ERR_SHUTDOWN = 0x80000007;
export const NBD_REP_ERR_TOO_BIG = 0x80000009;

// Info types (NBD_OPT_INFO / NBD_OPT_GO).
export const NBD_INFO_EXPORT = 0;
export const NBD_INFO_NAME = 1;
export const NBD_INFO_DESCRIPTION = 2;
export const NBD_INFO_BLOCK_SIZE = 3;

// Transmission flags.
export const NBD_FLAG_HAS_FLAGS = 1 << 0;
export const NBD_FLAG_READ_ONLY = 1 << 1;
export const NBD_FLAG_SEND_FLUSH = 1 << 2;
export const NBD_FLAG_SEND_FUA = 1 << 3;
export const NBD_FLAG_ROTATIONAL = 1 << 4;
export const NBD_FLAG_SEND_TRIM = 1 << 5;
export const NBD_FLAG_SEND_WRITE_ZEROES = 1 << 6;
export const NBD_FLAG_SEND_DF = 1 << 7;
export const NBD_FLAG_CAN_MULTI_CONN = 1 << 8;
export const NBD_FLAG_SEND_CACHE = 1 << 10;
export const NBD_FLAG_SEND_FAST_ZERO = 1 << 11;

// Commands.
export const NBD_CMD_READ = 0;
export const NBD_CMD_WRITE = 1;
export const NBD_CMD_DISC = 2;
export const NBD_CMD_FLUSH = 3;
export const NBD_CMD_TRIM = 4;
export const NBD_CMD_CACHE = 5;
export const NBD_CMD_WRITE_ZEROES = 6;
export const NBD_CMD_BLOCK_STATUS = 7;

// Command flags.
export const NBD_CMD_FLAG_FUA = 1 << 0;
export const NBD_CMD_FLAG_NO_HOLE = 1 << 1;
export const NBD_CMD_FLAG_DF = 1 << 2;
export const NBD_CMD_FLAG_REQ_ONE = 1 << 3;
export const NBD_CMD_FLAG_FAST_ZERO = 1 << 4;

// Structured reply.
export const NBD_REPLY_FLAG_DONE = 1 << 0;
export const NBD_REPLY_TYPE_NONE = 0;
export const NBD_REPLY_TYPE_OFFSET_DATA = 1;
export const NBD_REPLY_TYPE_OFFSET_HOLE = 2;
export const NBD_REPLY_TYPE_BLOCK_STATUS = 5;
export const NBD_REPLY_TYPE_ERROR = (1 << 15) | 1;
export const NBD_REPLY_TYPE_ERROR_OFFSET = (1 << 15) | 2;

// base:allocation status bits.
export const NBD_STATE_HOLE = 1 << 0;
export const NBD_STATE_ZERO = 1 << 1;

export const BASE_ALLOCATION = "base:allocation";

// Fixed sizes.
export const NBD_HANDSHAKE_BYTES = 18; // magic, IHAVEOPT, handshake flags
export const NBD_OPTION_HEADER_BYTES = 16;
export const NBD_OPTION_REPLY_HEADER_BYTES = 20;
export const NBD_REQUEST_HEADER_BYTES = 28;
export const NBD_SIMPLE_REPLY_BYTES = 16;
export const NBD_STRUCTURED_HEADER_BYTES = 20;
/** Bytes after size and flags in the NBD_OPT_EXPORT_NAME reply, unless NO_ZEROES was agreed. */
export const NBD_EXPORT_NAME_PAD_BYTES = 124;

/** Strings (export names, descriptions, contexts): the spec's hard maximum. */
export const NBD_STRING_BYTES_MAX = 4096;

export const COMMAND_NAMES: Readonly<Record<number, string>> = {
  [NBD_CMD_READ]: "READ",
  [NBD_CMD_WRITE]: "WRITE",
  [NBD_CMD_DISC]: "DISC",
  [NBD_CMD_FLUSH]: "FLUSH",
  [NBD_CMD_TRIM]: "TRIM",
  [NBD_CMD_CACHE]: "CACHE",
  [NBD_CMD_WRITE_ZEROES]: "WRITE_ZEROES",
  [NBD_CMD_BLOCK_STATUS]: "BLOCK_STATUS",
};

/** Whether an option reply type is an error (its top bit set). */
export function isOptionReplyError(type: number): boolean {
  return type >>> 0 >= NBD_REP_FLAG_ERROR;
}
