/**
 * Nothing may write the image a node serves through another name for it. drive-backup and
 * drive-mirror once compared target paths as strings, so a symlink, a hard link or `dir/../image`
 * pointing at the served image was accepted and recreated the file: the disk then read zeros, also
 * under --read-only. Here each such target is refused with a GenericError naming the node, and
 * afterwards the file and what the export serves equal the original byte for byte. blockdev-add of
 * a writable alias of a read-only export (file, raw over an inline file, a journal) is refused too.
 */
import { test, type TestContext } from "node:test";
import assert from "node:assert/strict";
import { linkSync, mkdirSync, readFileSync, symlinkSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { QmpClient } from "../../src/qmp/client.js";
import { QmpError } from "../../src/qmp/errors.js";
import { startDaemon, stopAfter } from "../helpers/daemon.js";
import { connectQmp } from "../helpers/jobs.js";
import { run, tempDir } from "../helpers/run.js";

const SIZE_BYTES = 1024 * 1024;

/** Non-zero everywhere, so a truncated or zeroed image cannot pass for the original. */
function pattern(): Buffer {
  const b = Buffer.alloc(SIZE_BYTES);
  for (let i = 0; i < b.length; i++) b[i] = 1 + ((i * 7 + (i >> 12)) % 251);
  return b;
}

interface Served {
  readonly dir: string;
  readonly image: string;
  readonly original: Buffer;
  readonly copy: string;
  readonly qmp: QmpClient;
  readonly uri: string;
  /** Every other name of the image: symlink, hard link, a path through `..`, and the path itself. */
  readonly aliases: ReadonlyArray<readonly [string, string]>;
}

async function serve(t: TestContext, readOnly: boolean): Promise<Served> {
  const dir = tempDir(t, "drivetap-safety-");
  const image = join(dir, "disk.img");
  const original = pattern();
  writeFileSync(image, original);
  const copy = join(dir, "original.img");
  writeFileSync(copy, original);
  symlinkSync(image, join(dir, "link.img"));
  linkSync(image, join(dir, "hard.img"));
  mkdirSync(join(dir, "sub"));
  const qmpPath = join(dir, "qmp.sock");
  const daemon = await startDaemon({
    image,
    args: ["--qmp", qmpPath, ...(readOnly ? ["--read-only"] : [])],
  });
  stopAfter(t, daemon);
  const qmp = await connectQmp(t, qmpPath);
  const aliases = [
    ["symlink", join(dir, "link.img")],
    ["hard link", join(dir, "hard.img")],
    // Not normalised on purpose: the daemon must see the same file, not the same string.
    ["second path", `${dir}/sub/../disk.img`],
    ["same path", image],
  ] as const;
  return { dir, image, original, copy, qmp, uri: daemon.uri, aliases };
}

/** The file and the export both still hold the original bytes. */
async function assertIntact(s: Served, what: string): Promise<void> {
  assert.ok(readFileSync(s.image).equals(s.original), `${what}: the image file is unchanged`);
  const cmp = await run("qemu-img", ["compare", "-f", "raw", "-F", "raw", s.uri, s.copy]);
  assert.equal(cmp.code, 0, `${what}: the export serves the original: ${cmp.stdout} ${cmp.stderr}`);
}

async function assertRefused(
  s: Served,
  command: string,
  args: Record<string, unknown>,
  what: string,
  mentions: RegExp,
): Promise<void> {
  await assert.rejects(
    s.qmp.execute(command, args),
    (err: unknown) => {
      assert.ok(err instanceof QmpError, `${what}: a QMP error, got ${String(err)}`);
      assert.equal(err.errorClass, "GenericError", what);
      assert.match(err.message, mentions, `${what}: the error names the conflict`);
      return true;
    },
    `${what} is refused`,
  );
  const jobs = (await s.qmp.execute("query-block-jobs")) as unknown[];
  assert.deepEqual(jobs, [], `${what}: no job was left behind`);
  await assertIntact(s, what);
}

for (const readOnly of [false, true]) {
  const mode = readOnly ? "--read-only" : "writable";
  test(`drive-backup and drive-mirror onto another name of the served image are refused (${mode})`, async (t) => {
    const s = await serve(t, readOnly);
    let n = 0;
    for (const [kind, target] of s.aliases) {
      for (const targetMode of ["absolute-paths", "existing"] as const) {
        for (const command of ["drive-backup", "drive-mirror"]) {
          const args = { "job-id": `j${n++}`, device: "disk0", target, sync: "full", mode: targetMode };
          await assertRefused(
            s,
            command,
            args,
            `${command} mode=${targetMode} onto the ${kind}`,
            /Source and target cannot be the same.*node 'disk0'/,
          );
        }
      }
    }
  });
}

test("a writable alias of a --read-only export is refused by blockdev-add; readers are let in", async (t) => {
  const s = await serve(t, true);
  const [, link] = s.aliases[0];
  const attempts: Array<[string, Record<string, unknown>]> = [
    ["file on the same path", { driver: "file", "node-name": "w0", filename: s.image }],
    ["file via a symlink", { driver: "file", "node-name": "w1", filename: link }],
    [
      "raw over an inline file via the second path",
      { driver: "raw", "node-name": "w2", file: { driver: "file", filename: `${s.dir}/sub/../disk.img` } },
    ],
    ["a journal on the image via a symlink", { driver: "journal", "node-name": "w3", filename: link }],
  ];
  for (const [what, args] of attempts) {
    await assertRefused(s, "blockdev-add", args, what, /"write" lock: node 'disk0'/);
  }
  const nodes = (await s.qmp.execute("query-named-block-nodes")) as Array<Record<string, unknown>>;
  assert.deepEqual(
    nodes.map((n) => [n["node-name"], n.ro]),
    [
      ["#block-disk0-file", true],
      ["disk0", true],
    ],
    "only the export's nodes exist (serve's file node and the raw node over it), still read-only",
  );

  // A read-only alias shares what the export shares, so it is accepted, and it is really read-only.
  await s.qmp.execute("blockdev-add", {
    driver: "file",
    "node-name": "r0",
    filename: link,
    "read-only": true,
  });
  await s.qmp.execute("blockdev-add", { driver: "memory", "node-name": "scratch", size: SIZE_BYTES });
  await assertRefused(
    s,
    "blockdev-mirror",
    { "job-id": "m", device: "scratch", target: "r0", sync: "full" },
    "a mirror onto the read-only alias",
    /read-only/,
  );
  await s.qmp.execute("blockdev-del", { "node-name": "r0" });
});

test("force-share: only for read-only nodes; it lets a reader next to a writable export", async (t) => {
  const s = await serve(t, false);
  const [, link] = s.aliases[0];
  // A plain reader would let nobody else write, but the export writes: refused, naming the node.
  await assertRefused(
    s,
    "blockdev-add",
    { driver: "file", "node-name": "r0", filename: link, "read-only": true },
    "a read-only alias of a writable export",
    /shared "write" lock: node 'disk0' holds "write"/,
  );
  await assertRefused(
    s,
    "blockdev-add",
    { driver: "file", "node-name": "r1", filename: link, "force-share": true },
    "force-share without read-only",
    /force-share=on can only be used with read-only images/,
  );
  await s.qmp.execute("blockdev-add", {
    driver: "raw",
    "node-name": "r2",
    "read-only": true,
    file: { driver: "file", filename: link, "force-share": true },
  });
  await s.qmp.execute("blockdev-del", { "node-name": "r2" });
  await assertIntact(s, "after the force-shared reader");
});
