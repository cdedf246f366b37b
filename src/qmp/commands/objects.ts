/**
 * Object commands: object-add and object-del with QEMU 7.2's arguments (qapi/qom.json). drivetap
 * creates TLS credentials (`tls-creds-x509`, `tls-creds-psk`), authorization objects (`authz-simple`,
 * `authz-list`), throttle groups and secrets; every other type QEMU knows is refused by name, and a
 * type QEMU does not know gets QEMU's enum error.
 */
import { AuthzError, authzList, authzSimple, type AuthzRule } from "../../graph/authz.js";
import type { BlockGraph } from "../../graph/block-graph.js";
import {
  loadTlsCreds,
  ObjectError,
  QEMU_OBJECT_TYPES,
  SUPPORTED_OBJECT_TYPES,
  type SupportedObjectType,
  type UserObject,
} from "../../graph/objects.js";
import { loadSecret, SecretError, type SecretFormat } from "../../graph/secret.js";
import { createThrottleGroup, THROTTLE_FLAT_NAMES } from "../../graph/throttle-group-object.js";
import { THROTTLE_LIMIT_NAMES, ThrottleConfigError } from "../../core/throttle.js";
import { QmpError } from "../errors.js";
import type { ArgsSpec, FieldSpec } from "../schema.js";
import { defineCommand, type QmpCommandDef } from "../server.js";

function isSupported(type: string): type is SupportedObjectType {
  return (SUPPORTED_OBJECT_TYPES as readonly string[]).includes(type);
}

const optionalInt: FieldSpec = { type: "int", optional: true };

/** QEMU's ThrottleLimits: every member an optional integer (ranges are checked with QEMU's texts later). */
export const THROTTLE_LIMITS_SPEC: ArgsSpec = Object.fromEntries(
  THROTTLE_LIMIT_NAMES.map((n) => [n, optionalInt]),
);

const POLICIES = ["deny", "allow"] as const;

const tlsMembers = ["dir", "endpoint", "verify-peer", "priority"];
/** Which members each creatable type takes, beyond qom-type and id (QEMU's union branches). */
const MEMBERS: Readonly<Record<SupportedObjectType, readonly string[]>> = {
  "tls-creds-x509": [...tlsMembers, "sanity-check", "passwordid"],
  "tls-creds-psk": [...tlsMembers, "username"],
  "authz-simple": ["identity"],
  "authz-list": ["policy", "rules"],
  "throttle-group": ["limits", ...THROTTLE_FLAT_NAMES],
  secret: ["data", "file", "format", "keyid", "iv", "loaded"],
};

/**
 * The members of every branch (TlsCredsX509/PskProperties, AuthzSimple/ListProperties,
 * ThrottleGroupProperties, SecretProperties); which apply to which type is checked in the handler,
 * as QEMU's union would. Exported for the command line's `--object`, which QSD types by this schema.
 */
export const objectAddArgs = {
  "qom-type": { type: "enum", values: QEMU_OBJECT_TYPES },
  id: { type: "str" },
  dir: { type: "str", optional: true },
  endpoint: { type: "enum", values: ["client", "server"], optional: true },
  "verify-peer": { type: "bool", optional: true },
  priority: { type: "str", optional: true },
  username: { type: "str", optional: true },
  "sanity-check": { type: "bool", optional: true },
  passwordid: { type: "str", optional: true },
  identity: { type: "str", optional: true },
  policy: { type: "enum", values: POLICIES, optional: true },
  rules: {
    type: "array",
    optional: true,
    items: {
      type: "object",
      fields: {
        match: { type: "str" },
        policy: { type: "enum", values: POLICIES },
        format: { type: "enum", values: ["exact", "glob"], optional: true },
      },
    },
  },
  limits: { type: "object", fields: THROTTLE_LIMITS_SPEC, optional: true },
  ...(Object.fromEntries(THROTTLE_FLAT_NAMES.map((n) => [n, optionalInt])) as Record<
    string,
    typeof optionalInt
  >),
  data: { type: "str", optional: true },
  file: { type: "str", optional: true },
  format: { type: "enum", values: ["raw", "base64"], optional: true },
  keyid: { type: "str", optional: true },
  iv: { type: "str", optional: true },
  loaded: { type: "bool", optional: true },
} as const;

