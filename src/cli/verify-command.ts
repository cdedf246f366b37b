/**
 * `drivetap verify`: runs x-block-verify on a running daemon and prints the differing extents and a
 * summary. Exit status as cmp(1): 0 when source and target are equal (after repairs, and apart from
 * what a job is still resyncing), 1 when mismatches remain, 2 on any error.
 */
import { Command, InvalidArgumentError } from "commander";
import { parseSize } from "../core/units.js";
import { QmpError } from "../qmp/errors.js";
import { formatBytes } from "./progress.js";
import { CliFailure, connect, defaultQmpSocket, runAction, SOCKET_HELP } from "./qmp-commands.js";

const EXIT_EQUAL = 0;
const EXIT_DIFFERENT = 1;
const EXIT_TROUBLE = 2;

interface VerifyOptions {
  socket?: string;
  jobId?: string;
  offset?: number;
  length?: number;
  granularity?: number;
  repair?: boolean;
  json?: boolean;
}

/** An extent in x-block-verify's return. */
export interface Extent {
  offset: number;
  length: number;
  repaired?: boolean;
}

/** What x-block-verify returns (the QMP wire form). */
export interface VerifyReturn {
  "checked-bytes": number;
  mismatches: Extent[];
  "mismatch-bytes": number;
  pending: Extent[];
  "pending-bytes": number;
  "repaired-bytes": number;
  rechecked: number;
  truncated: boolean;
}

function sizeOption(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

function extentLine(kind: string, e: Extent): string {
  const note = e.repaired === undefined ? "" : e.repaired ? "  repaired" : "  NOT repaired";
  return `${kind.padEnd(8)} offset ${e.offset}  length ${e.length} (${formatBytes(e.length)})${note}\n`;
}

async function verifyAction(
  source: string | undefined,
  target: string | undefined,
  opts: VerifyOptions,
): Promise<number> {
  if (opts.jobId === undefined && (source === undefined || target === undefined))
    throw new CliFailure("give SOURCE and TARGET node names, or --job-id", EXIT_TROUBLE);
  const args: Record<string, unknown> = {};
  if (opts.jobId !== undefined) args["job-id"] = opts.jobId;
  if (source !== undefined) args.source = source;
  if (target !== undefined) args.target = target;
  if (opts.offset !== undefined) args.offset = opts.offset;
  if (opts.length !== undefined) args.length = opts.length;
  if (opts.granularity !== undefined) args.granularity = opts.granularity;
  if (opts.repair) args.repair = true;

  let r: VerifyReturn;
  try {
    const client = await connect(opts.socket ?? defaultQmpSocket());
    try {
      r = (await client.execute("x-block-verify", args)) as VerifyReturn;
    } finally {
      client.close();
    }
  } catch (err) {
    if (err instanceof QmpError) throw new CliFailure(`${err.errorClass}: ${err.message}`, EXIT_TROUBLE);
    if (err instanceof CliFailure) throw new CliFailure(err.message, EXIT_TROUBLE);
    throw new CliFailure((err as Error).message, EXIT_TROUBLE);
  }
  const remainingBytes = r["mismatch-bytes"] - r["repaired-bytes"];
  if (opts.json) {
    process.stdout.write(JSON.stringify(r, null, 2) + "\n");
  } else {
    const out: string[] = [];
    for (const e of r.mismatches) out.push(extentLine("mismatch", e));
    for (const e of r.pending) out.push(extentLine("pending", e));
    if (r.truncated) out.push(`(more extents than listed; the byte counts below cover all)\n`);
    const parts = [
      `checked ${formatBytes(r["checked-bytes"])}`,
      `${r.mismatches.length} mismatched extent${r.mismatches.length === 1 ? "" : "s"} ` +
        `(${formatBytes(r["mismatch-bytes"])})`,
    ];
    if (opts.repair) parts.push(`${formatBytes(r["repaired-bytes"])} repaired`);
    if (r["pending-bytes"] > 0) parts.push(`${formatBytes(r["pending-bytes"])} pending resync by the job`);
    parts.push(`${r.rechecked} chunk${r.rechecked === 1 ? "" : "s"} re-checked under lock`);
    out.push(`${parts.join(", ")}: ${remainingBytes === 0 ? "equal" : `${remainingBytes} bytes differ`}\n`);
    process.stdout.write(out.join(""));
  }
  return remainingBytes === 0 ? EXIT_EQUAL : EXIT_DIFFERENT;
}

export function addVerifyCommand(program: Command): void {
  program
    .command("verify")
    .description("Compare a target node with its source by checksums while writes go on; repair on request")
    .argument("[source]", "the source node (e.g. disk0)")
    .argument("[target]", "the target node")
    .option("--job-id <id>", "take source and target from this stream or mirror job")
    .option("--offset <size>", "start here (default 0)", sizeOption)
    .option("--length <size>", "compare this many bytes (default: to the end)", sizeOption)
    .option("--granularity <size>", "bytes compared at a time (default 1M, 4K to 16M)", sizeOption)
    .option("--repair", "copy the source's data over each mismatch")
    .option("--json", "print x-block-verify's answer as JSON")
    .option("--socket <path>", SOCKET_HELP)
    .addHelpText(
      "after",
      `
A chunk that differs is re-checked while writes to it are held (for at most one chunk), so writes in
flight are never reported as mismatches. Mismatches are precise to 4 KiB. With --job-id, differences
the job already knows about (it will resync them) are listed as "pending" and left to the job.

Exit status: 0 when source and target are equal (after --repair, and apart from pending ranges),
1 when mismatches remain, 2 on an error.

Examples:
  drivetap verify disk0 backup0
  drivetap verify --job-id copy1 --repair
  drivetap verify disk0 backup0 --offset 1G --length 256M --json`,
    )
    .action((source: string | undefined, target: string | undefined, opts: VerifyOptions) =>
      runAction("verify", () => verifyAction(source, target, opts)),
    );
}
