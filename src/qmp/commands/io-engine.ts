/**
 * drivetap's own `x-query-io-engine`: the engine file nodes get unless blockdev-add's `aio` says
 * otherwise, and the io_uring ring's counters (submits, entries, fallbacks), which show whether the
 * writes of one loop turn, a job's target writes with them, leave in one submission; and the event
 * loop's adaptive polling (loop-poll.ts), when it is on.
 */
import { currentIoUring, processIoEngine } from "../../block/drivers/io-engine/index.js";
import { loopPollStats } from "../../block/drivers/io-engine/loop-poll.js";
import { defineCommand, type QmpCommandDef } from "../server.js";

export function ioEngineCommands(): QmpCommandDef[] {
  return [
    defineCommand({
      name: "x-query-io-engine",
      args: {},
      handler: () => {
        const ring = currentIoUring()?.stats;
        const poll = loopPollStats();
        return {
          engine: processIoEngine().name,
          ...(poll
            ? {
                poll: {
                  "max-ns": poll.maxNs,
                  "window-ns": poll.windowNs,
                  spins: poll.spins,
                  hits: poll.hits,
                  "spin-ns": poll.spinNs,
                  sleeps: poll.sleeps,
                },
              }
            : {}),
          ...(ring
            ? {
                "io-uring": {
                  submits: ring.enters,
                  sqes: ring.sqes,
                  "in-flight": ring.inflight,
                  fallbacks: ring.fallbacks,
                  resubmits: ring.resubmits,
                },
              }
            : {}),
        };
      },
    }),
  ];
}
