/**
 * Object commands: object-add and object-del with QEMU 7.2's arguments (qapi/qom.json). drivetap
 * creates TLS credentials only (`tls-creds-x509`, `tls-creds-psk`); every other type QEMU knows is
 * refused by name, and a type QEMU does not know gets QEMU's enum error.
 */
import type { BlockGraph } from "../../graph/block-graph.js";
import {
  loadTlsCreds,
  ObjectError,
  QEMU_OBJECT_TYPES,
  SUPPORTED_OBJECT_TYPES,
  type TlsCredsType,
} from "../../graph/objects.js";
import { QmpError } from "../errors.js";
import { defineCommand, type QmpCommandDef } from "../server.js";

function isSupported(type: string): type is TlsCredsType {
  return (SUPPORTED_OBJECT_TYPES as readonly string[]).includes(type);
}

export function objectCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "object-add",
      // The members of TlsCredsX509Properties and TlsCredsPskProperties; which apply to which type is
      // checked below, as QEMU's union would.
      args: {
        "qom-type": { type: "enum", values: QEMU_OBJECT_TYPES },
        id: { type: "str" },
        dir: { type: "str", optional: true },
        endpoint: { type: "enum", values: ["client", "server"], optional: true },
        "verify-peer": { type: "bool", optional: true },
        priority: { type: "str", optional: true },
        username: { type: "str", optional: true },
        "sanity-check": { type: "bool", optional: true },
        passwordid: { type: "str", optional: true },
      },
      handler: (args) => {
        const type = args["qom-type"];
        if (!isSupported(type)) {
          throw new QmpError(
            "GenericError",
            `drivetap cannot create objects of type '${type}' (only ${SUPPORTED_OBJECT_TYPES.join(", ")})`,
          );
        }
        const onlyFor: Record<string, TlsCredsType> = {
          username: "tls-creds-psk",
          "sanity-check": "tls-creds-x509",
          passwordid: "tls-creds-x509",
        };
        for (const [member, owner] of Object.entries(onlyFor)) {
          if (member in args && owner !== type) {
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
          graph.objects.add(
            loadTlsCreds(args.id, type, {
              dir: args.dir,
              endpoint: args.endpoint,
              verifyPeer: args["verify-peer"],
              username: args.username,
            }),
          );
        } catch (err) {
          if (err instanceof ObjectError) throw new QmpError("GenericError", err.message);
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
