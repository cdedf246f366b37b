/** Byte units and size parsing for the command line ("1G", "512M", "4096"). */
export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;
export const TiB = 1024 * GiB;

const SUFFIX: Readonly<Record<string, number>> = { "": 1, K: KiB, M: MiB, G: GiB, T: TiB };

/** Parses "1G", "64M", "4k", "4096" into bytes; throws on anything else. */
export function parseSize(text: string): number {
  const m = /^(\d+)(?:([kKmMgGtT])(?:i?B)?|B)?$/.exec(text.trim());
  if (!m) throw new Error(`not a size: "${text}" (use bytes or a K/M/G/T suffix)`);
  const bytes = Number(m[1]) * SUFFIX[(m[2] ?? "").toUpperCase()];
  if (!Number.isSafeInteger(bytes)) throw new Error(`size too large: "${text}"`);
  return bytes;
}

export function formatSize(bytes: number): string {
  for (const [unit, scale] of [
    ["TiB", TiB],
    ["GiB", GiB],
    ["MiB", MiB],
    ["KiB", KiB],
  ] as const) {
    if (bytes >= scale && bytes % scale === 0) return `${bytes / scale} ${unit}`;
  }
  return `${bytes} bytes`;
}
