/**
 * The guest tests' stall verdict: from the server's unanswered requests (x-query-nbd-connections) and
 * the guest's last heartbeat, it names the side that holds the stall. The guest test exercises the
 * server-stall case end to end; the other cases are checked here.
 */
import { test } from "node:test";
import assert from "node:assert/strict";
import { guestWaits, heartbeats, lastHeartbeat, stallVerdict, type ServerView } from "../helpers/guest.js";

const console = [
  "DRIVETAP-GUEST: step fio",
  "DRIVETAP-GUEST: hb uptime 14.69 inflight 0 0 stat 1 2 3",
  "DRIVETAP-GUEST: hb uptime 16.74 inflight 1 32 stat 4 5 6",
  "",
].join("\r\n");

function view(ages: number[], unsent = 0): ServerView {
  return {
    connections: [
      {
        id: 1,
        export: "",
        "x-in-flight": ages.map((a, i) => ({
          command: "WRITE",
          offset: i * 4096,
          length: 4096,
          "age-ms": a,
        })),
        "x-unsent-bytes": unsent,
      },
    ],
  };
}

test("lastHeartbeat takes the last heartbeat line", () => {
  const hb = lastHeartbeat(console);
  assert.ok(hb);
  assert.equal(hb.uptimeS, 16.74);
  assert.equal(hb.inFlightReads, 1);
  assert.equal(hb.inFlightWrites, 32);
  assert.equal(hb.line, "DRIVETAP-GUEST: hb uptime 16.74 inflight 1 32 stat 4 5 6");
  assert.equal(lastHeartbeat("no heartbeat here"), null);
});

test("stallVerdict names the side holding the stall", () => {
  const hb = lastHeartbeat(console);
  assert.match(
    stallVerdict(view([52_000, 51_000]), hb),
    /^SERVER STALL: .* 2 requests .* oldest 52000 ms .*33 requests in flight .*other 31 never reached the server/,
  );
  assert.match(stallVerdict(view([], 65536), hb), /^SERVER SIDE: .*65536 bytes are not yet sent/);
  assert.match(stallVerdict(view([10]), hb), /^BETWEEN GUEST AND SERVER: the server holds 1 requests/);
  const idle = lastHeartbeat("DRIVETAP-GUEST: hb uptime 3 inflight 0 0 stat\n");
  assert.match(stallVerdict(view([]), idle), /^GUEST STALL: .*the guest is not issuing I\/O/);
  assert.match(
    stallVerdict({ connections: null, unavailable: "CommandNotFound: x" }, null),
    /^UNKNOWN which side: .*CommandNotFound: x.*no heartbeat/,
  );
});

test("guestWaits measures spans with requests in flight and no completion", () => {
  const hb = (uptime: number, inflight: number, completed: number): string =>
    `DRIVETAP-GUEST: hb uptime ${uptime} inflight 0 ${inflight} stat ${completed} 0 0 0 0 0 0 0 ${inflight} 0 0 0 0 0 0 0 0`;
  const beats = heartbeats(
    [
      hb(2, 0, 10),
      hb(4, 32, 100),
      hb(6, 32, 100),
      hb(8, 32, 100),
      hb(10, 32, 500),
      hb(12, 32, 500),
      hb(14, 32, 500),
    ].join("\n") + "\n",
  );
  assert.equal(beats[1].completed, 100);
  assert.deepEqual(guestWaits(beats), { longestS: 4, currentS: 4 });
  assert.deepEqual(guestWaits(beats.slice(0, 5)), { longestS: 4, currentS: 0 });
  assert.deepEqual(guestWaits(heartbeats([hb(2, 0, 1), hb(4, 0, 1), hb(6, 0, 1)].join("\n"))), {
    longestS: 0,
    currentS: 0,
  });
});
