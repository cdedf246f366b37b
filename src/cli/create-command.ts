/**
 * `drivetap create -f qcow2|raw FILE [SIZE] [-b BACKING -F FMT] [--cluster-size N]`: makes an empty
 * image, as `qemu-img create` does (an existing file is truncated first, unless another program holds
 * it: the open takes the image locks). With a backing file and no SIZE, the backing file's size.
 */
import { Command, InvalidArgumentError } from "commander";
import { FileDriver } from "../block/drivers/file.js";
import { createQcow2 } from "../block/drivers/qcow2/create.js";
import {
  IMAGE_FORMATS,
  openImage,
  resolveBackingPath,
  type ImageFormat,
} from "../block/drivers/qcow2/image.js";
import { parseSize } from "../core/units.js";

interface CreateOptions {
  format: ImageFormat;
  backing?: string;
  backingFormat?: ImageFormat;
  clusterSize?: number;
}

/** An image format option's value (serve --format, create -f and -F). */
export function formatOption(value: string): ImageFormat {
  if (!(IMAGE_FORMATS as readonly string[]).includes(value)) {
    throw new InvalidArgumentError(`expected ${IMAGE_FORMATS.join(" or ")}, not ${value}`);
  }
  return value as ImageFormat;
}

function sizeArgument(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

async function createAction(file: string, sizeText: string | undefined, opts: CreateOptions): Promise<void> {
  if (opts.backing !== undefined && opts.format !== "qcow2") {
    throw new Error(`'${opts.format}' images have no backing file`);
  }
  if (opts.backing !== undefined && opts.backingFormat === undefined) {
    throw new Error(`${file}: Backing file specified without backing format (-F raw or -F qcow2)`);
  }
  if (opts.clusterSize !== undefined && opts.format !== "qcow2") {
    throw new Error("--cluster-size is a qcow2 option");
  }
  let size = sizeText === undefined ? undefined : sizeArgument(sizeText);
  if (opts.backing !== undefined) {
    // The backing file must open (as qemu-img checks); it also gives the size when none was asked.
    const backing = await openImage(resolveBackingPath(file, opts.backing), {
      readOnly: true,
      format: opts.backingFormat,
    });
    size ??= backing.size();
    await backing.close();
  }
  if (size === undefined) throw new Error("Image creation needs a size parameter");
  const driver = FileDriver.open(file, { create: true });
  try {
    driver.truncate(0);
    if (opts.format === "raw") driver.truncate(size);
    else {
      await createQcow2(driver, size, {
        clusterSize: opts.clusterSize,
        backingFile: opts.backing,
        backingFmt: opts.backingFormat,
      });
    }
  } finally {
    await driver.close();
  }
  const extra =
    opts.format === "qcow2"
      ? ` cluster_size=${opts.clusterSize ?? 65536}` +
        (opts.backing ? ` backing_file=${opts.backing} backing_fmt=${opts.backingFormat}` : "")
      : "";
  process.stdout.write(`Formatting '${file}', fmt=${opts.format}${extra} size=${size}\n`);
}

export function addCreateCommand(program: Command): void {
  program
    .command("create")
    .description("Create an empty disk image (raw or qcow2), as qemu-img create does")
    .argument("<file>", "image file to create (an existing one is truncated)")
    .argument("[size]", "virtual size (K/M/G/T suffixes); with -b, defaults to the backing file's")
    .requiredOption("-f, --format <fmt>", "image format: raw or qcow2", formatOption)
    .option("-b, --backing <file>", "qcow2: backing file (relative names resolve next to FILE)")
    .option("-F, --backing-format <fmt>", "format of the backing file: raw or qcow2", formatOption)
    .option("--cluster-size <size>", "qcow2: cluster size, 512 to 2M (default 64k)", sizeArgument)
    .action(async (file: string, size: string | undefined, opts: CreateOptions) => {
      try {
        await createAction(file, size, opts);
      } catch (err) {
        process.stderr.write(`drivetap create: ${(err as Error).message}\n`);
        process.exit(1);
      }
    });
}
