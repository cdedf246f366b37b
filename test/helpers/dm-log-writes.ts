/**
 * A reader of dm-log-writes logs written independently of the exporter (from the layout as the Linux
 * target and xfstests' replay-log read it), for tests: it parses the super block and every entry,
 * checks the padding replay-log checks, and can apply the log to an image as replay-log does
 * (writes their data, discards as zeros). replay-log itself is not packaged in Debian (it is built
 * from the xfstests source tree), so the tests cannot run it; this reader stands in for it.
 */
import assert from "node:assert/strict";

export interface DmLogEntry {
  readonly sector: number;
  readonly sectors: number;
  readonly flags: number;
  readonly dataLen: number;
  /** The data sectors (writes), or for a mark its name. */
  readonly data: Buffer;
  readonly markName?: string;
}

export interface DmLog {
  readonly sectorBytes: number;
  readonly entries: DmLogEntry[];
}

const MAGIC = 0x6a736677736872n;
const FLAG_DISCARD = 4;
const FLAG_MARK = 8;

export function decodeDmLog(log: Buffer): DmLog {
  assert.ok(log.length >= 512, "log holds a super block");
  assert.equal(log.readBigUInt64LE(0), MAGIC, "super magic");
  assert.equal(log.readBigUInt64LE(8), 1n, "super version");
  const count = Number(log.readBigUInt64LE(16));
  const sectorBytes = log.readUInt32LE(24);
  assert.ok([512, 1024, 2048, 4096].includes(sectorBytes), `sector size ${sectorBytes}`);
  assert.ok(
    log.subarray(28, sectorBytes).every((b) => b === 0),
    "super block padding is zero",
  );
  const entries: DmLogEntry[] = [];
  let pos = sectorBytes;
  for (let i = 0; i < count; i++) {
    assert.ok(pos + sectorBytes <= log.length, `entry ${i} is inside the log`);
    const sector = Number(log.readBigUInt64LE(pos));
    const sectors = Number(log.readBigUInt64LE(pos + 8));
    const flags = Number(log.readBigUInt64LE(pos + 16));
    const dataLen = Number(log.readBigUInt64LE(pos + 24));
    assert.ok(flags !== 0 || sectors !== 0, `entry ${i}: replay-log reads a flagless empty entry as damage`);
    const rest = log.subarray(pos + 32, pos + sectorBytes);
    let markName: string | undefined;
    let data: Buffer;
    if (flags === FLAG_MARK) {
      assert.equal(sectors, 0, `mark ${i} has no sectors`);
      const nul = rest.indexOf(0);
      assert.ok(nul >= 0, `mark ${i} name is NUL-terminated inside its sector`);
      assert.equal(nul, dataLen, `mark ${i} data length is the name's length`);
      assert.ok(
        rest.subarray(nul).every((b) => b === 0),
        `mark ${i} padding is zero`,
      );
      data = Buffer.from(rest.subarray(0, dataLen));
      markName = data.toString("utf8");
      pos += sectorBytes;
    } else {
      assert.ok((flags & FLAG_MARK) === 0, `entry ${i}: a mark has only the mark flag`);
      assert.ok(
        rest.every((b) => b === 0),
        `entry ${i} padding is zero`,
      );
      assert.equal(dataLen, 0, `entry ${i} has no inline data`);
      pos += sectorBytes;
      const dataBytes = flags & FLAG_DISCARD ? 0 : sectors * sectorBytes;
      assert.ok(pos + dataBytes <= log.length, `entry ${i} data is inside the log`);
      data = Buffer.from(log.subarray(pos, pos + dataBytes));
      pos += dataBytes;
    }
    entries.push({ sector, sectors, flags, dataLen, data, markName });
  }
  assert.equal(pos, log.length, "the log ends after its last entry");
  return { sectorBytes, entries };
}

/** Applies entries [0, end) to `image` in place, as replay-log does with a device without discard. */
export function applyDmLog(log: DmLog, image: Buffer, end = log.entries.length): void {
  for (const e of log.entries.slice(0, end)) {
    const at = e.sector * log.sectorBytes;
    const bytes = e.sectors * log.sectorBytes;
    if (e.flags & FLAG_MARK || bytes === 0) continue;
    assert.ok(at + bytes <= image.length, "entry inside the image");
    if (e.flags & FLAG_DISCARD) image.fill(0, at, at + bytes);
    else e.data.copy(image, at);
  }
}
