/** Promise forms of the positional fs calls the file and journal drivers run on the threadpool. */
import * as fs from "node:fs";

export function readAsync(fd: number, into: Buffer, offset: number, position: number): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.read(fd, into, offset, into.length - offset, position, (err, n) => (err ? reject(err) : resolve(n))),
  );
}

export function writevAsync(fd: number, data: readonly Buffer[], position: number): Promise<number> {
  return new Promise((resolve, reject) =>
    fs.writev(fd, data as Buffer[], position, (err, n) => (err ? reject(err) : resolve(n))),
  );
}

export function fdatasyncAsync(fd: number): Promise<void> {
  return new Promise((resolve, reject) => fs.fdatasync(fd, (err) => (err ? reject(err) : resolve())));
}

/** The buffers left after skipping `skip` bytes of `data` (for short writes). */
export function remainingIov(data: readonly Buffer[], skip: number): Buffer[] {
  const out: Buffer[] = [];
  for (const b of data) {
    if (skip >= b.length) skip -= b.length;
    else {
      out.push(skip > 0 ? b.subarray(skip) : b);
      skip = 0;
    }
  }
  return out;
}
