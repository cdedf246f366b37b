/**
 * Backing-chain commands with QEMU's names and texts: blockdev-snapshot (an overlay on top of a node),
 * block-stream (pull the chain into a node) and block-commit (merge a layer down into its base). The
 * chain and the node replacement rule are graph/chain.ts; the jobs are jobs/block-stream.ts and
 * jobs/commit.ts.
 */
import { Qcow2Driver } from "../../block/drivers/qcow2/qcow2.js";
import type { BlockGraph } from "../../graph/block-graph.js";
import {
  backingNameOf,
  backingChain,
  findFileInChain,
  relinkBacking,
  snapshotOnto,
  type ChainLayer,
} from "../../graph/chain.js";
import type { BlockNode } from "../../io/block-node.js";
import { BlockStreamJob } from "../../jobs/block-stream.js";
import { activeCommitJob, CommitJob } from "../../jobs/commit.js";
import type { ErrorAction, Job } from "../../jobs/job.js";
import { QmpError } from "../errors.js";
import { defineCommand, type QmpCommandDef } from "../server.js";
import { checkJobId } from "./job-start.js";

/** BlockdevOnError: QEMU's `auto` means the device's policy, and a job has none: report. */
const ON_ERROR = ["report", "ignore", "enospc", "stop", "auto"] as const;

/** The arguments block-stream and block-commit share, with QEMU's names. */
const CHAIN_JOB_ARGS = {
  "job-id": { type: "str", optional: true },
  device: { type: "str" },
  base: { type: "str", optional: true },
  "base-node": { type: "str", optional: true },
  "backing-file": { type: "str", optional: true },
  speed: { type: "int", min: 0, optional: true },
  "on-error": { type: "enum", values: ON_ERROR, optional: true },
  "filter-node-name": { type: "str", optional: true },
  "auto-finalize": { type: "bool", optional: true },
  "auto-dismiss": { type: "bool", optional: true },
} as const;

function onErrorAction(v: (typeof ON_ERROR)[number] | undefined): ErrorAction {
  return v === undefined || v === "auto" ? "report" : v;
}

function findNode(graph: BlockGraph, name: string): BlockNode {
  const node = graph.getNode(name);
  if (!node) throw new QmpError("GenericError", `Cannot find device='${name}' nor node-name='${name}'`);
  return node;
}

/** A job's op blocker on a node, with QEMU's text. */
function refuseJobUser(graph: BlockGraph, name: string): void {
  const jobs = graph.jobUsesOf(name);
  if (jobs.length > 0) throw new QmpError("GenericError", `Node '${name}' is busy: ${jobs.join(", ")}`);
}

/**
 * The users that cannot move to a replacement (graph/chain.ts): a qcow2 overlay (QEMU's text) or
 * another parent. Exports move.
 */
function refuseUnmovableUsers(graph: BlockGraph, name: string): void {
  const parent = graph.nodes().find((n) => graph.nodeInfo(n.name)?.backing === name);
  if (parent) {
    throw new QmpError(
      "GenericError",
      `Node '${name}' is busy: node is used as backing hd of '${parent.name}'`,
    );
  }
  const others = graph.usersOf(name).filter((why) => !why.startsWith("export "));
  if (others.length > 0) throw new QmpError("GenericError", `Node '${name}' is busy: ${others.join(", ")}`);
}

