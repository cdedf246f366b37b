/** Every bound the NBD server puts on a peer, named in one place. */
import { KiB, MiB } from "../../core/units.js";

/** Largest READ/WRITE payload, advertised as the maximum block size. */
export const REQUEST_BYTES_MAX = 32 * MiB;
/** Oversize write payloads up to this are read and dropped, so the connection survives the error. */
export const REQUEST_SKIP_BYTES_MAX = 256 * MiB;
/** Advertised preferred block size. */
export const BLOCK_SIZE_PREFERRED = 4 * KiB;
/** Option data length accepted during the handshake. */
export const OPTION_BYTES_MAX = 64 * KiB;
/** Options one connection may send before it must choose an export. */
export const OPTIONS_PER_CONNECTION_MAX = 256;
/** A client silent in the handshake for this long is dropped (qemu-nbd uses 10 s too). */
export const HANDSHAKE_TIMEOUT_MS = 10_000;
/** Connections served at once; more are refused at accept. */
export const CONNECTIONS_MAX = 128;
/** Per connection: stop reading from the socket while this many requests are in flight... */
export const IN_FLIGHT_REQUESTS_MAX = 256;
/** ...or this many payload and reply bytes are held in memory. */
export const IN_FLIGHT_BYTES_MAX = 128 * MiB;
/** Reads at least this big ask the driver for holes and answer them with OFFSET_HOLE chunks. */
export const SPARSE_READ_BYTES_MIN = 64 * KiB;
/** Block status answers carry at most this many descriptors. */
export const BLOCK_STATUS_DESCRIPTORS_MAX = 1024;
/** Replies at least this big are written at once instead of waiting for the end of the loop turn. */
export const REPLY_DIRECT_BYTES_MIN = 128 * KiB;
/** Unsent reply bytes past which the connection stops reading requests (a client not reading). */
export const REPLY_BACKLOG_BYTES_MAX = 64 * MiB;
/** After our side of a connection has ended, the client has this long to close its side. */
export const CLOSE_LINGER_MS = 5_000;
