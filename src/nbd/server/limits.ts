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
/**
 * Connections in transmission at once. When all are taken, a client that finishes its handshake
 * evicts the connection idle longest (idle for IDLE_EVICT_MIN_MS at least), or is refused.
 */
export const CONNECTIONS_MAX = 128;
/** A connection must have been idle this long to be evicted for a new one. */
export const IDLE_EVICT_MIN_MS = 5_000;
/**
 * Handshakes in progress at once, counted apart from CONNECTIONS_MAX. A new connection past it
 * evicts the handshake silent longest (one that has sent nothing first), so clients stuck in (or
 * stalling) the handshake cannot keep out an honest client, which answers within a round trip.
 */
export const HANDSHAKES_MAX = 128;
/** TCP: handshakes in progress from one peer address; past it, that address's own are evicted. */
export const HANDSHAKES_PER_ADDRESS_MAX = 16;
/**
 * Per connection: requests admitted and not yet answered (their final reply not yet taken by the
 * socket). The next request waits unstarted in the decoder, with the socket paused.
 */
export const IN_FLIGHT_REQUESTS_MAX = 256;
/**
 * Per connection: buffer bytes (write payloads, read replies) held at once: two of the largest
 * requests with their reply headers. A request alone may always pass it.
 */
export const CONNECTION_BUFFER_BYTES_MAX = 2 * REQUEST_BYTES_MAX + MiB;
/** The daemon-wide budget for write payloads and read replies (`--max-buffer-memory`), by default... */
export const BUFFER_MEMORY_DEFAULT_BYTES = 192 * MiB;
/** ...and at least (two largest requests and the reserved shares). */
export const BUFFER_MEMORY_MIN_BYTES = 80 * MiB;
/** Per connection, set aside from the budget (at most half of it in all): small requests never wait. */
export const BUFFER_RESERVED_BYTES = 1 * MiB;
/**
 * A client that takes no reply for this long while replies wait, or has not finished a write payload
 * this long after its header, is dropped: it holds budget that other clients wait for. The payload
 * bound runs from the header, not from the last byte, so trickling a byte at a time does not extend
 * it (a 32 MiB payload needs about 1 MB/s).
 */
export const PEER_STALL_TIMEOUT_MS = 30_000;
/** How often the server looks for stalled peers. */
export const STALL_CHECK_INTERVAL_MS = 1_000;
/** Reads at least this big ask the driver for holes and answer them with OFFSET_HOLE chunks. */
export const SPARSE_READ_BYTES_MIN = 64 * KiB;
/** Block status answers carry at most this many descriptors. */
export const BLOCK_STATUS_DESCRIPTORS_MAX = 1024;
/** Replies at least this big are written at once instead of waiting for the end of the loop turn. */
export const REPLY_DIRECT_BYTES_MIN = 128 * KiB;
/** After our side of a connection has ended, the client has this long to close its side. */
export const CLOSE_LINGER_MS = 5_000;
