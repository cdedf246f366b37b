/**
 * QEMU's authorization objects, as the NBD server's `tls-authz` uses them: `authz-simple` (one
 * identity) and `authz-list` (ordered rules, each an exact name or a glob, and a default policy).
 * The identity checked is the client certificate's RFC 2253 subject DN or the PSK identity. The
 * objects are immutable once added: QEMU lets a monitor edit a list's rules later, drivetap does not.
 */
import type { PeerAuthz } from "../nbd/server/tls-upgrade.js";

/** Rules one authz-list may hold: each identity check walks them all. */
export const AUTHZ_RULES_MAX = 256;
/** Length of an identity or a rule's match; an RFC 2253 DN is far shorter. */
export const AUTHZ_MATCH_CHARS_MAX = 4096;

export type AuthzPolicy = "allow" | "deny";
export type AuthzFormat = "exact" | "glob";

export interface AuthzRule {
  readonly match: string;
  readonly policy: AuthzPolicy;
  readonly format: AuthzFormat;
}

export interface AuthzObject extends PeerAuthz {
  readonly id: string;
  readonly qomType: "authz-simple" | "authz-list";
}

/** An authz property that does not fit; messages are QEMU's where it has one. */
export class AuthzError extends Error {}

function checkLength(what: string, value: string): void {
  if (value.length > AUTHZ_MATCH_CHARS_MAX) {
    throw new AuthzError(`Parameter '${what}' is longer than ${AUTHZ_MATCH_CHARS_MAX} characters`);
  }
}

export function authzSimple(id: string, identity: string | undefined): AuthzObject {
  if (identity === undefined) throw new AuthzError("Parameter 'identity' is missing");
  checkLength("identity", identity);
  return {
    id,
    qomType: "authz-simple",
    source: `authz-simple '${id}'`,
    allows: (peer) => peer === identity,
    describe: () => `authz-simple '${id}'`,
  };
}

export function authzList(
  id: string,
  policy: AuthzPolicy | undefined,
  rules: readonly AuthzRule[] | undefined,
): AuthzObject {
  const list = rules ?? [];
  if (list.length > AUTHZ_RULES_MAX) {
    throw new AuthzError(`Parameter 'rules' holds more than ${AUTHZ_RULES_MAX} rules`);
  }
  list.forEach((r, i) => checkLength(`rules[${i}].match`, r.match));
  // QEMU's default: whatever no rule matches is refused.
  const otherwise = policy ?? "deny";
  return {
    id,
    qomType: "authz-list",
    source: `the rules of authz-list '${id}'`,
    allows: (peer) => {
      if (peer.length > AUTHZ_MATCH_CHARS_MAX) return false;
      const rule = list.find((r) => (r.format === "glob" ? globMatch(r.match, peer) : r.match === peer));
      return (rule?.policy ?? otherwise) === "allow";
    },
    describe: () => `authz-list '${id}' (${list.length} rules, default ${otherwise})`,
  };
}

/**
 * fnmatch(3) with no flags, which QEMU's glob rules use: `*` matches any run (slashes and leading
 * dots included), `?` one character, `[...]` a set (`!` or `^` negates, `a-z` ranges), and `\`
 * quotes the next character. Greedy with one backtrack point, so O(pattern x text) at worst.
 */
export function globMatch(pattern: string, text: string): boolean {
  let p = 0;
  let t = 0;
  let starP = -1;
  let starT = 0;
  while (t < text.length) {
    if (p < pattern.length) {
      const c = pattern[p];
      if (c === "*") {
        starP = ++p;
        starT = t;
        continue;
      }
      if (c === "?") {
        p++;
        t++;
        continue;
      }
      if (c === "[") {
        const set = matchSet(pattern, p, text[t]);
        if (set !== null) {
          if (set.matched) {
            p = set.end;
            t++;
            continue;
          }
        } else if (text[t] === "[") {
          // An unclosed '[' is an ordinary character, as in fnmatch.
          p++;
          t++;
          continue;
        }
      } else {
        const literal = c === "\\" && p + 1 < pattern.length ? pattern[p + 1] : c;
        if (literal === text[t]) {
          p += c === "\\" && p + 1 < pattern.length ? 2 : 1;
          t++;
          continue;
        }
      }
    }
    if (starP < 0) return false;
    p = starP;
    t = ++starT;
  }
  while (p < pattern.length && pattern[p] === "*") p++;
  return p === pattern.length;
}

/** A bracket expression at `start`: whether `ch` is in it and where it ends; null if unclosed. */
function matchSet(pattern: string, start: number, ch: string): { matched: boolean; end: number } | null {
  let i = start + 1;
  const negate = pattern[i] === "!" || pattern[i] === "^";
  if (negate) i++;
  let matched = false;
  let first = true;
  while (i < pattern.length && (first || pattern[i] !== "]")) {
    first = false;
    let lo = pattern[i];
    if (lo === "\\" && i + 1 < pattern.length) lo = pattern[++i];
    let hi = lo;
    if (pattern[i + 1] === "-" && i + 2 < pattern.length && pattern[i + 2] !== "]") {
      hi = pattern[i + 2];
      if (hi === "\\" && i + 3 < pattern.length) hi = pattern[++i + 2];
      i += 2;
    }
    if (lo <= ch && ch <= hi) matched = true;
    i++;
  }
  if (i >= pattern.length) return null;
  return { matched: matched !== negate, end: i + 1 };
}
