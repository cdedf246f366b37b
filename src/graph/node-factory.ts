/**
 * Opens block nodes from blockdev-add options (QEMU's shapes): file, raw over a file child (inline
 * options or a node name), memory, null-co, journal, nbd (a remote export, optionally over TLS with
 * `tls-creds` naming an object-add'ed credentials object), qcow2 (over a file child, with its backing
 * chain), throttle (a filter that names an object-add'ed throttle group) and the error-inject test
 * filter.
 */
import * as fs from "node:fs";
import type { BlockDriver } from "../block/driver.js";
import { FileDriver, fileIdAt } from "../block/drivers/file.js";
import { engineForAio, type AioOption, type IoEngine } from "../block/drivers/io-engine/index.js";
import { ImageLockError, imagePermissions, type ImagePermissions } from "../block/drivers/image-lock.js";
import { JournalDriver } from "../block/drivers/journal.js";
import { MemoryDriver } from "../block/drivers/memory.js";
import { NullDriver } from "../block/drivers/null.js";
import {
  openQcow2Over,
  probeFormat,
  probedBackingMessage,
  type ImageFormat,
} from "../block/drivers/qcow2/image.js";
import { ProbedRawGuard } from "../block/filters/probed-raw.js";
import type { RepairSummary } from "../block/drivers/qcow2/check.js";
import type { ClientTls, ServerAddress } from "../nbd/client/connection.js";
import { NbdDriver } from "../nbd/client/nbd-driver.js";
import { ErrorInjectDriver } from "../block/filters/error-inject.js";
import { FilterDriver } from "../block/filters/filter.js";
import { ThrottleDriver } from "../block/filters/throttle.js";
import { GiB } from "../core/units.js";
import { BlockNode } from "../io/block-node.js";
import type { BlockGraph, NodeInfo } from "./block-graph.js";
import { ObjectError } from "./objects.js";
import type { ThrottleGroupObject } from "./throttle-group-object.js";

export const NODE_NAME_PATTERN = /^[A-Za-z][A-Za-z0-9_.-]{0,127}$/;
export const DEFAULT_VIRTUAL_SIZE = 1 * GiB;

export class NodeOptionError extends Error {}

export type BlockdevOptions = Record<string, unknown>;

interface Opened {
  readonly driver: BlockDriver;
  readonly info: NodeInfo;
}

function str(o: BlockdevOptions, key: string, where: string): string {
  const v = o[key];
  if (typeof v !== "string") throw new NodeOptionError(`Parameter '${where}${key}' is missing`);
  return v;
}

function size(o: BlockdevOptions, where: string): number {
  const v = o.size;
  if (v === undefined) return DEFAULT_VIRTUAL_SIZE;
  if (typeof v !== "number" || !Number.isSafeInteger(v) || v < 0) {
    throw new NodeOptionError(`Invalid parameter type for '${where}size', expected: integer`);
  }
  return v;
}

function flag(o: BlockdevOptions, key: string, where: string): boolean {
  const v = o[key];
  if (v === undefined) return false;
  if (typeof v !== "boolean") {
    throw new NodeOptionError(`Invalid parameter type for '${where}${key}', expected: boolean`);
  }
  return v;
}

/**
 * Opens a file-backed driver only if no node of the graph has that file open in a conflicting way
 * (checked by device and inode before the open, so nothing is created, truncated or written, and
 * again on the descriptor after it, in case the path changed meanwhile). The open itself takes the
 * image locks, which keep other processes out.
 */
function openChecked<D extends BlockDriver & { readonly fileId: string }>(
  graph: BlockGraph,
  filename: string,
  want: ImagePermissions,
  openDriver: () => D,
): D {
  const before = fileIdAt(filename);
  try {
    if (before !== undefined) graph.checkFileOpen(before, want, filename);
  } catch (err) {
    throw new NodeOptionError((err as Error).message);
  }
  let driver: D;
  try {
    driver = openDriver();
  } catch (err) {
    if (err instanceof ImageLockError)
      throw new NodeOptionError(`Could not open '${filename}': ${err.message}`);
    throw err;
  }
  if (driver.fileId !== before) {
    try {
      graph.checkFileOpen(driver.fileId, want, filename);
    } catch (err) {
      void driver.close();
      throw new NodeOptionError((err as Error).message);
    }
  }
  return driver;
}

