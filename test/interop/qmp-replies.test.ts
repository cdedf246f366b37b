/**
 * QMP replies as QEMU 7.2's qemu-storage-daemon gives them (each expectation below was seen on the
 * installed QSD 7.2): the version in the greeting and query-version, the oob capability and exec-oob,
 * query-qmp-schema, and each job's event sequence per auto-finalize / auto-dismiss.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import * as net from "node:net";
import { join } from "node:path";
import { REPO_ROOT } from "../helpers/daemon.js";
import { jobEventLog, MiB, serveWithQmp, statusEvent } from "../helpers/jobs.js";
import { SchemaIndex, type SchemaInfo } from "../helpers/qmp-shapes.js";
import { RawQmp } from "../helpers/raw-qmp.js";
import { tempDir } from "../helpers/run.js";

const PACKAGE_VERSION = (
  JSON.parse(readFileSync(join(REPO_ROOT, "package.json"), "utf8")) as { version: string }
).version;
const VERSION = { qemu: { micro: 0, minor: 2, major: 7 }, package: `drivetap ${PACKAGE_VERSION}` };

async function raw(t: Parameters<typeof serveWithQmp>[0], path: string, negotiate: boolean): Promise<RawQmp> {
  const c = negotiate ? await RawQmp.ready(path) : await RawQmp.connect(path);
  t.after(() => c.destroy());
  return c;
}

test("the greeting and query-version name QEMU 7.2.0, whose QMP drivetap speaks, and drivetap in package", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const c = await raw(t, d.qmpPath, false);
  assert.deepEqual(
    c.take(() => true),
    { QMP: { version: VERSION, capabilities: ["oob"] } },
  );
  assert.deepEqual(await c.execute("qmp_capabilities"), { return: {} });
  assert.deepEqual(await c.execute("query-version"), { return: VERSION });
});

test("without the oob capability exec-oob is an unexpected member, before and after negotiation", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const c = await raw(t, d.qmpPath, false);
  c.take(() => true);
  const unexpected = { class: "GenericError", desc: "QMP input member 'exec-oob' is unexpected" };
  c.send({ "exec-oob": "query-version" });
  assert.deepEqual(await c.reply(), { error: unexpected });
  assert.deepEqual(await c.execute("qmp_capabilities"), { return: {} });
  c.send({ "exec-oob": "query-version", id: 1 });
  assert.deepEqual(await c.reply(), { id: 1, error: unexpected });
  assert.deepEqual(await c.execute("qmp_capabilities", { enable: ["oob"] }), {
    error: {
      class: "CommandNotFound",
      desc: "Capabilities negotiation is already complete, command ignored",
    },
  });
});

test("with oob enabled, exec-oob is answered ahead of a blocked in-band command, with QEMU's errors", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  // An NBD server that accepts and never speaks: blockdev-add waits in its handshake.
  const dir = tempDir(t, "drivetap-oob-");
  const silentPath = join(dir, "silent.sock");
  const held: net.Socket[] = [];
  const accepted = new Promise<void>((resolve) => {
    const silent = net.createServer((s) => {
      held.push(s);
      resolve();
    });
    silent.listen(silentPath);
    t.after(() => {
      for (const s of held) s.destroy();
      silent.close();
    });
  });
  const c = await raw(t, d.qmpPath, false);
  c.take(() => true);
  assert.deepEqual(await c.execute("qmp_capabilities", { enable: ["oob"] }), { return: {} });

  c.send({
    execute: "blockdev-add",
    // It gives up after open-timeout seconds, well after the OOB exchange below (milliseconds).
    arguments: {
      driver: "nbd",
      "node-name": "r",
      server: { type: "unix", path: silentPath },
      export: "",
      "open-timeout": 2,
    },
    id: "in-band",
  });
  await accepted;
  const oobReplies: unknown[] = [];
  for (const [request, reply] of [
    [
      { "exec-oob": "query-version", id: 1 },
      { id: 1, error: { class: "GenericError", desc: "The command query-version does not support OOB" } },
    ],
    [
      { "exec-oob": "no-such-command", id: 2 },
      { id: 2, error: { class: "CommandNotFound", desc: "The command no-such-command has not been found" } },
    ],
    [
      { "exec-oob": 5, id: 4 },
      { id: 4, error: { class: "GenericError", desc: "QMP input member 'exec-oob' must be a string" } },
    ],
  ] as const) {
    c.send(request);
    oobReplies.push([await c.reply(), reply]);
  }
  for (const [got, want] of oobReplies as Array<[unknown, unknown]>) assert.deepEqual(got, want);
  assert.equal(
    c.messages.filter((m) => m.id === "in-band").length,
    0,
    "the in-band blockdev-add is still waiting: every OOB reply overtook it",
  );
  for (const s of held) s.destroy();
  const inBand = await c.next((m) => m.id === "in-band", "the blockdev-add reply");
  assert.ok("error" in inBand, `the handshake failed: ${JSON.stringify(inBand)}`);
  // exec-oob with execute is in band (QEMU's qmp_is_oob), refused there.
  c.send({ "exec-oob": "query-version", execute: "query-version", id: 3 });
  assert.deepEqual(await c.reply(), {
    id: 3,
    error: { class: "GenericError", desc: "QMP input member 'execute' clashes with 'exec-oob'" },
  });
  // QEMU 7.2 asks no id of in-band commands even with oob on.
  assert.deepEqual(await c.execute("query-version"), { return: VERSION });
});

test("query-qmp-schema lists every command with its arguments, in QEMU's SchemaInfo form", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 1 * MiB });
  const c = await raw(t, d.qmpPath, true);
  const schema = new SchemaIndex((await c.execute("query-qmp-schema")).return as SchemaInfo[]);
  const commands = ((await c.execute("query-commands")).return as Array<{ name: string }>).map((x) => x.name);
  assert.ok(commands.includes("query-qmp-schema") && commands.length > 40, `${commands.length} commands`);

  for (const name of commands) {
    const e = schema.entry(name);
    assert.equal(e["meta-type"], "command", name);
    const members = schema.argMembers(name);
    schema.entry(e["ret-type"] as string);
    // The schema is the validator's: the first required member is the one the server says is missing.
    const required = members.find((m) => !("default" in m));
    if (required === undefined || name === "qmp_capabilities") continue;
    const reply = await c.execute(name, {});
    assert.deepEqual(
      reply,
      { error: { class: "GenericError", desc: `Parameter '${required.name}' is missing` } },
      `${name} with no arguments`,
    );
    // And a member the schema does not list is refused.
    const args: Record<string, unknown> = { "x-not-in-schema": 1 };
    assert.ok(!members.some((m) => m.name === "x-not-in-schema"));
    assert.match(JSON.stringify(await c.execute(name, args)), /is missing|is unexpected/, name);
  }

  // Type names are masked as numbers, builtins keep theirs, as QEMU does.
  for (const e of schema.entries) {
    if (e["meta-type"] === "builtin")
      assert.ok(["str", "int", "number", "bool", "any", "null"].includes(e.name));
    else if (e["meta-type"] === "array") assert.match(e.name, /^\[.+\]$/);
    else if (e["meta-type"] !== "command" && e["meta-type"] !== "event")
      assert.match(e.name, /^\d+$/, e.name);
  }
  assert.deepEqual(schema.entry("str"), { name: "str", "meta-type": "builtin", "json-type": "string" });

  // What a QMP library asks before it sends an option.
  assert.ok(schema.accepts("blockdev-add", "filename"));
  assert.ok(schema.accepts("blockdev-add", "size"));
  assert.ok(!schema.accepts("blockdev-add", "no-such-option"));
  assert.ok(schema.enumValues("blockdev-backup", "sync").includes("incremental"));
  assert.deepEqual(schema.enumValues("blockdev-backup", "on-target-error"), [
    "report",
    "ignore",
    "stop",
    "enospc",
  ]);
  assert.ok(schema.accepts("transaction", "actions.type"));
  assert.equal(schema.typeAt("blockdev-backup", "device")?.name, "str");
  assert.equal(schema.typeAt("block-job-set-speed", "speed")?.name, "int");
  assert.deepEqual(
    schema
      .argMembers("blockdev-backup")
      .filter((m) => !("default" in m))
      .map((m) => m.name),
    ["device", "sync", "target"],
  );
  const version = schema.entry(schema.entry("query-version")["ret-type"] as string);
  assert.deepEqual(
    (version.members as Array<{ name: string }>).map((m) => m.name),
    ["qemu", "package"],
  );
  // The no-argument commands share one empty object type, also their empty return.
  assert.equal(schema.entry("query-jobs")["arg-type"], schema.entry("job-dismiss")["ret-type"]);

  // Events drivetap emits are there too, with their data.
  assert.equal(schema.entry("JOB_STATUS_CHANGE")["meta-type"], "event");
  assert.ok(schema.enumValues("JOB_STATUS_CHANGE", "status").includes("concluded"));
  assert.deepEqual(
    schema.argMembers("BLOCK_JOB_COMPLETED").map((m) => m.name),
    ["type", "device", "len", "offset", "speed", "error"],
  );
  for (const ev of ["BLOCK_JOB_READY", "BLOCK_JOB_PENDING", "BLOCK_JOB_CANCELLED", "BLOCK_JOB_ERROR"]) {
    assert.equal(schema.entry(ev)["meta-type"], "event", ev);
  }
});

test("job events per auto-finalize and auto-dismiss are QEMU's: BLOCK_JOB_PENDING only without auto-finalize", async (t) => {
  const d = await serveWithQmp(t, { sizeBytes: 2 * MiB });
  for (const autoFinalize of [true, false]) {
    for (const autoDismiss of [true, false]) {
      const id = `j-${autoFinalize}-${autoDismiss}`;
      await d.qmp.execute("drive-backup", {
        "job-id": id,
        device: "disk0",
        target: join(d.dir, `${id}.img`),
        sync: "full",
        "auto-finalize": autoFinalize,
        "auto-dismiss": autoDismiss,
      });
      if (!autoFinalize) {
        await d.qmp.waitForEvent((e) => e.event === "BLOCK_JOB_PENDING" && e.data.id === id);
        await d.qmp.execute("job-finalize", { id });
      }
      await d.qmp.waitForEvent(statusEvent(id, "concluded"));
      if (!autoDismiss) await d.qmp.execute("job-dismiss", { id });
      await d.qmp.waitForEvent(statusEvent(id, "null"));
      const expected = [
        "created",
        "running",
        "waiting",
        "pending",
        ...(autoFinalize ? [] : ["BLOCK_JOB_PENDING"]),
        "BLOCK_JOB_COMPLETED",
        "concluded",
        "null",
      ];
      assert.deepEqual(jobEventLog(d.qmp, id), expected, id);
    }
  }
});
