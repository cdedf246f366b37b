/**
 * The README's examples, run as a user runs them: the shell blocks of a section pasted into a plain
 * bash reading commands from standard input, in a fresh directory, with `npx drivetap` finding the
 * built CLI. A README example that stops working fails a test.
 */
import assert from "node:assert/strict";
import { mkdirSync, readdirSync, readFileSync, symlinkSync } from "node:fs";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { CLI, REPO_ROOT } from "./daemon.js";
import { run, tempDir, type RunResult } from "./run.js";

const SCENARIO_TIMEOUT_MS = 180_000;
/** How long a pasted script's daemons may take to exit after it has stopped them. */
const DAEMON_EXIT_MS = 15_000;

/** The environment without $DRIVETAP_QMP, so every socket the CLI uses is the one a test chose. */
function cleanEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env, ...extra };
  if (!("DRIVETAP_QMP" in extra)) delete env.DRIVETAP_QMP;
  return env;
}

/** The shell blocks of a README section, in order. */
export function readmeSection(heading: string): string {
  const readme = readFileSync(join(REPO_ROOT, "README.md"), "utf8");
  const start = readme.indexOf(`${heading}\n`);
  assert.ok(start >= 0, `README has "${heading}"`);
  const next = readme.indexOf("\n## ", start + heading.length);
  const section = readme.slice(start, next < 0 ? undefined : next);
  const blocks = [...section.matchAll(/^```sh\n([\s\S]*?)^```$/gm)].map((m) => m[1]);
  return blocks.join("");
}

/** Pids of processes whose command line mentions text (a test's unique temp directory). */
function processesMentioning(text: string): number[] {
  const pids: number[] = [];
  for (const name of readdirSync("/proc")) {
    if (!/^\d+$/.test(name) || Number(name) === process.pid) continue;
    try {
      if (readFileSync(`/proc/${name}/cmdline`, "utf8").includes(text)) pids.push(Number(name));
    } catch {
      // Gone meanwhile.
    }
  }
  return pids;
}

/**
 * Pastes a README script into a plain bash reading its commands from standard input, as a terminal
 * would. Only the directory changes: /tmp/x becomes <fresh dir>/x, so runs never collide. Returns the
 * terminal's output without escape sequences and carriage returns.
 */
export async function pasteIntoShell(
  t: TestContext,
  script: string,
): Promise<{ dir: string; out: string; r: RunResult }> {
  const dir = tempDir(t, "drivetap-readme-");
  t.after(() => {
    for (const pid of processesMentioning(dir)) process.kill(pid, "SIGKILL");
  });
  const home = join(dir, "home");
  mkdirSync(join(home, "node_modules/.bin"), { recursive: true });
  // `npx drivetap` in this directory finds the built CLI, as it does in the repository after npm ci.
  symlinkSync(CLI, join(home, "node_modules/.bin/drivetap"));
  const r = await run("bash", ["--norc", "--noprofile"], {
    cwd: home,
    env: cleanEnv({
      HOME: home,
      TERM: "dumb",
      // Never fetch a package: the local CLI must be what runs.
      npm_config_offline: "true",
      npm_config_update_notifier: "false",
    }),
    input: script.replaceAll("/tmp/", `${dir}/`),
    timeoutMs: SCENARIO_TIMEOUT_MS,
  });
  // eslint-disable-next-line no-control-regex
  const out = r.stdout.replace(/\x1b\[[0-9;?]*[A-Za-z]/g, "").replace(/\r/g, "\n");
  return { dir, out, r };
}

/** The pasted script stopped its daemons; they are not our children, so only /proc can tell. */
export async function assertNothingLeft(dir: string): Promise<void> {
  const deadline = Date.now() + DAEMON_EXIT_MS;
  while (processesMentioning(dir).length > 0 && Date.now() < deadline) {
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.deepEqual(processesMentioning(dir), [], "no process of the pasted script is left running");
}