/** QEMU's checks in its order (external_snapshot_prepare, then bdrv_append's), then the move. */
async function blockdevSnapshot(graph: BlockGraph, nodeName: string, overlayName: string): Promise<void> {
  const node = findNode(graph, nodeName);
  refuseJobUser(graph, nodeName);
  const overlay = findNode(graph, overlayName);
  // QEMU's test is for a BlockBackend parent: an export or a job (a backing parent is not one).
  const served = graph.exports().some((e) => e.nodeName === overlayName);
  if (served || graph.jobUsesOf(overlayName).length > 0) {
    throw new QmpError("GenericError", "The overlay is already in use");
  }
  const driver = overlay.driver;
  if (driver instanceof Qcow2Driver && driver.backing !== null) {
    throw new QmpError("GenericError", "The overlay already has a backing image");
  }
  if (!(driver instanceof Qcow2Driver)) {
    throw new QmpError("GenericError", "The overlay does not support backing images");
  }
  if (overlay === node) {
    throw new QmpError("GenericError", `Making '${nodeName}' a backing image of itself would create a loop`);
  }
  refuseUnmovableUsers(graph, nodeName);
  if (overlay.readOnly && graph.exports().some((e) => e.nodeName === nodeName && e.writable)) {
    throw new QmpError("GenericError", `Block node '${overlayName}' is read-only`);
  }
  // The overlay's header names the node's image when it has one (a memory or NBD node has none:
  // the link then lives only in the running graph, as it does for every blockdev-snapshot in QEMU).
  const name = overlay.readOnly ? undefined : backingNameOf(backingChain(graph, nodeName)[0]);
  await snapshotOnto(graph, node, overlay, name);
}

/**
 * QSD has no device names, only nodes: a job needs an explicit id (QEMU derives one from a
 * BlockBackend's name, which a node does not have, and refuses the empty one).
 */
function requireJobId(graph: BlockGraph, jobId: string | undefined): string {
  checkJobId(graph, jobId ?? "");
  return jobId!;
}

/** Refuses layers a job of another already uses (QEMU's op blockers). */
function refuseJobUsers(graph: BlockGraph, layers: readonly ChainLayer[]): void {
  for (const l of layers) if (l.nodeName !== undefined) refuseJobUser(graph, l.nodeName);
}

/** The writable qcow2 image a job writes into or relinks (drivetap does not reopen read-only ones). */
function writableQcow2(layer: ChainLayer, what: string): Qcow2Driver {
  const d = layer.driver;
  if (!(d instanceof Qcow2Driver)) {
    throw new QmpError(
      "GenericError",
      `'${layer.nodeName ?? layer.filename}' does not support backing files`,
    );
  }
  if (d.readOnly) {
    throw new QmpError(
      "GenericError",
      `'${layer.nodeName ?? layer.filename}' is read-only, and ${what} must write it (drivetap does not reopen images read-write)`,
    );
  }
  return d;
}

/** What a relinked header names for the new backing: `backing-file`, else the base's own file. */
function headerNameFor(base: ChainLayer, backingFile: string | undefined) {
  const name = backingNameOf(base, backingFile);
  if (name === undefined) {
    throw new QmpError(
      "GenericError",
      `'${base.nodeName}' has no image file to name in the header: give 'backing-file'`,
    );
  }
  return name;
}

/** Claims the nodes among `layers` for job `id`; returns the release. */
function claimLayers(graph: BlockGraph, id: string, layers: readonly ChainLayer[], why: string): () => void {
  const claimed: string[] = [];
  const release = (): void => {
    for (const n of claimed) graph.release(n, `job:${id}`);
  };
  try {
    for (const l of layers) {
      if (l.nodeName === undefined) continue;
      graph.claim(l.nodeName, `job:${id}`, `block job ${id} (${why})`);
      claimed.push(l.nodeName);
    }
  } catch (err) {
    release();
    throw new QmpError("GenericError", (err as Error).message);
  }
  return release;
}

interface StreamArgs {
  "job-id"?: string;
  device: string;
  base?: string;
  "base-node"?: string;
  "backing-file"?: string;
  bottom?: string;
  speed?: number;
  "on-error"?: (typeof ON_ERROR)[number];
  "auto-finalize"?: boolean;
  "auto-dismiss"?: boolean;
}

