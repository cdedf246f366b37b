/**
 * Object commands: object-add and object-del with QEMU 7.2's arguments (qapi/qom.json). drivetap
 * creates TLS credentials (`tls-creds-x509`, `tls-creds-psk`) and authorization objects
 * (`authz-simple`, `authz-list`); every other type QEMU knows is refused by name, and a type QEMU
 * does not know gets QEMU's enum error.
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
import { QmpError } from "../errors.js";
import type { ArgsSpec } from "../schema.js";
import { defineCommand, type QmpCommandDef } from "../server.js";

function isSupported(type: string): type is SupportedObjectType {
  return (SUPPORTED_OBJECT_TYPES as readonly string[]).includes(type);
}

const POLICIES = ["deny", "allow"] as const;

/**
 * The members of every supported type's properties (TlsCredsX509/PskProperties,
 * AuthzSimpleProperties, AuthzListProperties); which apply to which type is checked in the handler,
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
} as const satisfies ArgsSpec;

const TLS_TYPES: readonly SupportedObjectType[] = ["tls-creds-x509", "tls-creds-psk"];
/** Which types each member belongs to (qom-type and id belong to all). */
const MEMBER_TYPES: Readonly<Record<string, readonly SupportedObjectType[]>> = {
  dir: TLS_TYPES,
  endpoint: TLS_TYPES,
  "verify-peer": TLS_TYPES,
  priority: TLS_TYPES,
  username: ["tls-creds-psk"],
  "sanity-check": ["tls-creds-x509"],
  passwordid: ["tls-creds-x509"],
  identity: ["authz-simple"],
  policy: ["authz-list"],
  rules: ["authz-list"],
};

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
        for (const [member, owners] of Object.entries(MEMBER_TYPES)) {
          if (member in args && !owners.includes(type)) {
            throw new QmpError("GenericError", `Parameter '${member}' is unexpected`);
          }
        }
        if (args.priority !== undefined) {
          throw new QmpError(
            "GenericError",
            "drivetap does not support 'priority' (a GnuTLS priority string)",
          );
        }
        if (args.passwordid !== undefined) {
          throw new QmpError("GenericError", "drivetap does not support encrypted keys ('passwordid')");
        }
        if (graph.objects.get(args.id)) {
          // Before loading, so a duplicate id is reported as such even when its files are missing.
          throw new QmpError(
            "GenericError",
            `attempt to add duplicate property '${args.id}' to object (type 'container')`,
          );
        }
        try {
          let object: UserObject;
          if (type === "authz-simple") object = authzSimple(args.id, args.identity);
          else if (type === "authz-list") {
            const rules: AuthzRule[] | undefined = args.rules?.map((r) => ({
              match: r.match,
              policy: r.policy,
              format: r.format ?? "exact",
            }));
            object = authzList(args.id, args.policy, rules);
          } else {
            object = loadTlsCreds(args.id, type, {
              dir: args.dir,
              endpoint: args.endpoint,
              verifyPeer: args["verify-peer"],
              username: args.username,
            });
          }
          graph.objects.add(object);
        } catch (err) {
          if (err instanceof ObjectError || err instanceof AuthzError) {
            throw new QmpError("GenericError", err.message);
          }
          throw err;
        }
        return {};
      },
    }),
    defineCommand({
      name: "object-del",
      args: { id: { type: "str" } },
      handler: (args) => {
        try {
          graph.objects.remove(args.id);
        } catch (err) {
          if (err instanceof ObjectError) throw new QmpError("GenericError", err.message);
          throw err;
        }
        return {};
      },
    }),
  ];
}
