// Builds the small fallocate/lseek addon with the node-gyp that ships with npm. A failed build is not
// fatal: the file driver then emulates discard and write-zeroes and reports everything as data (see
// docs/ARCHITECTURE.md); `drivetap serve --verbose` logs which mode it runs in, and a test asserts the
// addon loaded so CI notices.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { dirname, join } from "node:path";

const candidates = [
  process.env.npm_config_node_gyp,
  join(dirname(process.execPath), "../lib/node_modules/npm/node_modules/node-gyp/bin/node-gyp.js"),
].filter((p) => p && existsSync(p));

// Build against the headers of the running Node when they are installed (Debian's nodejs puts them in
// /usr/include/node); otherwise node-gyp would try to download them, and this machine has no network.
const nodedir =
  process.env.npm_config_nodedir ??
  (existsSync(join(dirname(process.execPath), "../include/node/common.gypi"))
    ? join(dirname(process.execPath), "..")
    : undefined);
const args = ["rebuild", ...(nodedir ? [`--nodedir=${nodedir}`] : [])];
const result =
  candidates.length > 0
    ? spawnSync(process.execPath, [candidates[0], ...args], { stdio: "inherit" })
    : spawnSync("node-gyp", args, { stdio: "inherit", shell: true });
if (result.status !== 0) {
  console.warn("drivetap: native addon did not build; falling back to portable file I/O");
}
