/**
 * `drivetap tap`: prints each write, write-zeroes, discard and flush a node completes, as JSON lines
 * ({seq, time, kind, offset, length, fua}), as it happens. It asks the daemon for a tap (QMP
 * x-tap-add, qmp/commands/tap.ts) on a socket in a fresh temp directory, reads it, and removes the tap
 * when it ends. The daemon never waits for this reader: if it falls behind, records are dropped and a
 * {"dropped":N} line says how many.
 */
import * as fs from "node:fs";
import * as net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { Command } from "commander";
import { parseSize } from "../core/units.js";
import { QmpClient } from "../qmp/client.js";
import { QmpError } from "../qmp/errors.js";
import { defaultQmpSocket } from "./qmp-commands.js";

/** A line from the daemon longer than this is not one of its records. */
const TAP_LINE_BYTES_MAX = 64 * 1024;

interface TapOptions {
  socket?: string;
  node?: string;
  range?: string;
  ring?: string;
}

export interface Range {
  readonly offset: number;
  readonly length: number;
}

export function parseRange(text: string): Range {
  const m = /^([^:]+):([^:]+)$/.exec(text);
  if (!m) throw new Error(`--range wants OFFSET:LENGTH, not '${text}'`);
  const range = { offset: parseSize(m[1]), length: parseSize(m[2]) };
  if (range.length === 0) throw new Error("--range: LENGTH must be above 0");
  return range;
}

/** Whether a tap line passes the range filter: flushes and dropped counts always do. */
export function inRange(record: Record<string, unknown>, range: Range | null): boolean {
  if (!range || typeof record.offset !== "number" || typeof record.length !== "number") return true;
  if (record.kind === "flush") return true;
  return record.offset < range.offset + range.length && range.offset < record.offset + record.length;
}

async function tap(opts: TapOptions): Promise<number> {
  const range = opts.range !== undefined ? parseRange(opts.range) : null;
  const qmp = await QmpClient.connect(opts.socket ?? defaultQmpSocket());
  let node = opts.node;
  if (node === undefined) {
    const block = (await qmp.execute("query-block")) as { device: string }[];
    if (block.length === 0) throw new Error("the daemon serves no disk");
    node = block[0].device;
  }
  const dir = fs.mkdtempSync(join(tmpdir(), "drivetap-tap-"));
  const path = join(dir, "tap.sock");
  const args: Record<string, unknown> = { "node-name": node, path };
  if (opts.ring !== undefined) args["ring-records"] = Number(opts.ring);
  try {
    await qmp.execute("x-tap-add", args);
  } catch (err) {
    fs.rmSync(dir, { recursive: true, force: true });
    qmp.close();
    throw err;
  }

  let finishing: Promise<void> | null = null;
  const finish = (): Promise<void> =>
    (finishing ??= (async () => {
      await qmp.execute("x-tap-remove", { path }).catch(() => undefined);
      qmp.close();
      fs.rmSync(dir, { recursive: true, force: true });
    })());

  return new Promise<number>((resolve) => {
    const end = (code: number): void => void finish().then(() => resolve(code));
    process.once("SIGINT", () => end(0));
    process.once("SIGTERM", () => end(0));
    process.stdout.on("error", () => end(0)); // the reader went away (| head)
    const socket = net.connect(path);
    socket.setEncoding("utf8");
    let buffer = "";
    socket.on("data", (chunk: string) => {
      buffer += chunk;
      const out: string[] = [];
      let nl: number;
      while ((nl = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, nl);
        buffer = buffer.slice(nl + 1);
        if (inRange(JSON.parse(line) as Record<string, unknown>, range)) out.push(line + "\n");
      }
      if (buffer.length > TAP_LINE_BYTES_MAX) {
        process.stderr.write("drivetap tap: the daemon sent a line over the bound\n");
        end(1);
        return;
      }
      if (out.length > 0 && !process.stdout.write(out.join(""))) {
        // Our own reader is slow: stop reading, so the daemon drops and counts instead of us buffering.
        socket.pause();
        process.stdout.once("drain", () => socket.resume());
      }
    });
    socket.on("error", (err) => {
      process.stderr.write(`drivetap tap: ${err.message}\n`);
      end(1);
    });
    socket.on("close", () => {
      if (finishing) return;
      process.stderr.write("drivetap tap: the daemon closed the tap\n");
      end(1);
    });
    socket.on("connect", () => process.stderr.write(`drivetap tap: tapping node ${node}\n`));
  });
}

export function addTapCommand(program: Command): void {
  program
    .command("tap")
    .description(
      "Print each write, write-zeroes, discard and flush as it happens, one JSON object per line " +
        '(seq, time, kind, offset, length, fua); a slow reader never blocks the disk: it gets {"dropped":N}',
    )
    .option("--socket <path>", `the daemon's QMP socket (default: $DRIVETAP_QMP, else ${defaultQmpSocket()})`)
    .option("--node <name>", "the node to tap (default: the first served disk)")
    .option("--range <offset:length>", "only requests overlapping this byte range (flushes always show)")
    .option("--ring <records>", "records the daemon holds for this reader before dropping")
    .action(async (opts: TapOptions) => {
      let code: number;
      try {
        code = await tap(opts);
      } catch (err) {
        const message =
          err instanceof QmpError ? `${err.errorClass}: ${err.message}` : (err as Error).message;
        process.stderr.write(`drivetap tap: ${message}\n`);
        code = 1;
      }
      process.exit(code);
    });
}
