/**
 * CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), the journal's checksum. The native addon
 * computes it with SSE4.2's crc32 instruction (or C tables on CPUs without it); without the addon
 * (DRIVETAP_NO_NATIVE=1, or no build) a slicing-by-8 implementation in TypeScript gives the same
 * values, about ten times slower.
 *
 * `crc32c(pieces, seed)` continues the CRC `seed` (0 to start) over the pieces in order, so
 * `crc32c([a, b]) === crc32c(b, crc32c(a))`: a header and the buffers of a write are checksummed
 * without being copied together.
 */
import { native } from "./drivers/native.js";

const POLY = 0x82f63b78;

/**
 * Slicing-by-8: TABLES[k * 256 + n] is byte n's CRC advanced by k more zero bytes, so eight input
 * bytes take eight independent lookups instead of eight dependent steps.
 */
const TABLES = ((): Int32Array => {
  const t = new Int32Array(8 * 256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? (c >>> 1) ^ POLY : c >>> 1;
    t[n] = c;
  }
  for (let n = 0; n < 256; n++) {
    for (let k = 1; k < 8; k++) {
      const prev = t[(k - 1) * 256 + n];
      t[k * 256 + n] = (prev >>> 8) ^ t[prev & 0xff];
    }
  }
  return t;
})();

/** Feeds `b` into the (inverted) register `crc`. */
function update(crc: number, b: Uint8Array): number {
  const t = TABLES;
  const n = b.length;
  const end8 = n - (n & 7);
  let i = 0;
  for (; i < end8; i += 8) {
    const lo = crc ^ (b[i] | (b[i + 1] << 8) | (b[i + 2] << 16) | (b[i + 3] << 24));
    crc =
      t[1792 + (lo & 0xff)] ^
      t[1536 + ((lo >>> 8) & 0xff)] ^
      t[1280 + ((lo >>> 16) & 0xff)] ^
      t[1024 + (lo >>> 24)] ^
      t[768 + b[i + 4]] ^
      t[512 + b[i + 5]] ^
      t[256 + b[i + 6]] ^
      t[b[i + 7]];
  }
  for (; i < n; i++) crc = (crc >>> 8) ^ t[(crc ^ b[i]) & 0xff];
  return crc;
}

/** CRC-32C in TypeScript (the fallback; exported for tests). */
export function crc32cPortable(pieces: readonly Uint8Array[] | Uint8Array, seed = 0): number {
  let crc = ~seed;
  if (pieces instanceof Uint8Array) crc = update(crc, pieces);
  else for (const p of pieces) crc = update(crc, p);
  return ~crc >>> 0;
}

/** The addon's CRC, if it has one (an addon built before CRC-32C was added lacks it). */
const nativeCrc32c = typeof native?.crc32c === "function" ? native.crc32c : null;

/** Which implementation `crc32c` uses (reported by the benchmark; tests assert the addon's is used). */
export const crc32cImplementation: "sse4.2" | "native-table" | "typescript" = nativeCrc32c
  ? native?.crc32cHardware
    ? "sse4.2"
    : "native-table"
  : "typescript";

/** CRC-32C of the pieces, continuing `seed`; an unsigned 32-bit integer. */
export const crc32c: (pieces: readonly Uint8Array[] | Uint8Array, seed?: number) => number =
  nativeCrc32c ?? crc32cPortable;
