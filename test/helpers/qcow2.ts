/** qemu-img and qemu-io steps the qcow2 tests share: making images, writing them, checking them. */
import assert from "node:assert/strict";
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
