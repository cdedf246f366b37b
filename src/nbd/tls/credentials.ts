/**
 * TLS credentials for NBD, in the layouts QEMU and nbdkit use, turned into Node `tls` options.
 *
 * - x509: a directory with `ca-cert.pem` (and optionally `ca-crl.pem`), `server-cert.pem` +
 *   `server-key.pem` for a server, `client-cert.pem` + `client-key.pem` for a client (optional for a
 *   client unless the server verifies peers). QEMU's `tls-creds-x509` `dir`.
 * - PSK: a `keys.psk` file of `identity:hexkey` lines (QEMU's `tls-creds-psk` takes the directory
 *   holding it, nbdkit's `--tls-psk` the file). Node does TLS-PSK only up to TLS 1.2, with PSK
 *   cipher suites, so PSK contexts are pinned to TLS 1.2.
 *
 * Loading checks everything it can and throws TlsCredentialsError with a message a user can act on
 * (which file is missing or unreadable, which line of keys.psk is malformed).
 */
import * as fs from "node:fs";
import * as path from "node:path";
import * as tls from "node:tls";

export class TlsCredentialsError extends Error {}

export type TlsEndpoint = "server" | "client";

export interface X509Credentials {
  readonly kind: "x509";
  readonly endpoint: TlsEndpoint;
  readonly dir: string;
  /** Server: require and check a client certificate. Client: check the server's (QEMU default on). */
  readonly verifyPeer: boolean;
  readonly ca: Buffer;
  readonly crl?: Buffer;
  /** The own certificate and key; a client may have none. */
  readonly cert?: Buffer;
  readonly key?: Buffer;
}

export interface PskCredentials {
  readonly kind: "psk";
  readonly endpoint: TlsEndpoint;
  readonly file: string;
  /** identity -> key, in file order. */
  readonly keys: ReadonlyMap<string, Buffer>;
  /** Client: the identity to present (QEMU's `username`, default "qemu"). */
  readonly username?: string;
}

export type TlsCredentials = X509Credentials | PskCredentials;

/** QEMU's default PSK username for a client. */
export const DEFAULT_PSK_USERNAME = "qemu";
/** Node's PSK cipher suites (TLS 1.2); gnutls (qemu-nbd, libnbd) and OpenSSL (nbdkit) offer them. */
const PSK_CIPHERS =
  "ECDHE-PSK-AES256-CBC-SHA384:DHE-PSK-AES256-GCM-SHA384:PSK-AES256-GCM-SHA384:PSK-AES128-GCM-SHA256";
/** Longest keys.psk we read. */
const PSK_FILE_BYTES_MAX = 1024 * 1024;

function readPem(dir: string, name: string, required: boolean): Buffer | undefined {
  const file = path.join(dir, name);
  try {
    return fs.readFileSync(file);
  } catch (err) {
    const e = err as NodeJS.ErrnoException;
    if (!required && e.code === "ENOENT") return undefined;
    throw new TlsCredentialsError(`cannot read ${file}: ${e.code === "ENOENT" ? "no such file" : e.message}`);
  }
}

/** Loads x509 credentials from a QEMU-style directory. */
export function loadX509(dir: string, endpoint: TlsEndpoint, verifyPeer: boolean): X509Credentials {
  if (!fs.existsSync(dir) || !fs.statSync(dir).isDirectory()) {
    throw new TlsCredentialsError(`x509 credentials directory ${dir} does not exist`);
  }
  const ca = readPem(dir, "ca-cert.pem", verifyPeer);
  const crl = readPem(dir, "ca-crl.pem", false);
  const own = endpoint === "server" ? "server" : "client";
  const cert = readPem(dir, `${own}-cert.pem`, endpoint === "server");
  const key = readPem(dir, `${own}-key.pem`, endpoint === "server" || cert !== undefined);
  return { kind: "x509", endpoint, dir, verifyPeer, ca: ca ?? Buffer.alloc(0), crl, cert, key };
}

/**
 * Loads a PSK file (`identity:hexkey` lines; blank lines and lines starting with # are skipped).
 * `fileOrDir` may be the file or a directory holding `keys.psk` (QEMU's form).
 */
export function loadPsk(fileOrDir: string, endpoint: TlsEndpoint, username?: string): PskCredentials {
  let file = fileOrDir;
  try {
    if (fs.statSync(fileOrDir).isDirectory()) file = path.join(fileOrDir, "keys.psk");
  } catch {
    throw new TlsCredentialsError(`PSK file ${fileOrDir} does not exist`);
  }
  let text: string;
  try {
    const st = fs.statSync(file);
    if (st.size > PSK_FILE_BYTES_MAX) throw new TlsCredentialsError(`PSK file ${file} is too large`);
    text = fs.readFileSync(file, "utf8");
  } catch (err) {
    if (err instanceof TlsCredentialsError) throw err;
    throw new TlsCredentialsError(`cannot read PSK file ${file}: ${(err as Error).message}`);
  }
  const keys = new Map<string, Buffer>();
  text.split("\n").forEach((raw, i) => {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) return;
    const colon = line.indexOf(":");
    const identity = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (colon <= 0 || !/^([0-9a-fA-F]{2})+$/.test(hex)) {
      throw new TlsCredentialsError(`${file} line ${i + 1}: expected identity:hexkey`);
    }
    if (!keys.has(identity)) keys.set(identity, Buffer.from(hex, "hex"));
  });
  if (keys.size === 0) throw new TlsCredentialsError(`PSK file ${file} holds no keys`);
  const user = endpoint === "client" ? (username ?? DEFAULT_PSK_USERNAME) : username;
  if (endpoint === "client" && !keys.has(user!)) {
    throw new TlsCredentialsError(`PSK file ${file} has no key for username '${user}'`);
  }
  return { kind: "psk", endpoint, file, keys, username: user };
}

