/**
 * Named dirty bitmaps (QEMU's block-dirty-bitmap-*): each records which clusters of its node were
 * written, zeroed or discarded since it was created or cleared. A node's bitmaps share one write hook
 * that marks the request's clusters in before(), so a cluster is marked before the driver sees the
 * write. A persistent bitmap has a store: the sidecar file (io/bitmap-file.ts) makes the mark durable
 * first, so the hook returns a promise only when a request sets a new bit, or touches bits whose page is
 * not yet durable; writes to clusters already durably marked pay one bitmap lookup. A qcow2 image keeps
 * its bitmaps itself (io/qcow2-bitmap-store.ts), durable only at a clean close, as QEMU does.
 */
import * as path from "node:path";
import { assert } from "../core/assert.js";
import { BlockError } from "../core/errors.js";
import type { Logger } from "../core/log.js";
import { BitmapFile } from "./bitmap-file.js";
import type { BlockNode } from "./block-node.js";
import { DirtyBitmap } from "./dirty-bitmap.js";
import type { TrackedRequest, WriteHook } from "./tracked-request.js";

/** QEMU's query-named-block-nodes entry for a bitmap. */
export interface BitmapInfo {
  name: string;
  granularity: number;
  /** Dirty bytes. */
  count: number;
  recording: boolean;
  persistent: boolean;
  busy: boolean;
  inconsistent: boolean;
}

/** Where a persistent bitmap lives: the sidecar file (BitmapFile) or the qcow2 image. */
export interface BitmapStore {
  /** The error that stopped the store from recording, if any. */
  readonly failed: BlockError | null;
  /** Loaded from a store a crash left in use: not usable, only removable (QEMU's "inconsistent"). */
  readonly inconsistent: boolean;
  /** Clusters [first, end) changed in the bits; resolves once that change is as durable as it gets. */
  changed(first: number, end: number): Promise<void>;
  /** Resolves when clusters [first, end) are durable; null when they already are. */
  durable(first: number, end: number): Promise<void> | null;
  setRecording(recording: boolean): Promise<void>;
  /** Makes everything durable and lets go; the bitmap stays stored. */
  close(): Promise<void>;
  /** Deletes the bitmap from its store. */
  remove(): Promise<void>;
}

export class NamedBitmap {
  readonly name: string;
  readonly bits: DirtyBitmap;
  /** The store of a persistent bitmap. */
  readonly store: BitmapStore | null;
  #enabled: boolean;
  /** False while a transaction that adds it has not committed. */
  live = true;
  #busy = 0;
  /** Bitmaps that record the same writes from some point on (a backup job's "since start"). */
  readonly followers = new Set<DirtyBitmap>();

  constructor(name: string, bits: DirtyBitmap, store: BitmapStore | null, enabled: boolean) {
    this.name = name;
    this.bits = bits;
    this.store = store;
    this.#enabled = enabled;
  }

  get persistent(): boolean {
    return this.store !== null;
  }

  get inconsistent(): boolean {
    return this.store?.inconsistent ?? false;
  }

  get enabled(): boolean {
    return this.#enabled;
  }

  get recording(): boolean {
    return this.#enabled && this.live;
  }

  get busy(): boolean {
    return this.#busy > 0;
  }

  /** Marks the bitmap in use (a job, an export); returns the release, which is idempotent. */
  hold(): () => void {
    this.#busy++;
    let released = false;
    return () => {
      if (released) return;
      released = true;
      this.#busy--;
    };
  }

  /** Sets the recording state; a persistent bitmap stores it (the sidecar in its file header). */
  async setEnabled(enabled: boolean): Promise<void> {
    this.#enabled = enabled;
    await this.store?.setRecording(enabled);
  }

