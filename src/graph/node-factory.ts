/**
 * Opens block nodes from blockdev-add options (QEMU's shapes): file, raw over a file child (inline
 * options or a node name), memory, null-co, journal, and the error-inject test filter.
 */
import * as fs from "node:fs";
import type { BlockDriver } from "../block/driver.js";
import { FileDriver } from "../block/drivers/file.js";
import { JournalDriver } from "../block/drivers/journal.js";
import { MemoryDriver } from "../block/drivers/memory.js";
import { NullDriver } from "../block/drivers/null.js";
import { ErrorInjectDriver } from "../block/filters/error-inject.js";
import { FilterDriver } from "../block/filters/filter.js";
import { GiB } from "../core/units.js";
import { BlockNode } from "../io/block-node.js";
import type { BlockGraph, NodeInfo } from "./block-graph.js";

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

/** Opens the driver stack described by `o`; `nodeName` names the node for messages and claims. */
function open(
  graph: BlockGraph,
  o: BlockdevOptions,
  readOnly: boolean,
  where: string,
  parent: string,
): Opened {
  const driver = str(o, "driver", where);
  switch (driver) {
    case "file": {
      const filename = str(o, "filename", where);
      if (!fs.existsSync(filename))
        throw new NodeOptionError(`Could not open '${filename}': No such file or directory`);
      return { driver: FileDriver.open(filename, { readOnly }), info: { driver: "file", filename } };
    }
    case "journal": {
      // A write-only stream target that records every write (block/drivers/journal.ts).
      const filename = str(o, "filename", where);
      const data = o.data === undefined ? undefined : o.data === true;
      const sizeBytes = o.size === undefined ? undefined : size(o, where);
      return {
        driver: JournalDriver.open(filename, { data, size: sizeBytes }),
        info: { driver: "journal", filename },
      };
    }
    case "memory":
      return { driver: new MemoryDriver(size(o, where)), info: { driver: "memory" } };
    case "null-co":
      return { driver: new NullDriver(size(o, where)), info: { driver: "null-co" } };
    case "raw":
    case "error-inject": {
      const child = o.file;
      let next: BlockDriver;
      let info: NodeInfo;
      let owns = true;
      if (typeof child === "string") {
        const node = graph.getNode(child);
        if (!node) throw new NodeOptionError(`Cannot find device='' nor node-name='${child}'`);
        try {
          graph.claim(child, `node:${parent}`, `child of ${parent}`, true);
        } catch (err) {
          throw new NodeOptionError((err as Error).message);
        }
        next = node.driver;
        owns = false;
        info = { driver, child, filename: graph.nodeInfo(child)?.filename };
      } else if (child && typeof child === "object") {
        const inner = open(graph, child as BlockdevOptions, readOnly, `${where}file.`, parent);
        next = inner.driver;
        info = { driver, filename: inner.info.filename };
      } else {
        throw new NodeOptionError(`Parameter '${where}file' is missing`);
      }
      if (driver === "raw") return { driver: new FilterDriver("raw", next, owns), info };
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

/** blockdev-add: opens the node and registers it in the graph. */
export function addNodeFromOptions(graph: BlockGraph, o: BlockdevOptions): BlockNode {
  const name = o["node-name"];
  if (typeof name !== "string") throw new NodeOptionError("Parameter 'node-name' is missing");
  if (!NODE_NAME_PATTERN.test(name)) throw new NodeOptionError(`Invalid node-name: '${name}'`);
  if (graph.getNode(name)) throw new NodeOptionError(`Duplicate nodes with node-name='${name}'`);
  const readOnly = o["read-only"] === true;
  const { driver, info } = open(graph, o, readOnly, "", name);
  const node = new BlockNode(name, driver, { readOnly });
  graph.addNode(node, info);
  return node;
}
