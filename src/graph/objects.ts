/**
 * User-created objects (QMP `object-add` / `object-del`): TLS credentials, which nbd nodes and the
 * NBD server name by id in `tls-creds`; authorization objects (authz.ts), which the NBD server names
 * in `tls-authz`; throttle groups (throttle-group-object.ts), which throttle nodes name in
 * `throttle-group`; and secrets (secret.ts). Credentials are loaded and checked when the object is added, so
 * a missing file or a key that does not fit its certificate is reported then, naming the file, and
 * every later connect (and reconnect) uses what was loaded. The registry knows which nodes use an
 * object, so an object in use cannot be deleted under them.
 */
import * as tls from "node:tls";
import {
  clientTlsOptions,
  loadPsk,
  loadX509,
  serverTlsOptions,
  TlsCredentialsError,
  type TlsCredentials,
  type TlsEndpoint,
} from "../nbd/tls/credentials.js";
import type { AuthzObject } from "./authz.js";
import type { SecretObject } from "./secret.js";
import type { ThrottleGroupObject } from "./throttle-group-object.js";

/** An object operation refused for a reason the user can fix; messages are QEMU's where it has one. */
export class ObjectError extends Error {}

/** QEMU 7.2's ObjectType: the values `qom-type` accepts at all (qapi/qom.json). */
export const QEMU_OBJECT_TYPES = [
  "authz-list",
  "authz-listfile",
  "authz-pam",
  "authz-simple",
  "can-bus",
  "can-host-socketcan",
  "colo-compare",
  "cryptodev-backend",
  "cryptodev-backend-builtin",
  "cryptodev-vhost-user",
  "dbus-vmstate",
  "filter-buffer",
  "filter-dump",
  "filter-mirror",
  "filter-redirector",
  "filter-replay",
  "filter-rewriter",
  "input-barrier",
  "input-linux",
  "iothread",
  "memory-backend-file",
  "memory-backend-memfd",
  "memory-backend-ram",
  "pef-guest",
  "pr-manager-helper",
  "rng-builtin",
  "rng-egd",
  "rng-random",
  "secret",
  "secret_keyring",
  "sev-guest",
  "s390-pv-guest",
  "throttle-group",
  "tls-creds-anon",
  "tls-creds-psk",
  "tls-creds-x509",
  "tls-cipher-suites",
  "x-remote-object",
] as const;

/** The object types drivetap can create. */
export const SUPPORTED_OBJECT_TYPES = [
  "tls-creds-x509",
  "tls-creds-psk",
  "authz-simple",
  "authz-list",
  "throttle-group",
  "secret",
] as const;
export type SupportedObjectType = (typeof SUPPORTED_OBJECT_TYPES)[number];
export type TlsCredsType = "tls-creds-x509" | "tls-creds-psk";

/** Objects held at once; each is a few certificates, a group's buckets or a secret of at most 64 KiB. */
export const OBJECTS_MAX = 1024;
/** QEMU's rule for object ids (id_wellformed): a letter, then letters, digits, '-', '.', '_'. */
const OBJECT_ID_PATTERN = /^[A-Za-z][A-Za-z0-9_.-]{0,127}$/;

export interface TlsCredsObject {
  readonly id: string;
  readonly qomType: TlsCredsType;
  readonly creds: TlsCredentials;
}

/** What `object-add` of a TLS credentials type carries (QEMU's TlsCredsX509/PskProperties). */
export interface TlsCredsProperties {
  readonly dir?: string;
  readonly endpoint?: TlsEndpoint;
  readonly verifyPeer?: boolean;
  readonly username?: string;
}

export type UserObject = TlsCredsObject | AuthzObject | ThrottleGroupObject | SecretObject;

interface Entry {
  readonly object: UserObject;
  /** user id ("node:tgt") -> why ("node tgt") */
  readonly users: Map<string, string>;
}

/**
 * Loads credentials as QEMU's objects do: x509 `dir` with ca-cert.pem, {client,server}-cert.pem
 * and -key.pem; psk `dir` with keys.psk. A certificate and key that do not belong together, or a
 * PEM that does not parse, is found here by building the TLS context once.
 */