  info(): BitmapInfo {
    return {
      name: this.name,
      granularity: this.bits.granularity,
      count: this.bits.dirtyBytes,
      recording: this.recording,
      persistent: this.persistent,
      busy: this.busy,
      // Sidecar bitmaps are marked before writes reach the disk: a crash cannot make them
      // inconsistent. A qcow2 image's can be, as QEMU's are.
      inconsistent: this.inconsistent,
    };
  }

  /**
   * Marks [offset, offset + length) dirty. Returns null when nothing needs waiting for, else a
   * promise that resolves once the marks are durable (persistent bitmaps).
   */
  mark(offset: number, length: number): Promise<void> | null {
    const bits = this.bits;
    const [first, end] = bits.clustersOf(offset, length);
    let newFirst = -1;
    let newEnd = -1;
    for (let c = first; c < end; c++) {
      if (bits.get(c)) continue;
      bits.set(c);
      if (newFirst < 0) newFirst = c;
      newEnd = c + 1;
    }
    for (const f of this.followers) f.setRange(offset, length);
    const file = this.store;
    if (!file) return null;
    if (newFirst >= 0) {
      const p = file.changed(newFirst, newEnd);
      if (file.failed) return p;
    }
    return file.durable(first, end);
  }

  /** Records that clusters [first, end) changed outside the write path (clear, merge). */
  changed(first: number, end: number): Promise<void> {
    if (!this.store || end <= first) return Promise.resolve();
    return this.store.changed(first, end);
  }
}

export class NodeBitmaps {
  readonly node: BlockNode;
  /** The image file (for persistent bitmaps), if the node has one. */
  readonly image: string | undefined;
  readonly #bitmaps = new Map<string, NamedBitmap>();
  #detach: (() => void) | null = null;

  constructor(node: BlockNode, image: string | undefined) {
    this.node = node;
    this.image = image;
  }