/** Who the peer is, for authorization (`--tls-authz`): the certificate's subject DN or the PSK identity. */
export interface TlsPeer {
  readonly kind: "x509" | "psk";
  readonly name: string;
}

/**
 * The PSK identity each server-side socket's client presented (known or not), recorded by the
 * pskCallback of serverTlsOptions: Node has no accessor for it. Weak: it goes with the socket.
 */
const pskIdentities = new WeakMap<tls.TLSSocket, string>();

/** The PSK identity a client presented on this server socket, even if the handshake then failed. */
export function offeredPskIdentity(socket: tls.TLSSocket): string | undefined {
  return pskIdentities.get(socket);
}

/** Node options for a server side TLSSocket (`new tls.TLSSocket(socket, {isServer: true, ...})`). */
export function serverTlsOptions(creds: TlsCredentials): tls.TLSSocketOptions & tls.SecureContextOptions {
  if (creds.endpoint !== "server") throw new TlsCredentialsError("client credentials used for a server");
  if (creds.kind === "psk") {
    return {
      isServer: true,
      ciphers: PSK_CIPHERS,
      minVersion: "TLSv1.2",
      maxVersion: "TLSv1.2",
      pskCallback: (socket: tls.TLSSocket, identity: string) => {
        pskIdentities.set(socket, identity);
        return creds.keys.get(identity) ?? null;
      },
    } as tls.TLSSocketOptions & tls.SecureContextOptions;
  }
  return {
    isServer: true,
    minVersion: "TLSv1.2",
    cert: creds.cert,
    key: creds.key,
    ca: creds.ca.length > 0 ? creds.ca : undefined,
    crl: creds.crl,
    requestCert: creds.verifyPeer,
    rejectUnauthorized: creds.verifyPeer,
  };
}

/** Node options for `tls.connect({socket, ...})` on the client side. */
export function clientTlsOptions(creds: TlsCredentials, hostname?: string): tls.ConnectionOptions {
  if (creds.endpoint !== "client") throw new TlsCredentialsError("server credentials used for a client");
  if (creds.kind === "psk") {
    const identity = creds.username!;
    const psk = creds.keys.get(identity)!;
    return {
      ciphers: PSK_CIPHERS,
      minVersion: "TLSv1.2",
      maxVersion: "TLSv1.2",
      checkServerIdentity: () => undefined,
      pskCallback: () => ({ psk, identity }),
    };
  }
  return {
    minVersion: "TLSv1.2",
    ca: creds.ca.length > 0 ? creds.ca : undefined,
    crl: creds.crl,
    cert: creds.cert,
    key: creds.key,
    servername: hostname !== undefined && !/^[\d.:]+$/.test(hostname) ? hostname : undefined,
    rejectUnauthorized: creds.verifyPeer,
    // QEMU checks the name only when tls-hostname is given (or the host is a name). The name is
    // passed explicitly: over an existing socket (and for an IP address, which gets no SNI) Node
    // would otherwise check the certificate against "localhost".
    checkServerIdentity: (_servername, cert) =>
      hostname === undefined || !creds.verifyPeer ? undefined : tls.checkServerIdentity(hostname, cert),
  };
}

/**
 * The peer of an established server-side TLS socket, for `--tls-authz`. For PSK, the identity the
 * client presented (recorded by serverTlsOptions' pskCallback unless given). For x509, the subject
 * of the client's certificate as an RFC 2253 string, most specific first, with RFC 2253 escapes:
 * what `openssl x509 -noout -subject -nameopt RFC2253` prints (`CN=alice,O=Acme\, Inc.,C=GB`) and
 * the order gnutls (QEMU's tls-authz) uses. Non-ASCII values are compared as UTF-8 text, where
 * OpenSSL's RFC2253 output would escape them as hex.
 */
export function tlsPeer(socket: tls.TLSSocket, creds: TlsCredentials, pskIdentity?: string): TlsPeer | null {
  if (creds.kind === "psk") {
    // After a successful handshake, the identity offered is one the file has.
    const identity = pskIdentity ?? pskIdentities.get(socket);
    return identity === undefined || !creds.keys.has(identity) ? null : { kind: "psk", name: identity };
  }
  const cert = socket.getPeerX509Certificate();
  if (cert === undefined) return null;
  return { kind: "x509", name: rfc2253(cert.subject) };
}

/**
 * Node prints a name one RDN per line, in certificate order (least specific first), with RFC 2253
 * escapes and " + " between the parts of a multi-valued RDN. RFC 2253 puts the most specific first.
 * An escaped plus inside a value reads "\+", so " + " is always a separator.
 */
export function rfc2253(nodeSubject: string): string {
  return nodeSubject
    .split("\n")
    .filter((line) => line !== "")
    .reverse()
    .map((rdn) => rdn.replaceAll(" + ", "+"))
    .join(",");
}
