/**
 * The graph: the registry of block nodes, NBD exports and jobs that commands act on. It knows who
 * uses a node (an export, a job, a parent node), so a node in use cannot be deleted or taken twice.
 * It also knows which file each node has open, by device and inode, so no second path, symlink or
 * hard link to a served image can be opened in a way that node does not allow.
 * QMP commands act on this graph, never on the daemon.
 */
import type { BlockDriver } from "../block/driver.js";
import { FileDriver, fileIdAt, type FileId } from "../block/drivers/file.js";
import { permissionConflict, type ImagePermissions } from "../block/drivers/image-lock.js";
import { JournalDriver } from "../block/drivers/journal.js";
import { Qcow2Driver } from "../block/drivers/qcow2/qcow2.js";
import { FilterDriver } from "../block/filters/filter.js";
import { BlockError } from "../core/errors.js";
import { EventBus } from "../core/events.js";
import { silentLogger, type Logger } from "../core/log.js";
import type { BlockNode } from "../io/block-node.js";
import { BitmapRegistry, type NamedBitmap } from "../io/named-bitmaps.js";
import { loadQcow2Bitmaps } from "../io/qcow2-bitmap-store.js";
import type { Job } from "../jobs/job.js";
import type { NbdServer } from "../nbd/server/server.js";
import { NbdService } from "./nbd-service.js";
import { ObjectRegistry } from "./objects.js";

/** A graph operation refused for a reason the user can fix (busy node, duplicate name). */
export class GraphError extends Error {}

export interface NodeInfo {
  /** Driver name as given to blockdev-add ("file", "raw", "memory", "null-co", ...). */
  readonly driver: string;
  readonly filename?: string;
  /** Name of a child node this one is layered on. */
  readonly child?: string;
  /** Name of the node a qcow2 node reads its unallocated clusters from (held while this one exists). */
  readonly backing?: string;
  /** The id of the TLS credentials object the node uses (nbd with tls-creds); held while it exists. */
  readonly tlsCreds?: string;
  /** The id of the throttle group a throttle node is a member of; held while the node exists. */
  readonly throttleGroup?: string;
}

interface NodeEntry {
  readonly node: BlockNode;
  /** Replaced only by setBackingNode (a qcow2 node's backing changes at runtime). */
  info: NodeInfo;
  /** user id -> why ("export e0", "block job backup0", "child of raw0") */
  readonly users: Map<string, string>;
  /** Internal nodes (a drive-backup target) are hidden from query-block. */
  readonly internal: boolean;
  /** A user holding the node alone (a job's target): nobody else may claim it meanwhile. */
  exclusive: string | null;
  /** The file the node's own driver stack has open, and what that open holds and shares. */
  readonly file: OpenFile | null;
}

interface OpenFile {
  readonly id: FileId;
  readonly permissions: ImagePermissions;
}

/** The file a driver stack opened itself (not through a child node, which is registered on its own). */
function openFileOf(driver: BlockDriver): OpenFile | null {
  if (driver instanceof FileDriver || driver instanceof JournalDriver) {
    return { id: driver.fileId, permissions: driver.permissions };
  }
  if (driver instanceof FilterDriver && driver.ownsNext) return openFileOf(driver.next);
  if (driver instanceof Qcow2Driver && driver.ownsFile) return openFileOf(driver.file);
  return null;
}

export interface ExportRecord {
  readonly id: string;
  readonly nodeName: string;
  readonly name: string;
  readonly writable: boolean;
  readonly description: string;
  /** Dirty bitmaps of the node offered as qemu:dirty-bitmap:NAME meta contexts (held busy). */
  readonly bitmaps?: readonly NamedBitmap[];
}

export class BlockGraph {
  readonly events = new EventBus();
  readonly log: Logger;
  readonly #nodes = new Map<string, NodeEntry>();
  readonly #exports = new Map<string, ExportRecord>();
  readonly #jobs = new Map<string, Job>();
  /** The NBD server, started and stopped while the daemon runs. */
  readonly nbd: NbdService;
  /** Exports being removed (their connections closing): still listed, as shutting down. */
  readonly #removing = new Map<string, Promise<void>>();
  /** Named dirty bitmaps of every node; persistent ones are loaded when their image is added. */
  readonly bitmaps: BitmapRegistry;
  readonly #exportReleases = new Map<string, Array<() => void>>();
  /** object-add's objects (TLS credentials), which nodes name by id. */
  readonly objects = new ObjectRegistry();