  readonly #hook: WriteHook = {
    name: "dirty-bitmaps",
    before: (req) => this.#before(req),
  };

  #before(req: TrackedRequest): Promise<void> | undefined {
    if (req.kind === "flush") return undefined;
    let waits: Array<Promise<void>> | undefined;
    for (const bm of this.#bitmaps.values()) {
      if (!bm.recording) continue;
      const p = bm.mark(req.offset, req.length);
      if (p) (waits ??= []).push(p);
    }
    if (!waits) return undefined;
    return waits.length === 1 ? waits[0] : Promise.all(waits).then(() => undefined);
  }

  get size(): number {
    return this.#bitmaps.size;
  }

  get(name: string): NamedBitmap | undefined {
    return this.#bitmaps.get(name);
  }

  list(): NamedBitmap[] {
    return [...this.#bitmaps.values()];
  }

  add(bm: NamedBitmap): void {
    if (this.#bitmaps.has(bm.name)) throw new BlockError("EINVAL", `Bitmap already exists: ${bm.name}`);
    this.#bitmaps.set(bm.name, bm);
    this.#detach ??= this.node.addWriteHook(this.#hook);
  }

  delete(bm: NamedBitmap): void {
    if (this.#bitmaps.get(bm.name) !== bm) return;
    this.#bitmaps.delete(bm.name);
    if (this.#bitmaps.size === 0 && this.#detach) {
      this.#detach();
      this.#detach = null;
    }
  }

  /**
   * Marks the ranges of writes in flight now. Their before() may have run already (a bitmap cleared
   * or created under them would otherwise miss them); not waited for.
   */
  markInFlight(bm: NamedBitmap): void {
    for (const req of this.node.inFlight()) {
      if (req.kind === "write" || req.kind === "zero" || req.kind === "discard") {
        bm.mark(req.offset, req.length)?.then(
          () => undefined,
          () => undefined,
        );
      }
    }
  }

  /** Follows a resize of the node (the graph checked first that none is persistent). */
  resize(sizeBytes: number): void {
    for (const bm of this.#bitmaps.values()) {
      assert(!bm.persistent, "persistent bitmaps do not follow a resize");
      bm.bits.resize(sizeBytes);
      for (const f of bm.followers) f.resize(sizeBytes);
    }
  }

  /** Flushes and closes every persistent bitmap's file; the bitmaps stay on disk. */
  async close(): Promise<void> {
    let first: unknown;
    for (const bm of this.#bitmaps.values()) {
      try {
        await bm.store?.close();
      } catch (err) {
        first ??= err;
      }
    }
    this.#bitmaps.clear();
    this.#detach?.();
    this.#detach = null;
    if (first !== undefined) throw first;
  }
}

/** Every node's named bitmaps, by node name. */
export class BitmapRegistry {
  readonly #nodes = new Map<string, NodeBitmaps>();
  readonly #log: Logger;

  constructor(log: Logger) {
    this.#log = log;
  }

  of(nodeName: string): NodeBitmaps | undefined {
    return this.#nodes.get(nodeName);
  }

  /** The node's bitmaps, created empty on first use. */
  forNode(node: BlockNode, image: string | undefined): NodeBitmaps {
    let nb = this.#nodes.get(node.name);
    if (!nb) {
      nb = new NodeBitmaps(node, image);
      this.#nodes.set(node.name, nb);
    }
    return nb;
  }

  find(nodeName: string, name: string): NamedBitmap | undefined {
    return this.#nodes.get(nodeName)?.get(name);
  }

  /** The node, other than `except`, whose persistent bitmaps live next to this image. */
  imageOwner(image: string, except: string): string | undefined {
    const want = path.resolve(image);
    for (const [name, nb] of this.#nodes) {
      if (name === except || !nb.image || path.resolve(nb.image) !== want) continue;
      if (nb.list().some((b) => b.persistent)) return name;
    }
    return undefined;
  }

  /**
   * Moves a node's bitmaps to another node that now takes its writes (a parent layered on it, whose
   * requests reach the child's driver without passing the child's request path).
   */
  move(fromName: string, to: BlockNode): void {
    const from = this.#nodes.get(fromName);
    if (!from || from.size === 0 || this.#nodes.has(to.name)) return;
    this.#nodes.delete(fromName);
    const nb = new NodeBitmaps(to, from.image);
    for (const bm of from.list()) {
      from.delete(bm);
      nb.add(bm);
    }
    this.#nodes.set(to.name, nb);
  }

  /** Loads the persistent bitmaps stored next to `image` onto `node`. */
  load(node: BlockNode, image: string): void {
    const files = BitmapFile.list(image);
    if (files.length === 0) return;
    const owner = this.imageOwner(image, node.name);
    if (owner) {
      this.#log.warn(
        { node: node.name, owner },
        "persistent bitmaps of this image are loaded on another node",
      );
      return;
    }
    const nb = this.forNode(node, image);
    for (const f of files) {
      try {
        const { file, header, repairedPages } = BitmapFile.load(f);
        if (header.sizeBytes !== node.size()) {
          void file.close();
          this.#log.warn(
            { file: f, bitmapSize: header.sizeBytes, size: node.size() },
            "persistent bitmap is for another disk size; not loaded",
          );
          continue;
        }
        if (repairedPages > 0) {
          this.#log.warn({ bitmap: header.name, pages: repairedPages }, "torn bitmap pages loaded as dirty");
        }
        nb.add(new NamedBitmap(header.name, file.bits, file, header.recording));
        this.#log.info(
          { node: node.name, bitmap: header.name, dirty: file.bits.dirtyBytes },
          "bitmap loaded",
        );
      } catch (err) {
        this.#log.warn({ file: f, err: (err as Error).message }, "persistent bitmap not loaded");
      }
    }
  }

  /** Closes a node's bitmaps (files flushed and kept). */
  async close(nodeName: string): Promise<void> {
    const nb = this.#nodes.get(nodeName);
    if (!nb) return;
    this.#nodes.delete(nodeName);
    await nb.close();
  }
}
