/** What every backup mode shares: the source and target nodes, policies, and the end of the job. */
import type { BlockNode } from "../io/block-node.js";
import type { NamedBitmap } from "../io/named-bitmaps.js";
import { Job, type ErrorAction, type JobOptions } from "./job.js";

/** QEMU's modes (incremental is bitmap with bitmap-mode on-success) and ours (stream). */
export type SyncMode = "full" | "top" | "none" | "bitmap" | "stream";

/** What happens to the job's bitmap at the end: clear what was copied on success, never, or always. */
export type BitmapMode = "on-success" | "never" | "always";

/** Background copies and repairs move this much at a time. */
export const BACKUP_CLUSTER_BYTES = 64 * 1024;

export interface BackupOptions extends JobOptions {
  readonly source: BlockNode;
  readonly target: BlockNode;
  readonly sync: SyncMode;
  readonly onSourceError?: ErrorAction;
  readonly onTargetError?: ErrorAction;
  /** sync=bitmap: the clusters to copy; full and top: updated at the end per bitmapMode. */
  readonly bitmap?: NamedBitmap;
  readonly bitmapMode?: BitmapMode;
  /** Called once at the end (after the target was flushed): releases the target in the graph. */
  readonly release?: () => void | Promise<void>;
}

export abstract class BackupJobBase extends Job {
  readonly source: BlockNode;
  readonly target: BlockNode;
  readonly sync: SyncMode;
  readonly onSourceError: ErrorAction;
  readonly onTargetError: ErrorAction;
  readonly #release?: () => void | Promise<void>;

  constructor(options: BackupOptions) {
    super({ ...options, type: options.type ?? "backup" });
    this.source = options.source;
    this.target = options.target;
    this.sync = options.sync;
    this.onSourceError = options.onSourceError ?? "report";
    this.onTargetError = options.onTargetError ?? "report";
    this.#release = options.release;
  }

  #kick: (() => void) | null = null;

  /** Wakes the job's body if it waits in waitForKick(). */
  protected wake(): void {
    const k = this.#kick;
    this.#kick = null;
    k?.();
  }

  /** Waits until wake() is called, or timeoutMs has passed. */
  protected waitForKick(timeoutMs?: number): Promise<void> {
    return new Promise((resolve) => {
      const timer = timeoutMs !== undefined ? setTimeout(() => this.wake(), Math.max(timeoutMs, 1)) : null;
      this.#kick = () => {
        if (timer) clearTimeout(timer);
        resolve();
      };
    });
  }

  protected override onCancel(): void {
    this.wake();
  }

  protected override async onFinalize(success: boolean): Promise<void> {
    try {
      if (success) await this.target.flush();
    } finally {
      await this.#release?.();
    }
  }
}
