/**
 * Qcow2Driver.changeBacking: a runtime change of the backing image rewrites the header's backing name
 * and format (checked with qemu-img), keeps the other header extensions, refuses a name that does not
 * fit in cluster 0 without touching the image, and reads through the new backing at once.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { FileDriver } from "../../src/block/drivers/file.js";
import { openImage } from "../../src/block/drivers/qcow2/image.js";
import { Qcow2Driver } from "../../src/block/drivers/qcow2/qcow2.js";
import { assertChecks, qemuImgCreate, qemuIo } from "../helpers/qcow2.js";
import { runOk, tempDir } from "../helpers/run.js";

async function info(path: string): Promise<Record<string, unknown>> {
  return JSON.parse((await runOk("qemu-img", ["info", "-U", "--output=json", path])).stdout) as Record<
    string,
    unknown
  >;
}

test("changeBacking rewrites the header's backing name and format, keeping the extensions", async (t) => {
  const dir = tempDir(t);
  const a = join(dir, "a.raw");
  const b = join(dir, "b.qcow2");
  const top = join(dir, "top.qcow2");
  await qemuImgCreate(a, "4M", { format: "raw" });
  await qemuImgCreate(b, "4M");
  await qemuIo(a, "raw", ["write -P 0x11 0 64k"]);
  await qemuIo(b, "qcow2", ["write -P 0x22 0 64k"]);
  await qemuImgCreate(top, "4M", { backing: a, backingFormat: "raw" });
  const extBefore = readFileSync(top).subarray(0, 65536).includes(Buffer.from("lazy refcounts"));
  assert.ok(extBefore, "qemu-img writes a feature table");

  const driver = (await openImage(top, { format: "qcow2" })) as Qcow2Driver;
  const seen = Buffer.alloc(512);
  await driver.pread(0, seen);
  assert.equal(seen[0], 0x11);

  const bDriver = await openImage(b, { format: "qcow2", readOnly: true });
  const { old, owned } = await driver.changeBacking(bDriver, {
    owns: true,
    name: { file: b, format: "qcow2" },
  });
  assert.equal(owned, true);
  await old?.close();
  await driver.pread(0, seen);
  assert.equal(seen[0], 0x22, "reads go to the new backing at once");
  assert.equal(driver.header.backingFile, b);

  // The other extensions survive the rewrite.
  assert.ok(readFileSync(top).subarray(0, 65536).includes(Buffer.from("lazy refcounts")));
  let i = await info(top);
  assert.equal(i["backing-filename"], b);
  assert.equal(i["backing-filename-format"], "qcow2");

  // Dropping the backing: the header names none.
  const dropped = await driver.changeBacking(null, { owns: false, name: null });
  await dropped.old?.close();
  await driver.pread(0, seen);
  assert.equal(seen[0], 0, "no backing: unallocated clusters read zeros");
  await driver.close();
  i = await info(top);
  assert.equal(i["backing-filename"], undefined);
  await assertChecks(top);
});

test("a backing name that does not fit in cluster 0 is refused and the image is untouched", async (t) => {
  const dir = tempDir(t);
  const top = join(dir, "top.qcow2");
  await qemuImgCreate(top, "1M", { options: ["cluster_size=512"] });
  const before = readFileSync(top).subarray(0, 512);
  const driver = await Qcow2Driver.open(FileDriver.open(top), {});
  const long = `/${"x".repeat(500)}`;
  await assert.rejects(
    driver.changeBacking(null, { owns: false, name: { file: long, format: "raw" } }),
    /does not fit in the image's first cluster/,
  );
  await assert.rejects(
    driver.changeBacking(null, { owns: false, name: { file: "y".repeat(1024), format: "raw" } }),
    /backing file name of 1024 bytes is not allowed/,
  );
  assert.equal(driver.header.backingFile, null);
  await driver.close();
  assert.deepEqual(readFileSync(top).subarray(0, 512), before);
  await assertChecks(top);
});

test("a read-only image refuses a header rewrite", async (t) => {
  const dir = tempDir(t);
  const top = join(dir, "top.qcow2");
  await qemuImgCreate(top, "1M");
  const driver = await Qcow2Driver.open(FileDriver.open(top, { readOnly: true }), { readOnly: true });
  await assert.rejects(driver.changeBacking(null, { owns: false, name: null }), /read-only/);
  await driver.close();
});
