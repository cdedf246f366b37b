import { test, describe } from "node:test";
import assert from "node:assert/strict";
import fc from "fast-check";
import { iovLength, rangesOverlap } from "../../src/core/ranges.js";
import {
  BlockError,
  NBD_ERRNO,
  toBlockError,
  fromLinuxErrno,
  fromNbdErrno,
  type BlockErrorCode,
} from "../../src/core/errors.js";

describe("rangesOverlap", () => {
  test("examples of half-open ranges", () => {
    assert.equal(rangesOverlap(0, 10, 5, 10), true);
    assert.equal(rangesOverlap(5, 10, 0, 10), true);
    assert.equal(rangesOverlap(0, 10, 10, 10), false, "touching ranges do not overlap");
    assert.equal(rangesOverlap(10, 10, 0, 10), false, "touching ranges do not overlap");
    assert.equal(rangesOverlap(0, 10, 9, 1), true);
    assert.equal(rangesOverlap(0, 100, 40, 2), true, "containment");
    assert.equal(rangesOverlap(40, 2, 0, 100), true, "containment");
    assert.equal(rangesOverlap(0, 1, 1, 1), false);
    assert.equal(rangesOverlap(2 ** 40, 4096, 2 ** 40 + 4095, 1), true);
  });

  test("property: overlap iff some byte is in both (non-empty ranges), and symmetric", () => {
    const range = fc.record({ offset: fc.nat({ max: 200 }), length: fc.integer({ min: 1, max: 50 }) });
    fc.assert(
      fc.property(range, range, (a, b) => {
        let shared = false;
        for (let x = a.offset; x < a.offset + a.length; x++) {
          if (x >= b.offset && x < b.offset + b.length) shared = true;
        }
        assert.equal(rangesOverlap(a.offset, a.length, b.offset, b.length), shared);
        assert.equal(rangesOverlap(b.offset, b.length, a.offset, a.length), shared);
      }),
      { numRuns: 500 },
    );
  });
});

describe("iovLength", () => {
  test("examples", () => {
    assert.equal(iovLength([]), 0);
    assert.equal(iovLength([Buffer.alloc(0)]), 0);
    assert.equal(iovLength([Buffer.alloc(3), Buffer.alloc(0), Buffer.alloc(4096)]), 4099);
  });

  test("property: equals the length of the concatenation", () => {
    fc.assert(
      fc.property(fc.array(fc.uint8Array({ maxLength: 64 }), { maxLength: 20 }), (arrays) => {
        const iov = arrays.map((a) => Buffer.from(a));
        assert.equal(iovLength(iov), Buffer.concat(iov).length);
      }),
    );
  });
});

describe("errors", () => {
  const sysErr = (code: string): NodeJS.ErrnoException => Object.assign(new Error(`${code}: oops`), { code });

  test("system error codes map to block error codes", () => {
    const table: Array<[string, BlockErrorCode]> = [
      ["EPERM", "EPERM"],
      ["EACCES", "EPERM"],
      ["EROFS", "EPERM"],
      ["EIO", "EIO"],
      ["ENOMEM", "ENOMEM"],
      ["EINVAL", "EINVAL"],
      ["ENOSPC", "ENOSPC"],
      ["EDQUOT", "ENOSPC"],
      ["EFBIG", "ENOSPC"],
      ["EOVERFLOW", "EOVERFLOW"],
      ["ENOTSUP", "ENOTSUP"],
      ["EOPNOTSUPP", "ENOTSUP"],
      ["ESHUTDOWN", "ESHUTDOWN"],
      ["EBADF", "EIO"],
      ["ENOENT", "EIO"],
      ["EAGAIN", "EIO"],
    ];
    for (const [sys, expected] of table) {
      const original = sysErr(sys);
      const e = toBlockError(original);
      assert.ok(e instanceof BlockError);
      assert.equal(e.code, expected, sys);
      assert.equal(e.message, original.message);
      assert.equal(e.cause, original);
      assert.equal(e.name, "BlockError");
    }
  });

  test("a real fs error maps by its code", async () => {
    const fs = await import("node:fs");
    let caught: unknown;
    try {
      fs.openSync("/nonexistent-dir-drivetap/x", "r");
    } catch (err) {
      caught = err;
    }
    assert.ok(caught);
    assert.equal(toBlockError(caught).code, "EIO");
  });

  test("BlockErrors pass through unchanged; anything else becomes EIO", () => {
    const be = new BlockError("ENOSPC", "full");
    assert.equal(toBlockError(be), be);
    assert.equal(toBlockError(new Error("plain")).code, "EIO");
    assert.equal(toBlockError(new Error("plain")).message, "plain");
    assert.equal(toBlockError("a string").code, "EIO");
    assert.equal(toBlockError("a string").message, "a string");
    assert.equal(toBlockError(null).code, "EIO");
    assert.equal(toBlockError(undefined).code, "EIO");
    assert.equal(toBlockError({ code: 5 }).code, "EIO", "numeric codes are not system codes");
    assert.equal(toBlockError({ code: "ENOSPC" }).code, "ENOSPC");
  });

  test("NBD_ERRNO holds the spec's numbers for every code", () => {
    assert.deepEqual(
      { ...NBD_ERRNO },
      {
        EPERM: 1,
        EIO: 5,
        ENOMEM: 12,
        EINVAL: 22,
        ENOSPC: 28,
        EOVERFLOW: 75,
        ENOTSUP: 95,
        ESHUTDOWN: 108,
        // Not in the spec's list: an unreachable remote target reaches our own clients as EIO.
        ENOTCONN: 5,
      },
    );
    // What our NBD client receives maps back to the spec's codes; EIO stays EIO.
    for (const [code, errno] of Object.entries(NBD_ERRNO)) {
      assert.equal(fromNbdErrno(errno), code === "ENOTCONN" ? "EIO" : code);
    }
    assert.equal(fromNbdErrno(9999), "EIO");
  });

  test("fromLinuxErrno inverts NBD_ERRNO and maps unknown numbers to EIO", () => {
    for (const [code, errno] of Object.entries(NBD_ERRNO)) {
      if (code === "ENOTCONN") continue; // shares EIO's number on the wire
      const e = fromLinuxErrno(errno, "op");
      assert.equal(e.code, code);
      assert.match(e.message, new RegExp(`^op: errno ${errno}$`));
    }
    assert.equal(fromLinuxErrno(2, "open").code, "EIO");
    assert.equal(fromLinuxErrno(9999, "x").code, "EIO");
  });
});
