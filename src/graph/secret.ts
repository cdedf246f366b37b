/**
 * `secret` objects (QEMU's crypto/secret.c): a value given inline (`data`) or read from a file, in
 * `raw` or `base64`, held for later users (PSK keys, image encryption) to name by id. drivetap has no
 * master key, so secrets encrypted with `keyid` and `iv` cannot be opened and are refused.
 */
import * as fs from "node:fs";
import { KiB } from "../core/units.js";

/** A secret is a key or a password; the bound keeps a mistaken `file` from loading a disk image. */
export const SECRET_BYTES_MAX = 64 * KiB;

export type SecretFormat = "raw" | "base64";

/** What `object-add qom-type=secret` carries (QEMU's SecretProperties). */
export interface SecretProperties {
  readonly data?: string;
  readonly file?: string;
  readonly format?: SecretFormat;
  readonly keyid?: string;
  readonly iv?: string;
}

export interface SecretObject {
  readonly id: string;
  readonly qomType: "secret";
  /** The properties as given, for qom-get. */
  readonly properties: SecretProperties;
  /** The secret itself, decoded. */
  readonly value: Buffer;
}

/** A secret refused; messages are QEMU's where it has one. */
export class SecretError extends Error {}

/** QEMU's qbase64_decode accepts the alphabet, padding and newlines, nothing else. */
const BASE64_TEXT = /^[A-Za-z0-9+/=\n]*$/;

function readSecretFile(file: string): Buffer {
  let fd: number;
  try {
    fd = fs.openSync(file, "r");
  } catch (err) {
    throw new SecretError(`Unable to read ${file}: ${(err as Error).message}`);
  }
  try {
    const st = fs.fstatSync(fd);
    if (st.isDirectory()) throw new SecretError(`Unable to read ${file}: Is a directory`);
    if (st.size > SECRET_BYTES_MAX) {
      throw new SecretError(`Unable to read ${file}: a secret is at most ${SECRET_BYTES_MAX} bytes`);
    }
    // One byte more than the bound shows a file that grew (or a pipe that keeps going).
    const buf = Buffer.alloc(SECRET_BYTES_MAX + 1);
    let n = 0;
    for (;;) {
      const got = fs.readSync(fd, buf, n, buf.length - n, null);
      if (got === 0) break;
      n += got;
      if (n > SECRET_BYTES_MAX) {
        throw new SecretError(`Unable to read ${file}: a secret is at most ${SECRET_BYTES_MAX} bytes`);
      }
    }
    return buf.subarray(0, n);
  } finally {
    fs.closeSync(fd);
  }
}

/** QEMU's secrets are encrypted with AES-256-CBC, so a master key is 32 bytes. */
const MASTER_KEY_BYTES = 32;

/**
 * Loads a secret. `secretValue` finds another secret by id: a `keyid` is checked as QEMU checks it
 * (it exists, it holds a 32-byte key, an `iv` is given) before drivetap refuses to decrypt at all.
 */
export function loadSecret(
  id: string,
  p: SecretProperties,
  secretValue: (id: string) => Buffer | undefined,
): SecretObject {
  if (p.data !== undefined && p.file !== undefined) {
    throw new SecretError("'file' and 'data' are mutually exclusive");
  }
  if (p.data === undefined && p.file === undefined) {
    throw new SecretError("Either 'file' or 'data' must be provided");
  }
  if (p.keyid !== undefined) {
    const key = secretValue(p.keyid);
    if (key === undefined) throw new SecretError(`No secret with id '${p.keyid}'`);
    if (key.length !== MASTER_KEY_BYTES) {
      throw new SecretError(`Key should be ${MASTER_KEY_BYTES} bytes in length`);
    }
    if (p.iv === undefined) throw new SecretError("IV is required to decrypt secret");
    throw new SecretError(
      `secret '${id}': drivetap has no master key to decrypt secrets with ('keyid' '${p.keyid}'); ` +
        "give the secret unencrypted, in a file only the daemon can read",
    );
  }
  let raw: Buffer;
  if (p.data !== undefined) {
    if (Buffer.byteLength(p.data) > SECRET_BYTES_MAX) {
      throw new SecretError(`secret '${id}': a secret is at most ${SECRET_BYTES_MAX} bytes`);
    }
    raw = Buffer.from(p.data, "utf8");
  } else {
    raw = readSecretFile(p.file as string);
  }
  let value = raw;
  if (p.format === "base64") {
    const text = raw.toString("latin1");
    if (!BASE64_TEXT.test(text)) throw new SecretError("Base64 data contains invalid characters");
    value = Buffer.from(text, "base64");
  }
  return { id, qomType: "secret", properties: p, value };
}