/** block-stream, with qmp_block_stream's checks in its order. */
function blockStream(graph: BlockGraph, a: StreamArgs): void {
  const top = findNode(graph, a.device);
  if (a.base !== undefined && a["base-node"] !== undefined) {
    throw new QmpError("GenericError", "'base' and 'base-node' cannot be specified at the same time");
  }
  if (a.bottom !== undefined) {
    throw new QmpError("GenericError", "'bottom' is not supported: give 'base-node' (the node below it)");
  }
  const chain = backingChain(graph, a.device);
  let baseIndex: number | null = null;
  if (a.base !== undefined) {
    const i = findFileInChain(chain, a.base);
    if (i <= 0) throw new QmpError("GenericError", `Can't find '${a.base}' in the backing chain`);
    baseIndex = i;
  }
  const baseNode = a["base-node"];
  if (baseNode !== undefined) {
    if (!graph.getNode(baseNode)) {
      throw new QmpError("GenericError", `Cannot find device='' nor node-name='${baseNode}'`);
    }
    const i = chain.findIndex((l) => l.nodeName === baseNode);
    if (i <= 0)
      throw new QmpError("GenericError", `Node '${baseNode}' is not a backing image of '${a.device}'`);
    baseIndex = i;
  }
  if (baseIndex === null && a["backing-file"] !== undefined) {
    throw new QmpError("GenericError", "backing file specified, but streaming the entire chain");
  }
  const intermediates = chain.slice(1, baseIndex ?? chain.length);
  refuseJobUsers(graph, [chain[0], ...intermediates]);
  const jobId = requireJobId(graph, a["job-id"]);
  // A node without backing has nothing to stream: the job just completes, as in QEMU.
  const topDriver = chain.length > 1 ? writableQcow2(chain[0], "block-stream") : null;
  const name = baseIndex === null ? null : headerNameFor(chain[baseIndex], a["backing-file"]);
  const release = claimLayers(graph, jobId, [chain[0], ...intermediates], "stream");
  const job = new BlockStreamJob({
    id: jobId,
    top,
    topDriver,
    layers: topDriver ? intermediates.map((l) => l.driver) : [],
    speed: a.speed,
    onError: onErrorAction(a["on-error"]),
    autoFinalize: a["auto-finalize"],
    autoDismiss: a["auto-dismiss"],
    events: graph.events,
    log: graph.log,
    relink: async () => {
      // Relinked from the chain as it is now: nothing can have changed it, the job holds its nodes.
      if (topDriver) await relinkBacking(graph, top, backingChain(graph, a.device), 0, baseIndex, name);
    },
    release,
    onGone: (j) => graph.removeJob(j),
  });
  graph.addJob(job);
  job.start();
}

interface CommitArgs extends Omit<StreamArgs, "bottom"> {
  top?: string;
  "top-node"?: string;
}

/** A node no other node is layered on (QEMU's root: only exports and jobs above it). */
function isRoot(graph: BlockGraph, name: string): boolean {
  return !graph.nodes().some((n) => {
    const info = graph.nodeInfo(n.name);
    return info?.child === name || info?.backing === name;
  });
}

/** The base a job writes into: drivetap writes it through its node, so it must be a writable node. */
function writableBaseNode(graph: BlockGraph, base: ChainLayer, top: BlockNode): BlockNode {
  const node = base.nodeName === undefined ? undefined : graph.getNode(base.nodeName);
  if (!node) {
    throw new QmpError(
      "GenericError",
      `'${base.filename}' was opened read-only from its overlay's header; drivetap commits only into a base added with blockdev-add (named as 'backing')`,
    );
  }
  if (node.readOnly) throw new QmpError("GenericError", `Block node '${node.name}' is read-only`);
  if (node.size() !== top.size()) {
    throw new QmpError(
      "GenericError",
      `Base '${node.name}' has ${node.size()} bytes and the disk ${top.size()}: drivetap does not resize the base`,
    );
  }
  return node;
}

