/**
 * TLS credentials made at test time with `openssl`, in the layouts QEMU, libnbd and nbdkit read:
 * an x509 directory (ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem)
 * and a keys.psk file (`identity:hexkey`). Keys are EC P-256, which is quick to generate.
 *
 * Certificates are signed with `openssl ca`, which (unlike `openssl x509 -req` in OpenSSL 3.0) takes
 * an explicit start and end date, so an expired certificate needs no faked clock.
 */
import { execFileSync } from "node:child_process";
import { randomBytes } from "node:crypto";
import { copyFileSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type * as tls from "node:tls";

/** A certificate authority from an earlier makeX509Dir, to sign more certificates with. */
export interface TestCa {
  readonly certFile: string;
  readonly keyFile: string;
}

export interface X509DirOptions {
  /** Sign with this CA instead of a new one (a second directory trusted by the same CA). */
  readonly ca?: TestCa;
  /** The client certificate's subject, `openssl -subj` style (default "/O=drivetap test/CN=client"). */
  readonly clientSubject?: string;
  /** Write no client-cert.pem / client-key.pem. */
  readonly noClientCert?: boolean;
  /** Which certificate is issued already expired (valid for one day in 2020). */
  readonly expired?: "server" | "client";
  /** Which key file belongs to a different key pair than its certificate. */
  readonly mismatchedKey?: "server" | "client";
}

export interface X509Dir {
  readonly dir: string;
  readonly ca: TestCa;
  /** The client certificate's subject as `openssl x509 -subject -nameopt RFC2253` prints it. */
  readonly clientDn: string;
  readonly serverDn: string;
}

const VALID_START = "20200101000000Z";
const VALID_END_EXPIRED = "20200102000000Z";

function openssl(args: readonly string[]): string {
  return execFileSync("openssl", args as string[], { encoding: "utf8", stdio: ["ignore", "pipe", "pipe"] });
}

function newKey(file: string): void {
  openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", file]);
}

/** Signs a new certificate for `keyFile` with the CA, with the given extensions and dates. */
function issue(
  ca: TestCa,
  keyFile: string,
  subject: string,
  extensions: string,
  certFile: string,
  expired: boolean,
): void {
  const work = mkdtempSync(join(tmpdir(), "drivetap-ca-"));
  try {
    const csr = join(work, "req.csr");
    openssl(["req", "-new", "-key", keyFile, "-subj", subject, "-out", csr]);
    writeFileSync(join(work, "index.txt"), "");
    writeFileSync(join(work, "serial"), randomBytes(8).toString("hex") + "\n");
    writeFileSync(join(work, "ext.cnf"), `[ext]\n${extensions}\n`);
    writeFileSync(
      join(work, "ca.cnf"),
      [
        "[ca]",
        "default_ca = test_ca",
        "[test_ca]",
        `database = ${join(work, "index.txt")}`,
        `serial = ${join(work, "serial")}`,
        `new_certs_dir = ${work}`,
        "default_md = sha256",
        "policy = any",
        "unique_subject = no",
        "email_in_dn = no",
        "[any]",
        // The order of these is the order of the issued subject (issuer's choice, not the request's).
        "countryName = optional",
        "organizationName = optional",
        "organizationalUnitName = optional",
        "commonName = supplied",
        "",
      ].join("\n"),
    );
    openssl([
      "ca",
      "-batch",
      "-notext",
      "-config",
      join(work, "ca.cnf"),
      "-cert",
      ca.certFile,
      "-keyfile",
      ca.keyFile,
      "-in",
      csr,
      "-out",
      certFile,
      "-extfile",
      join(work, "ext.cnf"),
      "-extensions",
      "ext",
      "-startdate",
      VALID_START,
      ...(expired ? ["-enddate", VALID_END_EXPIRED] : ["-days", "3650"]),
    ]);
  } finally {
    rmSync(work, { recursive: true, force: true });
  }
}

function newCa(dir: string): TestCa {
  const ca = { certFile: join(dir, "ca-cert.pem"), keyFile: join(dir, "ca-key.pem") };
  newKey(ca.keyFile);
  openssl([
    "req",
    "-x509",
    "-new",
    "-key",
    ca.keyFile,
    "-subj",
    `/O=drivetap test/CN=drivetap test CA ${randomBytes(4).toString("hex")}`,
    "-days",
    "3650",
    "-addext",
    "basicConstraints=critical,CA:TRUE",
    "-addext",
    "keyUsage=critical,keyCertSign,cRLSign",
    "-out",
    ca.certFile,
  ]);
  return ca;
}

/** The subject of a certificate as `openssl x509 -subject -nameopt RFC2253` prints it. */
export function subjectDn(certFile: string): string {
  return openssl(["x509", "-in", certFile, "-noout", "-subject", "-nameopt", "RFC2253"])
    .trim()
    .replace(/^subject=/, "");
}

/**
 * Makes an x509 directory at `dir` (created if missing): a CA (new unless opts.ca), a server
 * certificate for localhost, 127.0.0.1 and ::1, and a client certificate, each with its key.
 */
export function makeX509Dir(dir: string, opts: X509DirOptions = {}): X509Dir {
  mkdirSync(dir, { recursive: true });
  let ca: TestCa;
  if (opts.ca) {
    ca = opts.ca;
    copyFileSync(ca.certFile, join(dir, "ca-cert.pem"));
  } else {
    ca = newCa(dir);
  }
  const leaf = (role: "server" | "client", subject: string, extensions: string): void => {
    const key = join(dir, `${role}-key.pem`);
    newKey(key);
    issue(ca, key, subject, extensions, join(dir, `${role}-cert.pem`), opts.expired === role);
    if (opts.mismatchedKey === role) newKey(key);
  };
  leaf(
    "server",
    "/O=drivetap test/CN=localhost",
    [
      "basicConstraints = critical,CA:FALSE",
      "keyUsage = critical,digitalSignature,keyEncipherment",
      "extendedKeyUsage = serverAuth",
      "subjectAltName = DNS:localhost,IP:127.0.0.1,IP:::1",
    ].join("\n"),
  );
  if (!opts.noClientCert) {
    leaf(
      "client",
      opts.clientSubject ?? "/O=drivetap test/CN=client",
      [
        "basicConstraints = critical,CA:FALSE",
        "keyUsage = critical,digitalSignature,keyEncipherment",
        "extendedKeyUsage = clientAuth",
      ].join("\n"),
    );
  }
  return {
    dir,
    ca,
    clientDn: opts.noClientCert ? "" : subjectDn(join(dir, "client-cert.pem")),
    serverDn: subjectDn(join(dir, "server-cert.pem")),
  };
}

/**
 * Writes a keys.psk file with one `identity:hexkey` line (a fresh 32-byte key unless `key` is given)
 * and returns the key in hex.
 */
export function makePskFile(path: string, identity: string, key: Buffer = randomBytes(32)): string {
  const hex = key.toString("hex");
  writeFileSync(path, `${identity}:${hex}\n`, { mode: 0o600 });
  return hex;
}

/** Node client options for an x509 directory's client certificate, checking the server as localhost. */
export function clientTls(dir: string): tls.ConnectionOptions {
  return {
    ca: readFileSync(join(dir, "ca-cert.pem")),
    cert: readFileSync(join(dir, "client-cert.pem")),
    key: readFileSync(join(dir, "client-key.pem")),
    servername: "localhost",
  };
}