/**
 * Makes node `child` the child of `parent`: claimed alone (nobody else may use it meanwhile), and its
 * driver is what the parent calls, so the parent's requests skip the child's node. A read-only child
 * stays read-only.
 */
function claimChild(graph: BlockGraph, child: string, parent: string, readOnly: boolean): BlockDriver {
  const node = graph.getNode(child);
  if (!node) throw new NodeOptionError(`Cannot find device='' nor node-name='${child}'`);
  if (node.readOnly && !readOnly) throw new NodeOptionError(`Block node '${child}' is read-only`);
  try {
    graph.claim(child, `node:${parent}`, `child of ${parent}`, true);
  } catch (err) {
    throw new NodeOptionError((err as Error).message);
  }
  return node.driver;
}

/**
 * The format node over the existing node `child`, as `blockdev-add {"driver": FORMAT, "file": CHILD}`
 * makes it: the child is claimed and its bitmaps move to the new node (graph.addNode). `drivetap
 * serve` builds its file + format pair (QSD's layout) with it. `format` undefined probes the child and
 * reports the guess through `onProbe` (QEMU warns about probing); a probed raw image refuses writes
 * that would make it probe as another format next time (probed-raw.ts). A qcow2 node opens the
 * backing chain its header names. `name` is not checked against NODE_NAME_PATTERN: the caller vouches.
 */
export async function addFormatOverNode(
  graph: BlockGraph,
  name: string,
  child: string,
  readOnly: boolean,
  format: ImageFormat | undefined,
  onProbe?: (path: string, format: ImageFormat) => void,
): Promise<BlockNode> {
  if (graph.getNode(name)) throw new NodeOptionError(`Duplicate nodes with node-name='${name}'`);
  const filename = graph.nodeInfo(child)?.filename;
  const next = claimChild(graph, child, name, readOnly);
  try {
    let chosen = format;
    if (chosen === undefined) {
      chosen = await probeFormat(next);
      if (filename !== undefined) onProbe?.(filename, chosen);
    }
    let driver: BlockDriver;
    if (chosen === "raw") {
      const raw = new FilterDriver("raw", next, false);
      driver = format === undefined ? new ProbedRawGuard(raw) : raw;
    } else {
      driver = await openQcow2Over(next, filename, {
        readOnly,
        ownsFile: false,
        onProbe,
        onRepair: logRepair(graph, filename ?? child),
      });
    }
    const node = new BlockNode(name, driver, { readOnly });
    graph.addNode(node, { driver: chosen, child, filename });
    return node;
  } catch (err) {
    graph.release(child, `node:${name}`);
    throw err;
  }
}

/** Logs what the open-time repair of a crash-dirty lazy-refcount image found, as QEMU reports it. */
function logRepair(graph: BlockGraph, image: string): (summary: RepairSummary) => void {
  return (s) =>
    graph.log.warn(
      { image, ...s },
      `qcow2: '${image}' was not closed cleanly (lazy refcounts): refcounts rebuilt, ` +
        `${s.refcountErrors} refcount error(s) and ${s.leaks} leaked cluster(s) fixed`,
    );
}

/** Options a parent passes down to the file it opens inline (raw's force-share reaches its file). */
interface Inherited {
  readonly forceShare: boolean;
}

/**
 * The `file` child of a format or filter node: a node name (claimed as the parent's child; the
 * parent writes to its driver directly, so a read-only child stays read-only) or inline options.
 */
function openChild(
  graph: BlockGraph,
  o: BlockdevOptions,
  readOnly: boolean,
  where: string,
  parent: string,
  inherited: Inherited,
  driver: string,
): { next: BlockDriver; info: NodeInfo; owns: boolean } {
  const child = o.file;
  if (typeof child === "string") {
    return {
      next: claimChild(graph, child, parent, readOnly),
      owns: false,
      info: { driver, child, filename: graph.nodeInfo(child)?.filename },
    };
  }
  if (child && typeof child === "object") {
    const inner = open(graph, child as BlockdevOptions, readOnly, `${where}file.`, parent, {
      forceShare: flag(o, "force-share", where) || inherited.forceShare,
    });
    return { next: inner.driver, owns: true, info: { driver, filename: inner.info.filename } };
  }
  throw new NodeOptionError(`Parameter '${where}file' is missing`);
}

