/**
 * A write tap: a live feed of every write, write-zeroes, discard and flush a node completes, for
 * readers that watch (`drivetap tap`). The tap must never cost the disk more than a report, so its hook
 * only reports: it is not serialising, its after() is synchronous, never awaits, never throws, and it
 * sees a request only once the driver has finished it (a failed request is not reported).
 *
 * Each reader has its own bounded ring of encoded lines. A line goes straight to the reader's sink while
 * the sink's buffer is under SINK_BUFFER_BYTES_MAX; beyond that it waits in the ring; when the ring is
 * full it is dropped and counted. A reader that catches up gets a `{"dropped":N}` line where the gap
 * was, so a reader always knows what it missed. A stalled reader therefore costs at most its ring and
 * one sink buffer, however long it stalls, and never blocks a write.
 */
import type { BlockNode } from "./block-node.js";
import type { TrackedRequest } from "./tracked-request.js";

/** Lines a reader may have waiting by default, and the most a caller may ask for. */
export const TAP_RING_RECORDS_DEFAULT = 4096;
export const TAP_RING_RECORDS_MAX = 65536;
/** A reader's sink may buffer this much before lines wait in the ring instead. */
export const SINK_BUFFER_BYTES_MAX = 64 * 1024;
/** Readers one tap serves at once. */
export const TAP_READERS_MAX = 16;

/** Where a reader's lines go: a net.Socket fits. */
export interface TapSink {
  readonly writableLength: number;
  write(line: string): boolean;
  once(event: "drain", listener: () => void): unknown;
}

export interface TapRecord {
  readonly seq: number;
  /** Wall-clock completion time, ISO 8601 with ms. */
  readonly time: string;
  readonly kind: "write" | "zero" | "discard" | "flush";
  readonly offset: number;
  readonly length: number;
  readonly fua: boolean;
}

/** One reader: a sink and the bounded ring in front of it. */
export class TapReader {
  readonly #sink: TapSink;
  readonly #ringMax: number;
  /** Lines waiting for the sink (a {"dropped":N} line counts as one). */
  #ring: string[] = [];
  #head = 0;
  #droppedPending = 0;
  #waitingForDrain = false;
  /** Records dropped for this reader so far. */
  dropped = 0;
  /** Records handed to the sink so far. */
  sent = 0;

  constructor(sink: TapSink, ringMax: number) {
    this.#sink = sink;
    this.#ringMax = ringMax;
  }

  get queued(): number {
    return this.#ring.length - this.#head;
  }

  get sinkBufferedBytes(): number {
    return this.#sink.writableLength;
  }

  push(line: string): void {
    if (
      this.queued === 0 &&
      this.#droppedPending === 0 &&
      this.#sink.writableLength < SINK_BUFFER_BYTES_MAX
    ) {
      this.#send(line);
      return;
    }
    // The dropped marker needs a slot of its own, ahead of this line.
    const need = this.#droppedPending > 0 ? 2 : 1;
    if (this.queued + need > this.#ringMax) {
      this.#droppedPending++;
      this.dropped++;
    } else {
      if (this.#droppedPending > 0) {
        this.#ring.push(droppedLine(this.#droppedPending));
        this.#droppedPending = 0;
      }
      this.#ring.push(line);
    }
    if (this.#sink.writableLength < SINK_BUFFER_BYTES_MAX) this.#pump();
    else this.#waitForDrain();
  }

  #send(line: string): void {
    this.#sink.write(line);
    if (line.startsWith('{"seq"')) this.sent++;
  }

  #waitForDrain(): void {
    if (this.#waitingForDrain) return;
    this.#waitingForDrain = true;
    this.#sink.once("drain", () => {
      this.#waitingForDrain = false;
      this.#pump();
    });
  }

  #pump(): void {
    while (this.queued > 0 && this.#sink.writableLength < SINK_BUFFER_BYTES_MAX) {
      this.#send(this.#ring[this.#head++]);
    }
    if (this.queued === 0) {
      this.#ring = [];
      this.#head = 0;
      if (this.#droppedPending > 0 && this.#sink.writableLength < SINK_BUFFER_BYTES_MAX) {
        this.#sink.write(droppedLine(this.#droppedPending));
        this.#droppedPending = 0;
      }
    } else if (this.#head > this.#ringMax) {
      // Compact now and then so the consumed prefix does not grow without bound.
      this.#ring = this.#ring.slice(this.#head);
      this.#head = 0;
    }
    if (this.queued > 0 || this.#droppedPending > 0) this.#waitForDrain();
  }
}

function droppedLine(n: number): string {
  return `{"dropped":${n}}\n`;
}

/** The tap on one node: one report-only hook fanning out to its readers. */
export class WriteTap {
  readonly node: BlockNode;
  readonly ringRecords: number;
  readonly #readers = new Set<TapReader>();
  #seq = 0;
  #detach: (() => void) | null;

  constructor(node: BlockNode, ringRecords = TAP_RING_RECORDS_DEFAULT) {
    this.node = node;
    this.ringRecords = ringRecords;
    this.#detach = node.addWriteHook({
      name: "tap",
      after: (req, err) => {
        if (err) return;
        try {
          this.#report(req);
        } catch {
          // A report must never fail the guest's write.
        }
      },
    });
  }

  /** Records reported so far (the next record's seq). */
  get seq(): number {
    return this.#seq;
  }

  readers(): IterableIterator<TapReader> {
    return this.#readers.values();
  }

  get readerCount(): number {
    return this.#readers.size;
  }

  /** Adds a reader; returns the function that removes it. */
  addReader(sink: TapSink): { reader: TapReader; remove: () => void } {
    const reader = new TapReader(sink, this.ringRecords);
    this.#readers.add(reader);
    return { reader, remove: () => this.#readers.delete(reader) };
  }

  close(): void {
    this.#detach?.();
    this.#detach = null;
    this.#readers.clear();
  }

  #report(req: TrackedRequest): void {
    if (req.kind !== "write" && req.kind !== "zero" && req.kind !== "discard" && req.kind !== "flush") return;
    const record: TapRecord = {
      seq: this.#seq++,
      time: new Date().toISOString(),
      kind: req.kind,
      offset: req.offset,
      length: req.length,
      fua: req.flags.fua === true,
    };
    if (this.#readers.size === 0) return;
    const line = JSON.stringify(record) + "\n";
    for (const r of this.#readers) r.push(line);
  }
}
