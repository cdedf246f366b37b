/**
 * blockdev-create (QEMU 7.2: `job-id`, `options` = BlockdevCreateOptions, a union on `driver`).
 * CREATORS is the table of what can be created: each entry is the driver's option schema and its
 * creator: `file` makes a file, `qcow2` writes an empty image into an existing file node (v3, 16-bit
 * refcounts, deflate; what drivetap's qcow2 does not write is refused by name). The other drivers drivetap has get QEMU's answer
 * for drivers without create support (raw, null-co, nbd: "Driver does not support blockdev-create").
 * The work runs as a CreateJob (jobs/create.ts), which never sees these options' QMP shape.
 */
import { createFileImage, type FileCreateOptions } from "../../block/drivers/file-create.js";
import type { BlockDriver } from "../../block/driver.js";
import { FileDriver, type FileId } from "../../block/drivers/file.js";
import { createQcow2 } from "../../block/drivers/qcow2/create.js";
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
  /**
   * The driver of node `name` (a format's `file`), held alone for the creation: a node that
   * anything uses (an export, a job, a parent) or that is read-only is refused. Call `release`.
   */
  takeNode(name: string): { driver: BlockDriver; release(): void };
}

/** qcow2 creation options drivetap does not implement, refused by name before anything is written. */
function refuseQcow2Options(o: Record<string, unknown>): void {
  const refuse = (what: string): never => {
    throw new QmpError("GenericError", `drivetap cannot create qcow2 images with ${what}`);
  };
  if (o.encrypt !== undefined) refuse("encryption");
  if (o["data-file"] !== undefined || o["data-file-raw"] !== undefined) refuse("an external data file");
  if (o["extended-l2"] === true) refuse("extended L2 entries");
  if (o["compression-type"] === "zstd") refuse("zstd compression");
  if (o.version === "v2") refuse("version v2 (compat 0.10)");
  if (o["lazy-refcounts"] === true) refuse("lazy refcounts");
  if (o["refcount-bits"] !== undefined && o["refcount-bits"] !== 16) refuse("refcount bits other than 16");
  if (o.preallocation !== undefined && o.preallocation !== "off")
    refuse(`preallocation=${String(o.preallocation)}`);
  if (typeof o.file !== "string") refuse("an inline file: give the file node's name");
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
  // BlockdevCreateOptionsQcow2: the image is written into an existing (file) node, which QEMU's
  // workflow creates with driver=file and adds with blockdev-add first.
  qcow2: {
    args: {
      file: { type: "any" },
      "data-file": { type: "any", optional: true },
      "data-file-raw": { type: "bool", optional: true },
      "extended-l2": { type: "bool", optional: true },
      size: { type: "int", min: 0 },
      version: { type: "enum", values: ["v2", "v3"], optional: true },
      "backing-file": { type: "str", optional: true },
      "backing-fmt": { type: "enum", values: BLOCKDEV_DRIVERS, optional: true },
      encrypt: { type: "any", optional: true },
      "cluster-size": { type: "int", optional: true },
      preallocation: { type: "enum", values: ["off", "metadata", "falloc", "full"], optional: true },
      "lazy-refcounts": { type: "bool", optional: true },
      "refcount-bits": { type: "int", optional: true },
      "compression-type": { type: "enum", values: ["zlib", "zstd"], optional: true },
    },
    create: async (o, ctx) => {
      refuseQcow2Options(o);
      const { driver, release } = ctx.takeNode(o.file as string);
      try {
        // The image starts from an empty file, as qemu-img's does.
        if (driver instanceof FileDriver) await driver.resize(0);
        await createQcow2(driver, o.size as number, {
          clusterSize: o["cluster-size"] as number | undefined,
          backingFile: o["backing-file"] as string | undefined,
          backingFmt: o["backing-fmt"] as string | undefined,
        });
        // The file grew by writes past its end: its node must see the new size.
        if (driver instanceof FileDriver) driver.refreshSize();
      } finally {
        release();
      }
    },
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
    takeNode: (name) => {
      const node = graph.getNode(name);
      if (!node) throw new QmpError("GenericError", `Cannot find device='' nor node-name='${name}'`);
      if (node.readOnly) throw new QmpError("GenericError", `Block node '${name}' is read-only`);
      const user = `create:${name}`;
      try {
        graph.claim(name, user, "blockdev-create", true);
      } catch (err) {
        throw new QmpError("GenericError", (err as Error).message);
      }
      return { driver: node.driver, release: () => graph.release(name, user) };
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
