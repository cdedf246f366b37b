/**
 * The same QMP session against the installed qemu-storage-daemon 7.2 and against drivetap: nodes, an
 * export, a backup job with its events, query commands and error cases. Replies are compared by shape
 * (member names and JSON types; drivetap's x- members left out) and error class, events by name and
 * data member types, never by values that legitimately differ (sizes, names QEMU generates).
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { makeImage, startDaemon, stopAfter } from "../helpers/daemon.js";
import { jobEventRecords, jsonType } from "../helpers/qmp-shapes.js";
import { RawQmp, type QmpMessage } from "../helpers/raw-qmp.js";
import { startQsdProcess } from "../helpers/qsd.js";
import { tempDir } from "../helpers/run.js";

const DISK_BYTES = 4 * 1024 * 1024;

/** Member names and JSON types, recursively; arrays by their first element; x- members dropped. */
function shape(value: unknown): unknown {
  if (Array.isArray(value)) return value.length === 0 ? [] : [shape(value[0])];
  if (jsonType(value) !== "object") return jsonType(value);
  const out: Record<string, unknown> = {};
  for (const key of Object.keys(value as object).sort()) {
    if (!key.startsWith("x-")) out[key] = shape((value as Record<string, unknown>)[key]);
  }
  return out;
}

/** A reply reduced to what both servers must agree on. */
function replyShape(m: QmpMessage): unknown {
  if ("error" in m) return { error: (m.error as { class: string }).class };
  return { return: shape(m.return) };
}

interface Session {
  readonly replies: Array<{ step: string; shape: unknown }>;
  readonly events: QmpMessage[];
}

/** Runs the session on a negotiated client; `dir` holds the images. */
async function runSession(c: RawQmp, dir: string, setupExport: () => Promise<void>): Promise<Session> {
  const replies: Session["replies"] = [];
  const events: QmpMessage[] = [];
  const step = async (name: string, args?: Record<string, unknown>): Promise<QmpMessage> => {
    const reply = await c.execute(name, args);
    // Named by position and command: the arguments hold paths that differ between the two runs.
    replies.push({ step: `${replies.length} ${name}`, shape: replyShape(reply) });
    return reply;
  };
  const source = makeImage(join(dir, "s.img"), DISK_BYTES);
  const target = makeImage(join(dir, "t.img"), DISK_BYTES);
  await step("blockdev-add", { driver: "raw", "node-name": "s", file: { driver: "file", filename: source } });
  await step("blockdev-add", { driver: "raw", "node-name": "t", file: { driver: "file", filename: target } });
  await setupExport();
  await step("block-export-add", { type: "nbd", id: "e", "node-name": "s", name: "s" });
  await step("query-block-exports");
  await step("query-version");
  await step("blockdev-backup", {
    "job-id": "j",
    device: "s",
    target: "t",
    sync: "full",
    "auto-dismiss": false,
  });
  await c.seen(
    (m) => m.event === "JOB_STATUS_CHANGE" && (m.data as { status: string }).status === "concluded",
    "job j concluded",
  );
  await step("query-block-jobs");
  await step("query-jobs");
  await step("job-dismiss", { id: "j" });
  await step("query-block-jobs");
  // Error cases: the class must match.
  await step("blockdev-del", { "node-name": "no-such-node" });
  await step("block-job-cancel", { device: "no-such-job" });
  await step("job-finalize", { id: "no-such-job" });
  await step("blockdev-backup", { "job-id": "k", device: "s", sync: "full" });
  await step("blockdev-backup", { "job-id": "k", device: "no-such-node", target: "t", sync: "full" });
  await step("no-such-command");
  await step("qmp_capabilities");
  await step("block-export-del", { id: "e" });
  // Every event the session caused has arrived before the replies after it.
  events.push(...c.messages.filter((m) => "event" in m));
  return { replies, events };
}

test("the same QMP session gets replies and events of the same shapes from qemu-storage-daemon and drivetap", async (t) => {
  const { socket: qsdQmp, dir: qsdDir } = await startQsdProcess(t);
  const qsd = await RawQmp.ready(qsdQmp);
  t.after(() => qsd.destroy());
  const qsdNbd = join(qsdDir, "nbd.sock");
  const fromQsd = await runSession(qsd, qsdDir, async () => {
    const r = await qsd.execute("nbd-server-start", { addr: { type: "unix", data: { path: qsdNbd } } });
    assert.deepEqual(r, { return: {} });
  });

  const dtDir = tempDir(t, "drivetap-cmp-");
  const dtQmp = join(dtDir, "qmp.sock");
  // drivetap's NBD server is the one `serve` listens on.
  const daemon = await startDaemon({ args: ["--qmp", dtQmp] });
  stopAfter(t, daemon);
  const dt = await RawQmp.ready(dtQmp);
  t.after(() => dt.destroy());
  const fromDrivetap = await runSession(dt, dtDir, async () => {});

  assert.deepEqual(
    fromDrivetap.replies,
    fromQsd.replies,
    "each step's reply: return shape or error class as qemu-storage-daemon's",
  );
  assert.deepEqual(
    jobEventRecords(fromDrivetap.events, "j"),
    jobEventRecords(fromQsd.events, "j"),
    "job j's events: names, order and data member types as qemu-storage-daemon's",
  );
  assert.ok(jobEventRecords(fromQsd.events, "j").length >= 7, "the job's events were recorded");
});