/** QEMU's cache.direct (a `cache` dict); drivetap keeps the page cache either way. */
function cacheDirect(o: BlockdevOptions): boolean {
  const cache = o.cache;
  return typeof cache === "object" && cache !== null && (cache as { direct?: unknown }).direct === true;
}

/** The file node's I/O engine from QEMU's `aio` (io-engine/index.ts has the mapping). */
function fileEngine(o: BlockdevOptions): IoEngine {
  try {
    return engineForAio(o.aio as AioOption | undefined, cacheDirect(o));
  } catch (err) {
    throw new NodeOptionError((err as Error).message);
  }
}

/** Opens the driver stack described by `o`; `nodeName` names the node for messages and claims. */
function open(
  graph: BlockGraph,
  o: BlockdevOptions,
  readOnly: boolean,
  where: string,
  parent: string,
  inherited: Inherited = { forceShare: false },
): Opened {
  const driver = str(o, "driver", where);
  switch (driver) {
    case "file": {
      const filename = str(o, "filename", where);
      if (!fs.existsSync(filename))
        throw new NodeOptionError(`Could not open '${filename}': No such file or directory`);
      const forceShare = flag(o, "force-share", where) || inherited.forceShare;
      if (forceShare && !readOnly) {
        throw new NodeOptionError("force-share=on can only be used with read-only images");
      }
      const want = imagePermissions({ readOnly, forceShare });
      const engine = fileEngine(o);
      const driver = openChecked(graph, filename, want, () =>
        FileDriver.open(filename, { readOnly, forceShare, engine }),
      );
      return { driver, info: { driver: "file", filename } };
    }
    case "journal": {
      // A write-only stream target that records every write (block/drivers/journal.ts).
      const filename = str(o, "filename", where);
      const data = o.data === undefined ? undefined : o.data === true;
      const sizeBytes = o.size === undefined ? undefined : size(o, where);
      const want = imagePermissions({ readOnly: false, resize: true });
      const driver = openChecked(graph, filename, want, () =>
        // Without size, a new journal waits unsized for the stream job that gives it its source's.
        JournalDriver.open(filename, { data, size: sizeBytes, deferSize: true }),
      );
      return { driver, info: { driver: "journal", filename } };
    }
    case "memory":
      return { driver: new MemoryDriver(size(o, where)), info: { driver: "memory" } };
    case "null-co":
      return { driver: new NullDriver(size(o, where)), info: { driver: "null-co" } };
    case "raw":
    case "error-inject":
    case "throttle": {
      // The group is looked up before the child is opened or claimed, so a bad name leaves nothing behind.
      let group: ThrottleGroupObject | undefined;
      if (driver === "throttle") {
        const groupId = str(o, "throttle-group", where);
        try {
          group = graph.objects.throttleGroup(groupId);
        } catch (err) {
          if (err instanceof ObjectError) throw new NodeOptionError(err.message);
          throw err;
        }
      }
      const { next, info, owns } = openChild(graph, o, readOnly, where, parent, inherited, driver);
      if (driver === "raw") return { driver: new FilterDriver("raw", next, owns), info };
      if (group) {
        // Nothing below can fail: the node is added right after this returns (open() is synchronous).
        graph.objects.claim(group.id, `node:${parent}`, `node ${parent}`);
        return {
          driver: new ThrottleDriver(next, group.group, parent, owns),
          info: { ...info, throttleGroup: group.id },
        };
      }
      const settings = {
        failReads: o["fail-reads"] === true,
        failWrites: o["fail-writes"] === true,
        failFlush: o["fail-flush"] === true,
      };
      return { driver: new ErrorInjectDriver(next, settings, owns), info };
    }
    default:
      throw new NodeOptionError(`Parameter 'driver' does not accept value '${driver}'`);
  }
}

