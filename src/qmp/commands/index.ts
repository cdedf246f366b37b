/** Every QMP command drivetap offers, bound to a graph. */
import type { BlockGraph } from "../../graph/block-graph.js";
import type { QmpServer } from "../server.js";
import { backupCommands } from "./backup.js";
import { bitmapCommands } from "./bitmaps.js";
import { chainCommands } from "./chain.js";
import { blockCommands } from "./block.js";
import { blockstatsCommands } from "./blockstats.js";
import { createCommands } from "./create.js";
import { exportCommands } from "./exports.js";
import { ioEngineCommands } from "./io-engine.js";
import { jobCommands } from "./jobs.js";
import { journalCommands } from "./journal.js";
import { mirrorCommands } from "./mirror.js";
import { nbdServerCommands } from "./nbd-server.js";
import { objectCommands } from "./objects.js";
import { resizeCommands } from "./resize.js";
import { qomCommands } from "./qom.js";
import { tapCommands } from "./tap.js";
import { verifyCommands } from "./verify.js";

export function registerCommands(server: QmpServer, graph: BlockGraph): void {
  for (const def of [
    ...blockCommands(graph),
    ...blockstatsCommands(graph),
    ...createCommands(graph),
    ...exportCommands(graph),
    ...ioEngineCommands(),
    ...nbdServerCommands(graph),
    ...jobCommands(graph),
    ...backupCommands(graph),
    ...bitmapCommands(graph),
    ...chainCommands(graph),
    ...journalCommands(graph),
    ...mirrorCommands(graph),
    ...objectCommands(graph),
    ...resizeCommands(graph),
    ...qomCommands(graph),
    ...tapCommands(graph),
    ...verifyCommands(graph),
  ]) {
    server.register(def);
  }
}
