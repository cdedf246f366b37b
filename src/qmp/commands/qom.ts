/**
 * qom-list, qom-get and qom-set over the objects object-add made, with QEMU's paths (`/objects/ID`,
 * or a partial path naming the object alone), property names, types and error texts. The only
 * property that can change after creation is a throttle group's `limits`, as in QEMU.
 */
import { applyLimits, configToLimits, type ThrottleLimits } from "../../core/throttle.js";
import type { BlockGraph } from "../../graph/block-graph.js";
import type { UserObject } from "../../graph/objects.js";
import { THROTTLE_FLAT_NAMES } from "../../graph/throttle-group-object.js";
import { QmpError } from "../errors.js";
import { validateArgs } from "../schema.js";
import { defineCommand, type QmpCommandDef } from "../server.js";
import { asQmpError, THROTTLE_LIMITS_SPEC } from "./objects.js";

const OBJECTS_PATH = "/objects";

interface Property {
  readonly name: string;
  /** The QOM type name qom-list shows. */
  readonly type: string;
  readonly value: () => unknown;
}

function propertiesOf(o: UserObject): Property[] {
  const props: Property[] = [{ name: "type", type: "string", value: () => o.qomType }];
  switch (o.qomType) {
    case "throttle-group": {
      const limits = (): Record<string, number> => configToLimits(o.group.config);
      props.push({ name: "limits", type: "ThrottleLimits", value: limits });
      for (const name of THROTTLE_FLAT_NAMES) {
        props.push({ name, type: "int", value: () => limits()[name.slice(2)] });
      }
      break;
    }
    case "secret": {
      const p = o.properties;
      props.push(
        { name: "iv", type: "string", value: () => p.iv ?? "" },
        { name: "keyid", type: "string", value: () => p.keyid ?? "" },
        { name: "loaded", type: "bool", value: () => true },
        { name: "format", type: "QCryptoSecretFormat", value: () => p.format ?? "raw" },
        { name: "file", type: "string", value: () => p.file ?? "" },
        { name: "data", type: "string", value: () => p.data ?? "" },
      );
      break;
    }
    case "authz-simple":
    case "authz-list":
      // Immutable once added (graph/authz.ts): only the type is listed.
      break;
    default:
      props.push(
        {
          name: "dir",
          type: "string",
          // A PSK object's dir is the one holding its keys.psk.
          value: () => (o.creds.kind === "x509" ? o.creds.dir : o.creds.file.replace(/\/keys\.psk$/, "")),
        },
        { name: "endpoint", type: "QCryptoTLSCredsEndpoint", value: () => o.creds.endpoint },
      );
  }
  return props;
}

/** What a path names: the objects container or one object. */
type Target = { kind: "container" } | { kind: "object"; object: UserObject };

function resolve(graph: BlockGraph, path: string): Target {
  if (path === OBJECTS_PATH || path === "objects") return { kind: "container" };
  const id = path.startsWith(`${OBJECTS_PATH}/`)
    ? path.slice(OBJECTS_PATH.length + 1)
    : path.startsWith("/")
      ? undefined
      : path;
  const object = id === undefined ? undefined : graph.objects.get(id);
  if (!object) throw new QmpError("DeviceNotFound", `Device '${path}' not found`);
  return { kind: "object", object };
}

function findProperty(o: UserObject, name: string): Property {
  const p = propertiesOf(o).find((q) => q.name === name);
  if (!p) throw new QmpError("GenericError", `Property '${o.qomType}.${name}' not found`);
  return p;
}

export function qomCommands(graph: BlockGraph): QmpCommandDef[] {
  return [
    defineCommand({
      name: "qom-list",
      args: { path: { type: "str" } },
      handler: (args) => {
        if (args.path === "/") {
          return [
            { name: "type", type: "string" },
            { name: "objects", type: "child<container>" },
          ];
        }
        const t = resolve(graph, args.path);
        if (t.kind === "container") {
          return [
            { name: "type", type: "string" },
            ...graph.objects.list().map((o) => ({ name: o.id, type: `child<${o.qomType}>` })),
          ];
        }
        return propertiesOf(t.object).map((p) => ({ name: p.name, type: p.type }));
      },
    }),
    defineCommand({
      name: "qom-get",
      args: { path: { type: "str" }, property: { type: "str" } },
      handler: (args) => {
        const t = resolve(graph, args.path);
        if (t.kind === "container") {
          if (args.property === "type") return "container";
          const child = graph.objects.get(args.property);
          if (!child) throw new QmpError("GenericError", `Property 'container.${args.property}' not found`);
          return `${OBJECTS_PATH}/${child.id}`;
        }
        return findProperty(t.object, args.property).value();
      },
    }),
    defineCommand({
      name: "qom-set",
      args: { path: { type: "str" }, property: { type: "str" }, value: { type: "any" } },
      handler: (args) => {
        const t = resolve(graph, args.path);
        if (t.kind === "container") {
          throw new QmpError("GenericError", `Property 'container.${args.property}' is not writable`);
        }
        const o = t.object;
        const p = findProperty(o, args.property);
        if (o.qomType === "throttle-group" && p.name === "limits") {
          // Members not given keep their value; new limits start with empty buckets (QEMU's behaviour).
          const limits = validateArgs(THROTTLE_LIMITS_SPEC, args.value, "limits") as ThrottleLimits;
          o.group.setConfig(asQmpError(() => applyLimits(o.group.config, limits)));
          return {};
        }
        if (p.name === "type")
          throw new QmpError("GenericError", `Property '${o.qomType}.type' is not writable`);
        if (o.qomType === "throttle-group") {
          throw new QmpError("GenericError", "Property cannot be set after initialization");
        }
        throw new QmpError(
          "GenericError",
          `drivetap cannot change '${o.qomType}.${p.name}' of an existing object`,
        );
      },
    }),
  ];
}