/**
 * blockdev-add driver=qcow2: the format driver over its `file` child. `backing` absent opens the
 * chain the header names (read-only, locked); null opens none; a node name uses that node (held as
 * the backing of this one); inline options open a node-less backing driver.
 */
async function openQcow2(
  graph: BlockGraph,
  o: BlockdevOptions,
  readOnly: boolean,
  where: string,
  parent: string,
): Promise<Opened> {
  const { next, info, owns } = openChild(graph, o, readOnly, where, parent, { forceShare: false }, "qcow2");
  const release: Array<() => void | Promise<void>> = [];
  if (owns) release.push(() => next.close());
  else release.push(() => graph.release(info.child!, `node:${parent}`));
  try {
    let backing: BlockDriver | null | undefined;
    let backingNode: string | undefined;
    const b = o.backing;
    if (b === null) backing = null;
    else if (typeof b === "string") {
      const node = graph.getNode(b);
      if (!node) throw new NodeOptionError(`Cannot find device='' nor node-name='${b}'`);
      try {
        graph.claim(b, `backing:${parent}`, `backing of ${parent}`);
      } catch (err) {
        throw new NodeOptionError((err as Error).message);
      }
      release.push(() => graph.release(b, `backing:${parent}`));
      backing = node.driver;
      backingNode = b;
    } else if (b && typeof b === "object") {
      const inner = await openAny(graph, b as BlockdevOptions, true, `${where}backing.`, parent);
      release.push(() => inner.driver.close());
      backing = inner.driver;
    } else if (b !== undefined) {
      throw new NodeOptionError(`Invalid parameter type for '${where}backing', expected: string or null`);
    }
    const driver = await openQcow2Over(next, info.filename, {
      readOnly,
      backing,
      ownsFile: owns,
      onProbe: (path, format) => graph.log.warn({ path, format }, probedBackingMessage(path, format)),
      onRepair: logRepair(graph, info.filename ?? info.child ?? parent),
    });
    return { driver, info: { ...info, backing: backingNode } };
  } catch (err) {
    for (const r of release.reverse()) await r();
    if (err instanceof NodeOptionError) throw err;
    throw new NodeOptionError(`Could not open '${info.filename ?? info.child}': ${(err as Error).message}`);
  }
}

/** Any driver stack: qcow2 opens asynchronously (it reads its header), the others synchronously. */
async function openAny(
  graph: BlockGraph,
  o: BlockdevOptions,
  readOnly: boolean,
  where: string,
  parent: string,
): Promise<Opened> {
  if (o.driver === "qcow2") return openQcow2(graph, o, readOnly, where, parent);
  return open(graph, o, readOnly, where, parent);
}

/** Seconds from a QMP option, as milliseconds. */
function seconds(o: BlockdevOptions, key: string, fallbackS: number): number {
  const v = o[key];
  if (v === undefined) return fallbackS * 1000;
  if (typeof v !== "number" || !Number.isFinite(v) || v < 0 || v > 86400) {
    throw new NodeOptionError(`Parameter '${key}' expects a number of seconds from 0 to 86400`);
  }
  return Math.round(v * 1000);
}

/** The nbd driver's `server` option (QEMU's SocketAddress: unix or inet). */
function serverAddress(o: BlockdevOptions): ServerAddress {
  const s = o.server as Record<string, unknown> | undefined;
  if (!s || typeof s !== "object") throw new NodeOptionError("Parameter 'server' is missing");
  if (s.type === "unix") {
    if (typeof s.path !== "string") throw new NodeOptionError("Parameter 'server.path' is missing");
    return { type: "unix", path: s.path };
  }
  if (s.type === "inet") {
    if (typeof s.host !== "string") throw new NodeOptionError("Parameter 'server.host' is missing");
    const port = Number(s.port ?? 10809);
    if (!Number.isInteger(port) || port < 1 || port > 65535) {
      throw new NodeOptionError(`Parameter 'server.port' expects a port number, not '${String(s.port)}'`);
    }
    return { type: "inet", host: s.host, port };
  }
  throw new NodeOptionError("Parameter 'server.type' should be 'unix' or 'inet'");
}

