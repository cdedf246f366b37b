/**
 * blockdev-create (QEMU 7.2: `job-id`, `options` = BlockdevCreateOptions, a union on `driver`).
 * CREATORS is the table of what can be created: each entry is the driver's option schema and its
 * creator, so a qcow2 creator is one more entry. The other drivers drivetap has get QEMU's answer
 * for drivers without create support (raw, null-co, nbd: "Driver does not support blockdev-create").
 * The work runs as a CreateJob (jobs/create.ts), which never sees these options' QMP shape.
 */
import { createFileImage, type FileCreateOptions } from "../../block/drivers/file-create.js";
import type { FileId } from "../../block/drivers/file.js";
import type { BlockGraph } from "../../graph/block-graph.js";
import { CreateJob } from "../../jobs/create.js";
import { QmpError } from "../errors.js";
import { validateArgs, type ArgsSpec } from "../schema.js";
import { defineCommand, type QmpCommandDef } from "../server.js";
import { BLOCKDEV_DRIVERS } from "./block.js";
import { checkJobId } from "./job-start.js";

/** What a creator may ask of the graph. */
interface CreateContext {
  /** Throws when file `id` (reached as `filename`) must not be written: a node has it open. */
  refuseFile(id: FileId, filename: string): void;
}

interface Creator {
  /** The driver's members of BlockdevCreateOptions (besides `driver`). */
  readonly args: ArgsSpec;
  create(options: Record<string, unknown>, ctx: CreateContext): Promise<void>;
}

const CREATORS: Readonly<Record<string, Creator>> = {
  file: {
    args: {
      filename: { type: "str" },
      size: { type: "int" },
      preallocation: { type: "enum", values: ["off", "metadata", "falloc", "full"], optional: true },
      nocow: { type: "bool", optional: true },
      "extent-size-hint": { type: "int", optional: true },
    },
    create: (o, ctx) =>
      createFileImage(o as unknown as FileCreateOptions, (id) => ctx.refuseFile(id, o.filename as string)),
  },
};

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

/** Checks `options` as QEMU's input visitor does: the tag first, then the variant's members. */
function checkOptions(options: unknown): { creator: Creator; options: Record<string, unknown> } {
  if (!isObject(options)) {
    throw new QmpError("GenericError", "Invalid parameter type for 'options', expected: object");
  }
  const driver = options.driver;
  if (driver === undefined) throw new QmpError("GenericError", "Parameter 'options.driver' is missing");
  if (typeof driver !== "string") {
    throw new QmpError("GenericError", "Invalid parameter type for 'options.driver', expected: string");
  }
  const creator = Object.hasOwn(CREATORS, driver) ? CREATORS[driver] : undefined;
  if (!creator && !(BLOCKDEV_DRIVERS as readonly string[]).includes(driver)) {
    // QEMU's visitor names the tag without its path here.
    throw new QmpError("GenericError", `Parameter 'driver' does not accept value '${driver}'`);
  }
  const members = { ...options };
  delete members.driver;
  const checked = validateArgs(creator?.args ?? {}, members, "options");
  if (!creator) throw new QmpError("GenericError", "Driver does not support blockdev-create");
  return { creator, options: checked };
}

export function createCommands(graph: BlockGraph): QmpCommandDef[] {
  const ctx: CreateContext = {
    // Any node, even a read-only one that shares everything: recreating truncates the file.
    refuseFile: (id, filename) => {
      const users = graph.nodesWithFile(id);
      if (users.length > 0)
        throw new QmpError("GenericError", `'${filename}' is in use by node '${users[0]}'`);
    },
  };
  return [
    defineCommand({
      name: "blockdev-create",
      args: { "job-id": { type: "str" }, options: { type: "any" } },
      handler: (a) => {
        const { creator, options } = checkOptions(a.options);
        checkJobId(graph, a["job-id"]);
        const job = new CreateJob({
          id: a["job-id"],
          create: () => creator.create(options, ctx),
          events: graph.events,
          log: graph.log,
          onGone: (j) => graph.removeJob(j),
        });
        graph.addJob(job);
        job.start();
        return {};
      },
    }),
  ];
}