/** Runs `f`, turning the graph's refusals into QMP's GenericError with their text. */
export function asQmpError<T>(f: () => T): T {
  try {
    return f();
  } catch (err) {
    if (
      err instanceof ObjectError ||
      err instanceof AuthzError ||
      err instanceof ThrottleConfigError ||
      err instanceof SecretError
    ) {
      throw new QmpError("GenericError", err.message);
    }
    throw err;
  }
}

function create(graph: BlockGraph, type: SupportedObjectType, args: Record<string, unknown>): UserObject {
  const id = args.id as string;
  switch (type) {
    case "tls-creds-x509":
    case "tls-creds-psk":
      if (args.priority !== undefined) {
        throw new QmpError("GenericError", "drivetap does not support 'priority' (a GnuTLS priority string)");
      }
      if (args.passwordid !== undefined) {
        throw new QmpError("GenericError", "drivetap does not support encrypted keys ('passwordid')");
      }
      return loadTlsCreds(id, type, {
        dir: args.dir as string | undefined,
        endpoint: args.endpoint as "client" | "server" | undefined,
        verifyPeer: args["verify-peer"] as boolean | undefined,
        username: args.username as string | undefined,
      });
    case "authz-simple":
      return authzSimple(id, args.identity as string | undefined);
    case "authz-list": {
      const rules = args.rules as
        Array<{ match: string; policy: AuthzRule["policy"]; format?: AuthzRule["format"] }> | undefined;
      return authzList(
        id,
        args.policy as AuthzRule["policy"] | undefined,
        rules?.map((r) => ({ match: r.match, policy: r.policy, format: r.format ?? "exact" })),
      );
    }
    case "throttle-group":
      return createThrottleGroup(
        id,
        args.limits as Record<string, number> | undefined,
        args as Record<string, number | undefined>,
      );
    case "secret":
      // QEMU reports whether it loaded; setting it is refused by name.
      if (args.loaded !== undefined) throw new ObjectError("Property 'secret.loaded' is not writable");
      return loadSecret(
        id,
        {
          data: args.data as string | undefined,
          file: args.file as string | undefined,
          format: args.format as SecretFormat | undefined,
          keyid: args.keyid as string | undefined,
          iv: args.iv as string | undefined,
        },
        (keyId) => {
          const key = graph.objects.get(keyId);
          return key?.qomType === "secret" ? key.value : undefined;
        },
      );
  }
}

export function objectCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "object-add",
      args: objectAddArgs,
      handler: (args) => {
        const type = args["qom-type"];
        if (!isSupported(type)) {
          throw new QmpError(
            "GenericError",
            `drivetap cannot create objects of type '${type}' (only ${SUPPORTED_OBJECT_TYPES.join(", ")})`,
          );
        }
        for (const member of Object.keys(args)) {
          if (member !== "qom-type" && member !== "id" && !MEMBERS[type].includes(member)) {
            throw new QmpError("GenericError", `Parameter '${member}' is unexpected`);
          }
        }
        if (graph.objects.get(args.id)) {
          // Before loading, so a duplicate id is reported as such even when its files are missing.
          throw new QmpError(
            "GenericError",
            `attempt to add duplicate property '${args.id}' to object (type 'container')`,
          );
        }
        asQmpError(() => graph.objects.add(create(graph, type, args as Record<string, unknown>)));
        return {};
      },
    }),
    defineCommand({
      name: "object-del",
      args: { id: { type: "str" } },
      handler: (args) => {
        asQmpError(() => graph.objects.remove(args.id));
        return {};
      },
    }),
  ];
}