/**
 * The remote driver: connects before the node exists, so blockdev-add fails if the server is down
 * or the TLS handshake fails. With `tls-creds`, the node holds the object (object-del refuses) from
 * here on; the caller releases it if the node is not added after all.
 */
async function openNbd(graph: BlockGraph, o: BlockdevOptions, nodeName: string): Promise<Opened> {
  const server = serverAddress(o);
  const exportName = o.export === undefined ? "" : o.export;
  if (typeof exportName !== "string") throw new NodeOptionError("Parameter 'export' expects a string");
  const credsId = o["tls-creds"];
  const hostnameOption = o["tls-hostname"];
  if (credsId !== undefined && typeof credsId !== "string") {
    throw new NodeOptionError("Invalid parameter type for 'tls-creds', expected: string");
  }
  if (hostnameOption !== undefined && typeof hostnameOption !== "string") {
    throw new NodeOptionError("Invalid parameter type for 'tls-hostname', expected: string");
  }
  let tls: ClientTls | undefined;
  if (credsId !== undefined) {
    try {
      const object = graph.objects.tlsCreds(credsId, "client");
      // QEMU checks the certificate against tls-hostname, else the inet host; over a unix socket
      // without tls-hostname only the CA signature is checked.
      tls = {
        creds: object.creds,
        hostname: hostnameOption ?? (server.type === "inet" ? server.host : undefined),
      };
      graph.objects.claim(credsId, `node:${nodeName}`, `node ${nodeName}`);
    } catch (err) {
      if (err instanceof ObjectError) throw new NodeOptionError(err.message);
      throw err;
    }
  } else if (hostnameOption !== undefined) {
    throw new NodeOptionError("tls-hostname can only be used with tls-creds");
  }
  try {
    const driver = await NbdDriver.open({
      server,
      exportName,
      reconnectDelayMs: seconds(o, "reconnect-delay", 0),
      requestTimeoutMs: seconds(o, "x-request-timeout", 5),
      openTimeoutMs: seconds(o, "open-timeout", 10),
      tls,
      log: graph.log,
    });
    const where = server.type === "unix" ? `unix:${server.path}` : `${server.host}:${server.port}`;
    const scheme = tls ? "nbds" : "nbd";
    return {
      driver,
      info: {
        driver: "nbd",
        filename: `${scheme}+${where}/${exportName}`,
        tlsCreds: credsId as string | undefined,
      },
    };
  } catch (err) {
    if (credsId !== undefined) graph.objects.release(credsId, `node:${nodeName}`);
    throw new NodeOptionError(`Failed to connect to the NBD server: ${(err as Error).message}`);
  }
}

/** blockdev-add: opens the node and registers it in the graph. */
export async function addNodeFromOptions(graph: BlockGraph, o: BlockdevOptions): Promise<BlockNode> {
  const name = o["node-name"];
  if (typeof name !== "string") throw new NodeOptionError("Parameter 'node-name' is missing");
  if (!NODE_NAME_PATTERN.test(name)) throw new NodeOptionError(`Invalid node-name: '${name}'`);
  if (graph.getNode(name)) throw new NodeOptionError(`Duplicate nodes with node-name='${name}'`);
  let readOnly = o["read-only"] === true;
  const { driver, info } =
    o.driver === "nbd" ? await openNbd(graph, o, name) : await openAny(graph, o, readOnly, "", name);
  if (driver instanceof NbdDriver && driver.readOnly) readOnly = true;
  // The connect was awaited: the name may have been taken meanwhile.
  if (graph.getNode(name)) {
    await driver.close();
    // The other node of that name may hold the same object under the same user id: keep its claim.
    if (info.tlsCreds !== undefined && graph.nodeInfo(name)?.tlsCreds !== info.tlsCreds) {
      graph.objects.release(info.tlsCreds, `node:${name}`);
    }
    throw new NodeOptionError(`Duplicate nodes with node-name='${name}'`);
  }
  const node = new BlockNode(name, driver, { readOnly });
  graph.addNode(node, info);
  return node;
}
