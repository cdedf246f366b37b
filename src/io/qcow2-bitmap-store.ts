/**
 * The persistence backend for bitmaps kept inside a qcow2 image (block/drivers/qcow2/bitmaps.ts), the
 * counterpart of the sidecar file (bitmap-file.ts) for raw images. The image holds the bits only from
 * one clean close to the next open, as in QEMU: marks are not durable per write, so `changed` and
 * `durable` cost nothing, and the driver writes every tracked bitmap into the image when it closes. A
 * crash leaves the bitmaps IN_USE, and the next open loads them as inconsistent.
 */
import type { BlockError } from "../core/errors.js";
import type { Logger } from "../core/log.js";
import type { Qcow2Bitmaps } from "../block/drivers/qcow2/bitmaps.js";
import type { Qcow2Driver } from "../block/drivers/qcow2/qcow2.js";
import type { BlockNode } from "./block-node.js";
import { DirtyBitmap } from "./dirty-bitmap.js";
import { NamedBitmap, type BitmapRegistry, type BitmapStore } from "./named-bitmaps.js";

const DONE: Promise<void> = Promise.resolve();

export class Qcow2BitmapStore implements BitmapStore {
  readonly failed: BlockError | null = null;
  readonly inconsistent: boolean;
  readonly #image: Qcow2Bitmaps;
  readonly #name: string;
  #recording: boolean;

  /** A bitmap of the image; unless inconsistent, its bits are stored at the image's close. */
  constructor(
    image: Qcow2Bitmaps,
    name: string,
    bits: DirtyBitmap,
    recording: boolean,
    inconsistent: boolean,
  ) {
    this.#image = image;
    this.#name = name;
    this.#recording = recording;
    this.inconsistent = inconsistent;
    // An inconsistent bitmap is not tracked: its entry stays as it is on disk, IN_USE, as in QEMU.
    if (!inconsistent) {
      const isRecording = (): boolean => this.#recording;
      image.track({
        name,
        granularity: bits.granularity,
        get enabled() {
          return isRecording();
        },
        get bytes() {
          return bits.bytes;
        },
      });
    }
  }

  changed(): Promise<void> {
    return DONE;
  }

  durable(): Promise<void> | null {
    return null;
  }

  async setRecording(recording: boolean): Promise<void> {
    this.#recording = recording;
  }

  /** Nothing to do here: the driver stores the bits when it closes, after the node's last write. */
  async close(): Promise<void> {}

  async remove(): Promise<void> {
    await this.#image.remove(this.#name);
  }
}

/** Makes the bitmaps a qcow2 node's image holds named persistent bitmaps of the node. */
export function loadQcow2Bitmaps(
  registry: BitmapRegistry,
  node: BlockNode,
  driver: Qcow2Driver,
  log: Logger,
): void {
  const image = driver.bitmaps;
  if (image.stale) {
    log.warn(
      { node: node.name },
      "a program lacking bitmap support modified this image, so its bitmaps are ignored (and dropped at " +
        "a writable close); some clusters may be leaked, run 'qemu-img check -r all' to fix",
    );
  }
  if (image.loaded.length === 0) return;
  const nb = registry.forNode(node, undefined);
  for (const l of image.loaded) {
    if (nb.get(l.name)) {
      // A sidecar bitmap of the same name came first; the image's stays in the image, untracked.
      log.warn({ node: node.name, bitmap: l.name }, "qcow2 bitmap not loaded: the node has one of that name");
      continue;
    }
    const bits = new DirtyBitmap(node.size(), l.granularity);
    if (l.bits !== null) bits.loadBytes(l.bits);
    const store = new Qcow2BitmapStore(image, l.name, bits, l.enabled, l.inconsistent);
    nb.add(new NamedBitmap(l.name, bits, store, l.enabled));
    if (l.inconsistent) {
      log.warn(
        { node: node.name, bitmap: l.name },
        "bitmap is inconsistent (the image was not closed cleanly): it cannot be used; remove it with block-dirty-bitmap-remove",
      );
    } else log.info({ node: node.name, bitmap: l.name, dirty: bits.dirtyBytes }, "bitmap loaded");
  }
  // The named bitmaps hold the bits now; the image's copy would double them for the node's life.
  image.forgetLoaded();
}