/** block-commit, with qmp_block_commit's checks in its order. */
function blockCommit(graph: BlockGraph, a: CommitArgs): void {
  const device = graph.getNode(a.device);
  if (!device) throw new QmpError("DeviceNotFound", `Device '${a.device}' not found`);
  if (!isRoot(graph, a.device)) throw new QmpError("GenericError", "Need a root block node");
  refuseJobUser(graph, a.device);
  const chain = backingChain(graph, a.device);
  if (a["top-node"] !== undefined && a.top !== undefined) {
    throw new QmpError("GenericError", "'top-node' and 'top' are mutually exclusive");
  }
  let topIndex = 0;
  const topNode = a["top-node"];
  if (topNode !== undefined) {
    if (!graph.getNode(topNode))
      throw new QmpError("GenericError", `Cannot find device='' nor node-name='${topNode}'`);
    topIndex = chain.findIndex((l) => l.nodeName === topNode);
    if (topIndex < 0) throw new QmpError("GenericError", `'${topNode}' is not in this backing file chain`);
  } else if (a.top !== undefined) {
    topIndex = findFileInChain(chain, a.top);
    if (topIndex < 0) throw new QmpError("GenericError", `Top image file ${a.top} not found`);
  }
  if (a["base-node"] !== undefined && a.base !== undefined) {
    throw new QmpError("GenericError", "'base-node' and 'base' are mutually exclusive");
  }
  let baseIndex = chain.length - 1;
  const baseNode = a["base-node"];
  if (baseNode !== undefined) {
    if (!graph.getNode(baseNode)) {
      throw new QmpError("GenericError", `Cannot find device='' nor node-name='${baseNode}'`);
    }
    baseIndex = chain.findIndex((l, i) => i >= topIndex && l.nodeName === baseNode);
    if (baseIndex < 0) throw new QmpError("GenericError", `'${baseNode}' is not in this backing file chain`);
  } else if (a.base !== undefined) {
    const i = findFileInChain(chain.slice(topIndex), a.base);
    if (i < 0) throw new QmpError("GenericError", `Can't find '${a.base}' in the backing chain`);
    baseIndex = topIndex + i;
  }
  refuseJobUsers(graph, chain.slice(topIndex, baseIndex + 1));
  if (topIndex === baseIndex) throw new QmpError("GenericError", "cannot commit an image into itself");
  const active = topIndex === 0;
  if (active && a["backing-file"] !== undefined) {
    throw new QmpError("GenericError", "'backing-file' specified, but 'top' is the active layer");
  }
  const jobId = requireJobId(graph, a["job-id"]);
  const base = writableBaseNode(graph, chain[baseIndex], device);
  const layers = chain.slice(topIndex, baseIndex);
  const common = {
    id: jobId,
    speed: a.speed,
    autoFinalize: a["auto-finalize"],
    autoDismiss: a["auto-dismiss"],
    events: graph.events,
    log: graph.log,
    onGone: (j: Job) => graph.removeJob(j),
  };
  const onError = onErrorAction(a["on-error"]);
  if (active) {
    const release = claimLayers(graph, jobId, chain.slice(0, baseIndex + 1), "commit");
    const job = activeCommitJob({
      ...common,
      source: device,
      target: base,
      layers: layers.map((l) => l.driver),
      onSourceError: onError,
      onTargetError: onError,
      // The exports serve the base from now on; the active layer stays in the graph, unused, as QEMU
      // leaves a node that blockdev-add made.
      pivot: async () => graph.pivotExports(device.name, base.name),
      release,
    });
    graph.addJob(job);
    job.start();
    return;
  }
  writableQcow2(chain[topIndex - 1], "block-commit");
  const name = headerNameFor(chain[baseIndex], a["backing-file"]);
  const release = claimLayers(graph, jobId, chain.slice(topIndex - 1, baseIndex + 1), "commit");
  const job = new CommitJob({
    ...common,
    top: chain[topIndex].driver,
    layers: layers.map((l) => l.driver),
    base,
    onError,
    relink: () => relinkBacking(graph, device, backingChain(graph, a.device), topIndex - 1, baseIndex, name),
    release,
  });
  graph.addJob(job);
  job.start();
}

export function chainCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "blockdev-snapshot",
      args: { node: { type: "str" }, overlay: { type: "str" } },
      handler: async (a) => {
        await blockdevSnapshot(graph, a.node, a.overlay);
        return {};
      },
    }),
    defineCommand({
      name: "block-stream",
      args: { ...CHAIN_JOB_ARGS, bottom: { type: "str", optional: true } },
      handler: (a) => {
        blockStream(graph, a);
        return {};
      },
    }),
    defineCommand({
      name: "block-commit",
      args: {
        ...CHAIN_JOB_ARGS,
        top: { type: "str", optional: true },
        "top-node": { type: "str", optional: true },
      },
      handler: (a) => {
        blockCommit(graph, a);
        return {};
      },
    }),
  ];
}