  constructor(log: Logger = silentLogger) {
    this.log = log;
    this.bitmaps = new BitmapRegistry(log);
    this.nbd = new NbdService(this, log.child({ part: "nbd" }));
  }

  // ---- nodes ---------------------------------------------------------------------------------------

  addNode(node: BlockNode, info: NodeInfo = { driver: node.driver.driverName }, internal = false): void {
    if (this.#nodes.has(node.name)) throw new Error(`Duplicate nodes with node-name='${node.name}'`);
    const file = openFileOf(node.driver);
    this.#nodes.set(node.name, { node, info, users: new Map(), internal, exclusive: null, file });
    // A node layered on a child (raw over a node name) is not where its image's bitmaps live; a
    // qcow2 image holds its own (io/qcow2-bitmap-store.ts), not a sidecar.
    const qcow2 = node.driver instanceof Qcow2Driver ? node.driver : null;
    if (!internal && qcow2 === null && info.filename !== undefined && info.child === undefined) {
      this.bitmaps.load(node, info.filename);
    }
    // Writes to a parent reach the child's driver directly: the child's bitmaps must see them here.
    if (info.child !== undefined) this.bitmaps.move(info.child, node);
    if (qcow2 !== null) loadQcow2Bitmaps(this.bitmaps, node, qcow2, this.log);
  }

  getNode(name: string): BlockNode | undefined {
    return this.#nodes.get(name)?.node;
  }

  nodeInfo(name: string): NodeInfo | undefined {
    return this.#nodes.get(name)?.info;
  }

  isInternal(name: string): boolean {
    return this.#nodes.get(name)?.internal ?? false;
  }

  nodes(): BlockNode[] {
    return [...this.#nodes.values()].map((e) => e.node);
  }

  /**
   * Refuses a node that cannot be used yet: a journal opened without a size has none until a stream
   * job sizes it from its source (jobs/stream.ts sizeStreamTarget), and refuses everyone else.
   */
  requireSized(nodeName: string): void {
    const driver = this.#nodes.get(nodeName)?.node.driver;
    if (driver instanceof JournalDriver && !driver.sized) {
      throw new GraphError(
        `Journal node '${nodeName}' has no size yet: only a stream backup (sync=stream) can use it, and gives it its source's size`,
      );
    }
  }

  /** Records that `user` uses the node; refuses when `exclusive` and anyone else does. */
  claim(nodeName: string, user: string, why: string, exclusive = false): void {
    const e = this.#nodes.get(nodeName);
    if (!e) throw new GraphError(`Cannot find node-name='${nodeName}'`);
    this.requireSized(nodeName);
    if ((exclusive && e.users.size > 0) || (e.exclusive !== null && e.exclusive !== user)) {
      throw new GraphError(`Node '${nodeName}' is busy: ${[...e.users.values()].join(", ")}`);
    }
    e.users.set(user, why);
    if (exclusive) e.exclusive = user;
  }

  release(nodeName: string, user: string): void {
    const e = this.#nodes.get(nodeName);
    if (!e) return;
    e.users.delete(user);
    if (e.exclusive === user) e.exclusive = null;
  }

  /**
   * Names of the nodes that have open the file `filename` names, compared by device and inode after
   * following links, so `dir/../img`, a symlink and a hard link all count. None if it does not exist.
   */
  nodesUsingFile(filename: string): string[] {
    const id = fileIdAt(filename);
    return id === undefined ? [] : this.nodesWithFile(id);
  }

  /**
   * The nodes that have file `id` open, each named by its outermost parent: users know serve's disk
   * as `disk0`, the raw node over the `#block-disk0-file` node that holds the file.
   */
  nodesWithFile(id: FileId): string[] {
    const holders = [...this.#nodes.entries()].filter(([, e]) => e.file?.id === id);
    return [...new Set(holders.map(([name]) => this.outermostParent(name)))];
  }

  /** The node layered (through raw or filter parents) over `name`, or `name` itself if none is. */
  outermostParent(name: string): string {
    for (let depth = 0; depth < this.#nodes.size; depth++) {
      const parent = [...this.#nodes.entries()].find(([, e]) => e.info.child === name)?.[0];
      if (parent === undefined) break;
      name = parent;
    }
    return name;
  }

  /**
   * Refuses to open file `id` with `want` when a node already has it open and the two would conflict
   * (the same rule as the lock bytes, so it holds without the native addon too). Names the node.
   */
  checkFileOpen(id: FileId, want: ImagePermissions, filename: string): void {
    for (const [holder, e] of this.#nodes) {
      if (e.file?.id !== id) continue;
      const c = permissionConflict(want, e.file.permissions);
      if (!c) continue;
      const name = this.outermostParent(holder);
      const why =
        c.conflict === "unshared"
          ? `node '${name}' has '${filename}' open and does not share "${c.permission}"`
          : `node '${name}' holds "${c.permission}" on '${filename}'`;
      const lock = c.conflict === "unshared" ? `"${c.permission}"` : `shared "${c.permission}"`;
      throw new GraphError(`Failed to get ${lock} lock: ${why}`);
    }
  }

  usersOf(nodeName: string): string[] {
    return [...(this.#nodes.get(nodeName)?.users.values() ?? [])];
  }

  /** Why each job that uses the node uses it (jobs claim as `job:ID`). */
  jobUsesOf(nodeName: string): string[] {
    const users = this.#nodes.get(nodeName)?.users ?? new Map<string, string>();
    return [...users].filter(([user]) => user.startsWith("job:")).map(([, why]) => why);
  }

  /**
   * A qcow2 node's backing changed (block-stream, block-commit, blockdev-snapshot): the old backing
   * node is let go and the new one (a node name, or undefined for none or a node-less image) is held
   * as this node's backing from now on.
   */
  setBackingNode(name: string, backing: string | undefined): void {
    const e = this.#nodes.get(name);
    if (!e) throw new GraphError(`Cannot find node-name='${name}'`);
    if (backing !== undefined) this.claim(backing, `backing:${name}`, `backing of ${name}`);
    if (e.info.backing !== undefined && e.info.backing !== backing)
      this.release(e.info.backing, `backing:${name}`);
    e.info = { ...e.info, backing };
  }

  /** Removes a node nobody uses and closes it. */
  async removeNode(name: string): Promise<void> {
    const e = this.#nodes.get(name);
    if (!e) throw new Error(`Failed to find node with node-name='${name}'`);
    if (e.users.size > 0) throw new Error(`Node '${name}' is busy: ${[...e.users.values()].join(", ")}`);
    this.#nodes.delete(name);
    if (e.info.child) this.release(e.info.child, `node:${name}`);
    if (e.info.backing) this.release(e.info.backing, `backing:${name}`);
    this.#releaseObjects(name, e.info);
    // A raw parent's bitmaps were its child's; a qcow2 node's live in its image and close with it.
    const child = e.info.child ? this.getNode(e.info.child) : undefined;
    if (child && !(e.node.driver instanceof Qcow2Driver)) this.bitmaps.move(name, child);
    else await this.bitmaps.close(name);
    await e.node.close();
  }

  /** Lets go of the objects a node named (credentials, a throttle group), so they can be deleted. */
  #releaseObjects(name: string, info: NodeInfo): void {
    for (const id of [info.tlsCreds, info.throttleGroup]) {
      if (id !== undefined) this.objects.release(id, `node:${name}`);
    }
  }

  // ---- exports -------------------------------------------------------------------------------------

  get nbdServer(): NbdServer | null {
    return this.nbd.server;
  }

  addExport(record: ExportRecord): void {
    const nbd = this.nbd.server;
    if (!nbd) throw new GraphError("NBD server not running");
    if (this.#exports.has(record.id))
      throw new GraphError(`Block export id '${record.id}' is already in use`);
    const node = this.getNode(record.nodeName);
    if (!node) throw new GraphError(`Cannot find node-name='${record.nodeName}'`);
    if (nbd.findExport(record.name))
      throw new GraphError(`NBD server already has export named '${record.name}'`);
    this.claim(record.nodeName, `export:${record.id}`, `export ${record.id}`);
    nbd.addExport({
      name: record.name,
      description: record.description,
      node,
      readOnly: !record.writable,
      bitmaps: record.bitmaps?.map((b) => ({ name: b.name, bits: b.bits })),
    });
    this.#exportReleases.set(record.id, record.bitmaps?.map((b) => b.hold()) ?? []);
    this.#exports.set(record.id, record);
  }

  /**
   * Removes an export as QEMU's block-export-del does. `safe` refuses while a client is connected to
   * it; `hard` lets each connection finish its in-flight requests and closes it. New clients cannot
   * find the export from the start; it is listed as shutting down until its last connection has
   * closed, and then BLOCK_EXPORT_DELETED is emitted and the node is released. Without connections
   * that happens before this returns. The promise resolves once the export is gone.
   */
  removeExport(id: string, mode: "safe" | "hard"): Promise<void> {
    const r = this.#exports.get(id);
    if (!r) throw new GraphError(`Export '${id}' is not found`);
    if (this.#removing.has(id)) throw new GraphError(`Export '${id}' is already shutting down`);
    const nbd = this.nbd.server;
    const served = nbd?.findExport(r.name);
    if (mode === "safe" && nbd && served && nbd.activeConnectionsOf(served) > 0) {
      throw new GraphError(`export '${id}' still in use (mode 'hard' disconnects its clients)`);
    }
    const finish = (): void => {
      this.#removing.delete(id);
      this.release(r.nodeName, `export:${id}`);
      for (const release of this.#exportReleases.get(id) ?? []) release();
      this.#exportReleases.delete(id);
      this.#exports.delete(id);
      this.events.emit("BLOCK_EXPORT_DELETED", { id });
    };
    if (!nbd || !served) {
      finish();
      return Promise.resolve();
    }
    nbd.removeExport(r.name);
    if (nbd.connectionsOf(served) === 0) {
      finish();
      return Promise.resolve();
    }
    const done = nbd.closeConnectionsOf(served).then(finish);
    this.#removing.set(id, done);
    return done;
  }

  /** Whether an export is being removed and waits for its connections to close. */
  exportShuttingDown(id: string): boolean {
    return this.#removing.has(id);
  }

  /** Resolves once every export removal under way has finished. */
  async exportsSettled(): Promise<void> {
    await Promise.all([...this.#removing.values()]);
  }

  /**
   * A mirror's pivot: every export of node `from` serves node `to` from now on. Open connections
   * switch on their next request. Bypasses `to`'s exclusive claim, which the pivoting job holds.
   */
  pivotExports(from: string, to: string): void {
    const target = this.#nodes.get(to);
    if (!target) throw new GraphError(`Cannot find node-name='${to}'`);
    for (const [id, r] of [...this.#exports]) {
      if (r.nodeName !== from) continue;
      const e = this.nbd.server?.findExport(r.name);
      if (e) e.node = target.node;
      this.release(from, `export:${id}`);
      target.users.set(`export:${id}`, `export ${id}`);
      this.#exports.set(id, { ...r, nodeName: to });
    }
  }

  exports(): ExportRecord[] {
    return [...this.#exports.values()];
  }

  // ---- jobs ----------------------------------------------------------------------------------------

  addJob(job: Job): void {
    if (this.#jobs.has(job.id)) throw new Error(`Job ID '${job.id}' already in use`);
    this.#jobs.set(job.id, job);
  }

  hasJob(id: string): boolean {
    return this.#jobs.has(id);
  }

  getJob(id: string): Job | undefined {
    return this.#jobs.get(id);
  }

  removeJob(job: Job): void {
    if (this.#jobs.get(job.id) === job) this.#jobs.delete(job.id);
  }

  jobs(): Job[] {
    return [...this.#jobs.values()];
  }

  // ---- shutdown ------------------------------------------------------------------------------------

  /**
   * Stops the NBD server (every export is removed, each with its BLOCK_EXPORT_DELETED, as QEMU does
   * at exit), ends every job (a plain cancel: stream targets are brought in sync and flushed), then
   * flushes and closes every node; throws the first flush error after closing all.
   */
  async closeAll(): Promise<void> {
    if (this.nbd.server) await this.nbd.stop();
    for (const job of this.#jobs.values()) {
      try {
        job.cancel(false);
      } catch {
        // Already ending.
      }
    }
    await Promise.all([...this.#jobs.values()].map((j) => j.concluded));
    let firstError: unknown;
    // Parents first, so a child is closed after the nodes layered on it.
    const entries = [...this.#nodes.values()].reverse();
    for (const e of entries) {
      try {
        if (!e.node.readOnly) await e.node.flush();
      } catch (err) {
        firstError ??= finalFlushFailed(e.node.name, err);
      }
      try {
        await this.bitmaps.close(e.node.name);
      } catch (err) {
        firstError ??= err;
      }
      await e.node.close();
      this.#releaseObjects(e.node.name, e.info);
    }
    this.#nodes.clear();
    // A failed final flush means data may not be durable: the daemon must not exit 0.
    if (firstError !== undefined) throw firstError;
  }
}

/** A final flush's error, naming the node and what its failure means for the data written to it. */
function finalFlushFailed(node: string, err: unknown): BlockError {
  const code = err instanceof BlockError ? err.code : "EIO";
  const why = err instanceof Error ? err.message : String(err);
  return new BlockError(
    code,
    `final flush of node '${node}' failed: ${why}; writes to it since its last flush may not be durable`,
    { cause: err },
  );
}
