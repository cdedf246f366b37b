/**
 * A table-driven QMP conformance test: drivetap's argument members, replies and events against the
 * shapes recorded from QEMU 7.2's QAPI schema in qmp-expected.ts (never against drivetap's own
 * output). Every member QEMU does not have must be drivetap's extension, named x-...
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { QmpError } from "../../src/qmp/errors.js";
import { jobEvent, MiB, serveWithQmp, statusEvent } from "../helpers/jobs.js";
import { DRIVETAP_STORAGE_DAEMON, QSD, startQsd } from "../helpers/qsd.js";
import { jobEventRecords, SchemaIndex, shapeProblems, type SchemaInfo } from "../helpers/qmp-shapes.js";
import {
  DRIVETAP_DRIVER_OPTIONS,
  QEMU_COMMAND_ARGS,
  QEMU_EVENTS,
  QEMU_JOB_SEQUENCES,
  QEMU_RETURNS,
  QSD_ERROR_SESSION,
  QSD_ERROR_SESSION_BLOCKDEV,
} from "./qmp-expected.js";

test("every argument of a command shared with QEMU is QEMU's, or drivetap's own named x-...", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const schema = new SchemaIndex((await d.qmp.execute("query-qmp-schema")) as SchemaInfo[]);
  const commands = new Set(
    ((await d.qmp.execute("query-commands")) as Array<{ name: string }>).map((c) => c.name),
  );
  const shared = Object.keys(QEMU_COMMAND_ARGS).filter((c) => commands.has(c));
  assert.ok(shared.length >= 35, `${shared.length} commands shared with QEMU`);
  const problems: string[] = [];
  for (const name of shared) {
    const qemu = new Set(QEMU_COMMAND_ARGS[name]);
    for (const m of schema.argMembers(name)) {
      const own =
        m.name.startsWith("x-") || (name === "blockdev-add" && DRIVETAP_DRIVER_OPTIONS.includes(m.name));
      if (!qemu.has(m.name) && !own) problems.push(`${name}: argument '${m.name}' is not QEMU's and not x-`);
    }
  }
  assert.deepEqual(problems, []);
});

test("replies and events of a session have QEMU's members and types; extras are x-", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 4 * MiB });
  const q = d.qmp;
  await q.execute("blockdev-add", { driver: "memory", "node-name": "tgt", size: 4 * MiB });
  await q.execute("block-dirty-bitmap-add", { node: "disk0", name: "bm" });
  await q.execute("blockdev-add", { driver: "memory", "node-name": "exp", size: 1 * MiB });
  await q.execute("block-export-add", { type: "nbd", id: "e1", "node-name": "exp", name: "exp" });
  await q.execute("blockdev-backup", {
    "job-id": "b",
    device: "disk0",
    target: "tgt",
    sync: "none",
    "auto-dismiss": false,
  });
  const problems: string[] = [];
  const check = async (command: string): Promise<void> => {
    const reply = await q.execute(command);
    if (Array.isArray(reply)) assert.ok(reply.length > 0, `${command} returned entries to check`);
    shapeProblems(reply, QEMU_RETURNS[command], command, problems);
  };
  for (const command of Object.keys(QEMU_RETURNS)) await check(command);
  await q.execute("block-job-cancel", { device: "b" });
  await q.waitForEvent(statusEvent("b", "concluded"));
  await check("query-block-jobs");
  await check("query-jobs");
  await q.execute("job-dismiss", { id: "b" });

  await q.execute("drive-backup", {
    "job-id": "f",
    device: "disk0",
    target: join(d.dir, "f.img"),
    sync: "full",
  });
  await q.waitForEvent(statusEvent("f", "null"));
  await q.execute("drive-mirror", {
    "job-id": "m",
    device: "disk0",
    target: join(d.dir, "m.img"),
    sync: "full",
  });
  await q.waitForEvent(jobEvent("m", "BLOCK_JOB_READY"));
  await q.execute("block-job-complete", { device: "m" });
  await q.waitForEvent(statusEvent("m", "null"));

  const seen = new Set<string>();
  for (const e of q.events) {
    const expected = QEMU_EVENTS[e.event];
    if (expected === undefined) continue;
    seen.add(e.event);
    shapeProblems(e.data, expected, e.event, problems);
  }
  assert.deepEqual(problems, []);
  for (const name of ["JOB_STATUS_CHANGE", "BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"]) {
    assert.ok(seen.has(name), `${name} was emitted and checked`);
  }

  const sequence = (id: string): string[] =>
    jobEventRecords(q.events as unknown as Record<string, unknown>[], id).map((r) =>
      r.what.replace(/^status:/, ""),
    );
  assert.deepEqual(sequence("f"), QEMU_JOB_SEQUENCES["backup, auto-finalize, auto-dismiss"]);
  assert.deepEqual(sequence("m"), QEMU_JOB_SEQUENCES["mirror, ready, completed"]);
  // auto-dismiss=false: null came at job-dismiss; the sequence is the same.
  assert.deepEqual(sequence("b"), QEMU_JOB_SEQUENCES["backup sync=none, cancelled"]);
});

test("query-blockstats with query-nodes: every node has QEMU's BlockStats, the raw node its file node as parent", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const stats = (await d.qmp.execute("query-blockstats", { "query-nodes": true })) as Array<
    Record<string, unknown>
  >;
  assert.deepEqual(shapeProblems(stats, QEMU_RETURNS["query-blockstats"], "query-blockstats"), []);
  const raw = stats.find((e) => e["node-name"] === "disk0") as { parent?: Record<string, unknown> };
  assert.equal(raw.parent?.["node-name"], "#block-disk0-file");
  assert.deepEqual(
    (raw.parent?.["driver-specific"] as { driver?: string } | undefined)?.driver,
    "file",
    "the file node's driver-specific stats are checked too",
  );
});

test("a session of bad and good arguments to the NBD server, create, resize, blockstats and authz commands gets QSD 7.2's replies", async (t) => {
  // The same command line for both; each replays the recorded session, so the table is QSD's own.
  const args = ["--blockdev", QSD_ERROR_SESSION_BLOCKDEV];
  for (const [who, command] of [
    ["qemu-storage-daemon", [QSD]],
    ["drivetap storage-daemon", DRIVETAP_STORAGE_DAEMON],
  ] as const) {
    const { qmp, dir } = await startQsd(t, args, command);
    const sock = join(dir, "nbd.sock");
    const problems: string[] = [];
    for (const [i, row] of QSD_ERROR_SESSION.entries()) {
      const rowArgs =
        row.args && JSON.parse(JSON.stringify(row.args).replaceAll('"SOCK"', JSON.stringify(sock)));
      let got: SessionReply;
      try {
        await qmp.execute(row.command, rowArgs);
        got = "ok";
      } catch (err) {
        if (!(err instanceof QmpError)) throw err;
        got = { class: err.errorClass, desc: err.message };
      }
      if (JSON.stringify(got) !== JSON.stringify(row.reply)) {
        problems.push(`#${i} ${row.command} ${JSON.stringify(row.args)}: ${JSON.stringify(got)}`);
      }
    }
    assert.deepEqual(problems, [], who);
  }
});

type SessionReply = (typeof QSD_ERROR_SESSION)[number]["reply"];
