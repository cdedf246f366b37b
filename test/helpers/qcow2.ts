/** qemu-img and qemu-io steps the qcow2 tests share: making images, writing them, checking them. */
import assert from "node:assert/strict";
import { closeSync, openSync, readSync, writeSync } from "node:fs";
import { run, runOk, type RunResult } from "./run.js";

export interface CreateOptions {
  readonly format?: "qcow2" | "raw";
  /** qemu-img -o options, e.g. "cluster_size=4k". */
  readonly options?: readonly string[];
  readonly backing?: string;
  readonly backingFormat?: string;
  /** Relative backing names are stored as given; run where they resolve. */
  readonly cwd?: string;
}

/** `qemu-img create -q -f FMT [-o ...] [-b B -F F] PATH [SIZE]`. */
export function qemuImgCreate(
  path: string,
  size: string | number | undefined,
  o: CreateOptions = {},
): Promise<RunResult> {
  const args = ["create", "-q", "-f", o.format ?? "qcow2"];
  for (const opt of o.options ?? []) args.push("-o", opt);
  if (o.backing !== undefined) args.push("-b", o.backing, "-F", o.backingFormat ?? "raw");
  args.push(path);
  if (size !== undefined) args.push(String(size));
  return runOk("qemu-img", args, { cwd: o.cwd });
}

/** qemu-io with one -c per command; `-r` for read-only exports. */
export function qemuIo(
  target: string,
  format: string,
  commands: readonly string[],
  readOnly = false,
): Promise<RunResult> {
  const args = [...(readOnly ? ["-r"] : []), "-f", format, target];
  for (const c of commands) args.push("-c", c);
  return runOk("qemu-io", args);
}

/** qemu-img check finds nothing at all (no leaks either). */
export async function assertChecks(image: string): Promise<void> {
  const r = await run("qemu-img", ["check", image]);
  assert.equal(r.code, 0, `qemu-img check ${image}: ${r.stdout}${r.stderr}`);
  assert.match(r.stdout, /No errors were found on the image/);
}

/** qemu-img compare says the two disks read the same. */
export async function assertSame(a: string, b: string): Promise<void> {
  const r = await run("qemu-img", ["compare", a, b]);
  assert.equal(r.code, 0, `qemu-img compare ${a} ${b}: ${r.stdout}${r.stderr}`);
}

/**
 * The offset in a big-endian u64 of an image file: a header field, or an L1/L2/refcount table entry
 * with its flag bits masked (bits 9-55).
 */
export function readOffsetAt(image: string, offset: number): number {
  const b = Buffer.alloc(8);
  const fd = openSync(image, "r");
  try {
    readSync(fd, b, 0, 8, offset);
  } finally {
    closeSync(fd);
  }
  return Number(b.readBigUInt64BE(0) & 0x00fffffffffffe00n);
}

/** Overwrites bytes of an image file in place (crafting damaged images). */
export function patchImage(image: string, offset: number, bytes: Buffer): void {
  const fd = openSync(image, "r+");
  try {
    writeSync(fd, bytes, 0, bytes.length, offset);
  } finally {
    closeSync(fd);
  }
}

/** Sets the dirty bit of a v3 image, as a crash leaves it. */
export function setDirtyBit(image: string): void {
  const b = Buffer.alloc(8);
  const fd = openSync(image, "r");
  try {
    readSync(fd, b, 0, 8, 72);
  } finally {
    closeSync(fd);
  }
  b[7] |= 1;
  patchImage(image, 72, b);
}

/**
 * `qemu-img check` of an image: its exit code (0 clean, 2 corrupt, 3 leaks) and all it printed.
 * `forceShare` (-U) checks an image a running daemon holds.
 */
export async function qemuImgCheck(
  image: string,
  forceShare = false,
): Promise<{ code: number | null; text: string }> {
  const r = await run("qemu-img", ["check", ...(forceShare ? ["-U"] : []), image]);
  return { code: r.code, text: r.stdout + r.stderr };
}

/** `qemu-img info`'s dirty flag. */
export async function dirtyFlag(image: string): Promise<boolean> {
  const info = JSON.parse((await runOk("qemu-img", ["info", "-U", "--output=json", image])).stdout) as {
    "dirty-flag": boolean;
  };
  return info["dirty-flag"];
}
