/** The NBD server's buffer budget and reply buffer sizing, below the server. */
import { describe, test } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { BufferBudget } from "../../src/nbd/server/buffer-budget.js";
import { giveReplyBuffer, replyAllocationBytes, takeReplyBuffer } from "../../src/nbd/server/reply-pool.js";

const MiB = 1024 * 1024;
const KiB = 1024;

describe("BufferBudget", () => {
  test("small requests within the reserved share are granted even when the shared part is exhausted", () => {
    const budget = new BufferBudget(100 * MiB, 10, 1 * MiB);
    const hog = budget.open();
    assert.equal(
      hog.take(budget.grantBytesMax, () => {}),
      true,
    );
    const small = budget.open();
    assert.equal(
      small.take(512 * KiB, () => assert.fail("granted at once")),
      true,
      "from its own share",
    );
    assert.equal(
      small.take(1 * MiB, () => {}),
      false,
      "past its share it waits",
    );
  });

  test("waiters are served first come first served, and a releasing account cannot jump the queue", () => {
    const budget = new BufferBudget(90 * MiB, 2, 0);
    const a = budget.open();
    const b = budget.open();
    const order: string[] = [];
    assert.ok(a.take(60 * MiB, () => {}));
    assert.equal(
      b.take(40 * MiB, () => order.push("b")),
      false,
    );
    a.give(60 * MiB);
    assert.deepEqual(order, ["b"], "b is granted by a's release");
    assert.equal(
      a.take(60 * MiB, () => order.push("a")),
      false,
      "a waits behind what b holds",
    );
    b.give(40 * MiB);
    assert.deepEqual(order, ["b", "a"]);
  });

  test("close gives everything back and leaves the queue", () => {
    const budget = new BufferBudget(64 * MiB, 2, 0);
    const a = budget.open();
    const b = budget.open();
    let granted = false;
    assert.ok(a.take(64 * MiB, () => {}));
    assert.equal(
      b.take(1 * MiB, () => (granted = true)),
      false,
    );
    b.close();
    a.close();
    assert.equal(budget.usedBytes, 0);
    assert.equal(granted, false, "a closed account is never granted");
  });

  test("property: used bytes never pass the total, and every waiter is granted once everything is given back", () => {
    fc.assert(
      fc.property(
        fc.array(fc.tuple(fc.nat(3), fc.integer({ min: 1, max: 40 * MiB }), fc.boolean()), { maxLength: 60 }),
        (ops) => {
          const total = 80 * MiB;
          const budget = new BufferBudget(total, 4, 1 * MiB);
          const accounts = Array.from({ length: 4 }, () => ({
            acct: budget.open(),
            held: [] as number[],
            waiting: false,
          }));
          for (const [i, n, give] of ops) {
            const a = accounts[i];
            if (give && a.held.length > 0) a.acct.give(a.held.pop()!);
            else if (!a.waiting) {
              const ok = a.acct.take(n, () => {
                a.waiting = false;
                a.held.push(n);
              });
              if (ok) a.held.push(n);
              else a.waiting = true;
            }
            assert.ok(budget.usedBytes <= total, "within the total");
          }
          // Giving back grants waiters, which then hold something: drain until nobody holds anything
          // (a give can grant an account already drained in this pass). Every request fits the
          // budget alone, so each pass grants at least the head waiter; the bound catches a stuck queue.
          for (let pass = 0; accounts.some((a) => a.held.length > 0); pass++) {
            assert.ok(pass <= accounts.length * ops.length, "draining ends");
            for (const a of accounts) while (a.held.length > 0) a.acct.give(a.held.pop()!);
          }
          assert.ok(accounts.every((a) => !a.waiting));
          assert.equal(budget.usedBytes, 0);
        },
      ),
      {
        // Found by a run: the last grant happens while an earlier account is already drained.
        examples: [
          [
            [
              [2, 6743571, false],
              [3, 36785043, false],
              [1, 39308891, false],
              [2, 15582541, false],
              [0, 27946073, false],
            ],
          ],
        ],
      },
    );
  });
});

describe("reply buffers", () => {
  test("a 32 MiB read reply takes 32 MiB + 64 KiB, not 64 MiB", () => {
    assert.equal(replyAllocationBytes(32 * MiB + 16), 32 * MiB + 64 * KiB);
    assert.equal(replyAllocationBytes(1 * MiB + 16), 1 * MiB + 64 * KiB);
    assert.equal(replyAllocationBytes(4096 + 16), 8192, "small replies: 4 KiB steps");
    assert.equal(replyAllocationBytes(512 + 16), 512 + 16, "tiny replies are plain allocations");
    const b = takeReplyBuffer(32 * MiB + 16);
    assert.equal(b.length, 32 * MiB + 16);
    assert.equal(b.buffer.byteLength, 32 * MiB + 64 * KiB);
  });

  test("the largest replies are reused, and a buffer up to twice the size serves a smaller one", () => {
    const first = takeReplyBuffer(32 * MiB + 16);
    giveReplyBuffer(first);
    const again = takeReplyBuffer(32 * MiB + 16);
    assert.equal(again.buffer, first.buffer, "reused");
    giveReplyBuffer(again);
    const smaller = takeReplyBuffer(20 * MiB);
    assert.equal(smaller.buffer, first.buffer, "a 20 MiB reply fits the idle 32 MiB buffer");
    giveReplyBuffer(smaller);
    const tiny = takeReplyBuffer(1 * MiB);
    assert.notEqual(tiny.buffer, first.buffer, "a 1 MiB reply does not take a 32 MiB buffer");
  });

  test("4 KiB read replies are recycled (fresh memory costs page faults inside pread)", () => {
    const a = takeReplyBuffer(4096 + 16);
    giveReplyBuffer(a);
    const b = takeReplyBuffer(4096 + 16);
    assert.equal(b.buffer, a.buffer);
  });
});
