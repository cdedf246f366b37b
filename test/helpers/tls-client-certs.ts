/**
 * TLS credentials for the NBD client tests, made with openssl at test time in a fresh directory, in
 * the layout QEMU's tls-creds-x509 `dir` (and nbdkit's --tls-certificates) reads: ca-cert.pem,
 * server-cert.pem + server-key.pem, client-cert.pem + client-key.pem. Besides the good set it makes
 * what the error cases need: a second CA, a server certificate that has expired, a client
 * certificate from the second CA, a client directory whose key does not match its certificate, and
 * PSK files (keys.psk) with a right and a wrong key.
 */
import { copyFileSync, mkdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { runOk, tempDir } from "./run.js";

export interface ClientTlsFixture {
  readonly root: string;
  /** Server side (qemu-nbd --object tls-creds-x509,dir=..., nbdkit --tls-certificates=...). */
  readonly serverDir: string;
  /** Client: CA + client certificate and key (for verify-peer servers too). */
  readonly clientDir: string;
  /** Client: only the CA (servers that do not ask for a client certificate). */
  readonly clientCaOnlyDir: string;
  /** Client: trusts the other CA, not the one that signed the server's certificate. */
  readonly wrongCaClientDir: string;
  /** Client: the right CA, but a client certificate signed by the other CA. */
  readonly foreignClientCertDir: string;
  /** Client: client-key.pem is not the key of client-cert.pem. */
  readonly mismatchedKeyDir: string;
  /** Server side with a certificate signed by the other CA (clients trusting `ca` refuse it). */
  readonly foreignServerDir: string;
  /** Server side whose certificate expired in 2020 (qemu-nbd refuses to start with it; nbdkit serves it). */
  readonly expiredServerDir: string;
  /** PSK: a directory with keys.psk holding identity `drivetap` (QEMU's dir form; nbdkit takes the file). */
  readonly pskDir: string;
  readonly pskFile: string;
  readonly pskIdentity: string;
  /** PSK: the same identity with another key. */
  readonly wrongPskDir: string;
  /** PSK: an identity the server does not know, with the right key. */
  readonly unknownIdentityPskDir: string;
}

const PSK_IDENTITY = "drivetap";
const PSK_KEY = "9fd5a4c1e27b3f8d60a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f607";
const WRONG_PSK_KEY = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

function openssl(args: readonly string[], cwd: string): Promise<unknown> {
  return runOk("openssl", args, { cwd });
}

async function key(cwd: string, file: string): Promise<void> {
  await openssl(["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", file], cwd);
}

async function makeCa(cwd: string, name: string): Promise<void> {
  await key(cwd, `${name}-key.pem`);
  await openssl(
    [
      "req",
      "-x509",
      "-new",
      "-key",
      `${name}-key.pem`,
      "-subj",
      `/O=drivetap test/CN=${name}`,
      "-days",
      "3650",
      "-addext",
      "basicConstraints=critical,CA:TRUE",
      "-addext",
      "keyUsage=critical,keyCertSign,cRLSign",
      "-out",
      `${name}-cert.pem`,
    ],
    cwd,
  );
}

const SERVER_EXT = [
  "basicConstraints=critical,CA:FALSE",
  "keyUsage=critical,digitalSignature,keyEncipherment",
  "extendedKeyUsage=serverAuth",
  "subjectAltName=IP:127.0.0.1,DNS:localhost",
].join("\n");
const CLIENT_EXT = [
  "basicConstraints=critical,CA:FALSE",
  "keyUsage=critical,digitalSignature,keyEncipherment",
  "extendedKeyUsage=clientAuth",
].join("\n");

/** A certificate for `name` signed by CA `ca`; `expired` makes one valid only in January 2020. */
async function makeCert(
  cwd: string,
  ca: string,
  name: string,
  cn: string,
  ext: string,
  expired = false,
): Promise<void> {
  await key(cwd, `${name}-key.pem`);
  await openssl(
    ["req", "-new", "-key", `${name}-key.pem`, "-subj", `/O=drivetap test/CN=${cn}`, "-out", `${name}.csr`],
    cwd,
  );
  writeFileSync(join(cwd, `${name}.ext`), `${ext}\n`);
  if (!expired) {
    await openssl(
      [
        "x509",
        "-req",
        "-in",
        `${name}.csr`,
        "-CA",
        `${ca}-cert.pem`,
        "-CAkey",
        `${ca}-key.pem`,
        "-CAcreateserial",
        "-days",
        "365",
        "-extfile",
        `${name}.ext`,
        "-out",
        `${name}-cert.pem`,
      ],
      cwd,
    );
    return;
  }
  // `openssl x509` cannot set dates in the past; `openssl ca` can.
  const db = join(cwd, `${name}-ca.db`);
  mkdirSync(db);
  writeFileSync(join(db, "index.txt"), "");
  writeFileSync(join(db, "serial"), "1000\n");
  writeFileSync(
    join(cwd, `${name}-ca.cnf`),
    [
      "[ca]",
      "default_ca = test",
      "[test]",
      `dir = ${db}`,
      "database = $dir/index.txt",
      "serial = $dir/serial",
      "new_certs_dir = $dir",
      "default_md = sha256",
      "policy = any",
      "[any]",
      "commonName = supplied",
      "organizationName = optional",
      "[ext]",
      ext,
      "",
    ].join("\n"),
  );
  await openssl(
    [
      "ca",
      "-batch",
      "-config",
      `${name}-ca.cnf`,
      "-cert",
      `${ca}-cert.pem`,
      "-keyfile",
      `${ca}-key.pem`,
      "-extensions",
      "ext",
      "-startdate",
      "20200101000000Z",
      "-enddate",
      "20200201000000Z",
      "-in",
      `${name}.csr`,
      "-out",
      `${name}-cert.pem`,
    ],
    cwd,
  );
}

function credsDir(root: string, name: string, files: Record<string, string>): string {
  const dir = join(root, name);
  mkdirSync(dir);
  for (const [to, from] of Object.entries(files)) copyFileSync(join(root, "work", from), join(dir, to));
  return dir;
}

function pskDir(root: string, name: string, identity: string, hexKey: string): string {
  const dir = join(root, name);
  mkdirSync(dir);
  writeFileSync(join(dir, "keys.psk"), `${identity}:${hexKey}\n`, { mode: 0o600 });
  return dir;
}

/** Makes every credential the client tests use; removed after the test. */
export async function makeClientTlsFixture(t: Pick<TestContext, "after">): Promise<ClientTlsFixture> {
  const root = tempDir(t, "drivetap-tls-client-");
  const work = join(root, "work");
  mkdirSync(work);
  await makeCa(work, "ca");
  await makeCa(work, "other-ca");
  await makeCert(work, "ca", "server", "localhost", SERVER_EXT);
  await makeCert(work, "ca", "client", "drivetap client", CLIENT_EXT);
  await makeCert(work, "other-ca", "foreign-client", "foreign client", CLIENT_EXT);
  await makeCert(work, "other-ca", "foreign-server", "localhost", SERVER_EXT);
  await makeCert(work, "ca", "expired-server", "localhost", SERVER_EXT, true);
  await key(work, "stray-key.pem");

  const serverDir = credsDir(root, "server", {
    "ca-cert.pem": "ca-cert.pem",
    "server-cert.pem": "server-cert.pem",
    "server-key.pem": "server-key.pem",
  });
  return {
    root,
    serverDir,
    clientDir: credsDir(root, "client", {
      "ca-cert.pem": "ca-cert.pem",
      "client-cert.pem": "client-cert.pem",
      "client-key.pem": "client-key.pem",
    }),
    clientCaOnlyDir: credsDir(root, "client-ca-only", { "ca-cert.pem": "ca-cert.pem" }),
    wrongCaClientDir: credsDir(root, "client-wrong-ca", { "ca-cert.pem": "other-ca-cert.pem" }),
    foreignClientCertDir: credsDir(root, "client-foreign-cert", {
      "ca-cert.pem": "ca-cert.pem",
      "client-cert.pem": "foreign-client-cert.pem",
      "client-key.pem": "foreign-client-key.pem",
    }),
    mismatchedKeyDir: credsDir(root, "client-mismatched-key", {
      "ca-cert.pem": "ca-cert.pem",
      "client-cert.pem": "client-cert.pem",
      "client-key.pem": "stray-key.pem",
    }),
    foreignServerDir: credsDir(root, "server-foreign", {
      "ca-cert.pem": "other-ca-cert.pem",
      "server-cert.pem": "foreign-server-cert.pem",
      "server-key.pem": "foreign-server-key.pem",
    }),
    expiredServerDir: credsDir(root, "server-expired", {
      "ca-cert.pem": "ca-cert.pem",
      "server-cert.pem": "expired-server-cert.pem",
      "server-key.pem": "expired-server-key.pem",
    }),
    pskDir: pskDir(root, "psk", PSK_IDENTITY, PSK_KEY),
    pskFile: join(root, "psk", "keys.psk"),
    pskIdentity: PSK_IDENTITY,
    wrongPskDir: pskDir(root, "psk-wrong-key", PSK_IDENTITY, WRONG_PSK_KEY),
    unknownIdentityPskDir: pskDir(root, "psk-unknown-identity", "mallory", PSK_KEY),
  };
}