export function loadTlsCreds(id: string, qomType: TlsCredsType, p: TlsCredsProperties): TlsCredsObject {
  if (p.dir === undefined) throw new ObjectError("Missing 'dir' property value");
  const endpoint = p.endpoint ?? "client";
  let creds: TlsCredentials;
  try {
    creds =
      qomType === "tls-creds-x509"
        ? loadX509(p.dir, endpoint, p.verifyPeer ?? true)
        : loadPsk(p.dir, endpoint, p.username);
  } catch (err) {
    if (err instanceof TlsCredentialsError) throw new ObjectError(`${qomType} '${id}': ${err.message}`);
    throw err;
  }
  if (creds.kind === "x509") {
    try {
      tls.createSecureContext(endpoint === "client" ? clientTlsOptions(creds) : serverTlsOptions(creds));
    } catch (err) {
      const own = `${creds.dir}/${endpoint}-cert.pem and ${endpoint}-key.pem`;
      const why = (err as Error).message;
      const hint = /key values mismatch/i.test(why)
        ? `the key in ${own} does not match the certificate`
        : why;
      throw new ObjectError(`${qomType} '${id}': cannot use the credentials in ${creds.dir}: ${hint}`);
    }
  }
  return { id, qomType, creds };
}

export class ObjectRegistry {
  readonly #objects = new Map<string, Entry>();

  add(object: UserObject): void {
    if (!OBJECT_ID_PATTERN.test(object.id)) {
      throw new ObjectError(`Parameter 'id' expects an identifier`);
    }
    if (this.#objects.has(object.id)) {
      // QEMU adds the object as a child property of /objects, a 'container'.
      throw new ObjectError(`attempt to add duplicate property '${object.id}' to object (type 'container')`);
    }
    if (this.#objects.size >= OBJECTS_MAX) throw new ObjectError(`at most ${OBJECTS_MAX} objects`);
    this.#objects.set(object.id, { object, users: new Map() });
  }

  get(id: string): UserObject | undefined {
    return this.#objects.get(id)?.object;
  }

  list(): UserObject[] {
    return [...this.#objects.values()].map((e) => e.object);
  }

  /** The credentials a user at `endpoint` may use, with QEMU's texts when they do not fit. */
  tlsCreds(id: string, endpoint: TlsEndpoint): TlsCredsObject {
    const o = this.#objects.get(id)?.object;
    if (!o) throw new ObjectError(`No TLS credentials with id '${id}'`);
    if (!("creds" in o)) throw new ObjectError(`Object with id '${id}' is not TLS credentials`);
    if (o.creds.endpoint !== endpoint) {
      throw new ObjectError(`Expected TLS credentials for a ${endpoint} endpoint`);
    }
    return o;
  }

  /** The authorization object `tls-authz` names (QEMU finds it only at connect time, drivetap at once). */
  authz(id: string): AuthzObject {
    const o = this.#objects.get(id)?.object;
    if (!o) throw new ObjectError(`Cannot find QAuthZ object '${id}'`);
    if (!("allows" in o)) throw new ObjectError(`Object '${id}' is not a QAuthZ subclass`);
    return o;
  }

  /** The throttle group a throttle node names, with QEMU's text when there is none of that id. */
  throttleGroup(id: string): ThrottleGroupObject {
    const o = this.#objects.get(id)?.object;
    if (o?.qomType !== "throttle-group") throw new ObjectError(`Throttle group '${id}' does not exist`);
    return o;
  }

  claim(id: string, user: string, why: string): void {
    const e = this.#objects.get(id);
    if (!e) throw new ObjectError(`object '${id}' not found`);
    e.users.set(user, why);
  }

  release(id: string, user: string): void {
    this.#objects.get(id)?.users.delete(user);
  }

  usersOf(id: string): string[] {
    return [...(this.#objects.get(id)?.users.values() ?? [])];
  }

  /** object-del: refused while a node uses the object. */
  remove(id: string): void {
    const e = this.#objects.get(id);
    if (!e) throw new ObjectError(`object '${id}' not found`);
    if (e.users.size > 0) {
      throw new ObjectError(
        `object '${id}' is in use, can not be deleted: used by ${[...e.users.values()].join(", ")}`,
      );
    }
    this.#objects.delete(id);
  }
}
