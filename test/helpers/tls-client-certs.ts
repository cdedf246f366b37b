/**
 * TLS credentials for the NBD client tests, made at test time (tls-certs.ts does the openssl work) in
 * the layout QEMU's tls-creds-x509 `dir` (and nbdkit's --tls-certificates) reads: ca-cert.pem,
 * server-cert.pem + server-key.pem, client-cert.pem + client-key.pem. Besides the good set it makes
 * what the error cases need: a second CA, a server certificate that has expired, a client
 * certificate from the second CA, a client directory whose key does not match its certificate, and
 * PSK files (keys.psk) with a right and a wrong key. Each directory holds only the files its side
 * reads, so a test cannot pass by a file it should not have.
 */
import { copyFileSync, mkdirSync } from "node:fs";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { tempDir } from "./run.js";
import { makePskFile, makeX509Dir } from "./tls-certs.js";

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
const PSK_KEY = Buffer.from("9fd5a4c1e27b3f8d60a1b2c3d4e5f60718293a4b5c6d7e8f90a1b2c3d4e5f607", "hex");
const WRONG_PSK_KEY = Buffer.from("00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff", "hex");

/** A directory holding `files` (name in the directory -> file made by makeX509Dir). */
function credsDir(root: string, name: string, files: Record<string, string>): string {
  const dir = join(root, name);
  mkdirSync(dir);
  for (const [to, from] of Object.entries(files)) copyFileSync(from, join(dir, to));
  return dir;
}

function pskDir(root: string, name: string, identity: string, key: Buffer): string {
  const dir = join(root, name);
  mkdirSync(dir);
  makePskFile(join(dir, "keys.psk"), identity, key);
  return dir;
}

/** Makes every credential the client tests use; removed after the test. */
export async function makeClientTlsFixture(t: Pick<TestContext, "after">): Promise<ClientTlsFixture> {
  const root = tempDir(t, "drivetap-tls-client-");
  const good = makeX509Dir(join(root, "work", "good"), {
    clientSubject: "/O=drivetap test/CN=drivetap client",
  });
  const other = makeX509Dir(join(root, "work", "other"), {
    clientSubject: "/O=drivetap test/CN=foreign client",
  });
  const expired = makeX509Dir(join(root, "work", "expired"), {
    ca: good.ca,
    expired: "server",
    noClientCert: true,
  });
  const stray = makeX509Dir(join(root, "work", "stray"), { ca: good.ca, mismatchedKey: "client" });
  const f = (x: { dir: string }, file: string): string => join(x.dir, file);
  return {
    root,
    serverDir: credsDir(root, "server", {
      "ca-cert.pem": good.ca.certFile,
      "server-cert.pem": f(good, "server-cert.pem"),
      "server-key.pem": f(good, "server-key.pem"),
    }),
    clientDir: credsDir(root, "client", {
      "ca-cert.pem": good.ca.certFile,
      "client-cert.pem": f(good, "client-cert.pem"),
      "client-key.pem": f(good, "client-key.pem"),
    }),
    clientCaOnlyDir: credsDir(root, "client-ca-only", { "ca-cert.pem": good.ca.certFile }),
    wrongCaClientDir: credsDir(root, "client-wrong-ca", { "ca-cert.pem": other.ca.certFile }),
    foreignClientCertDir: credsDir(root, "client-foreign-cert", {
      "ca-cert.pem": good.ca.certFile,
      "client-cert.pem": f(other, "client-cert.pem"),
      "client-key.pem": f(other, "client-key.pem"),
    }),
    mismatchedKeyDir: credsDir(root, "client-mismatched-key", {
      "ca-cert.pem": good.ca.certFile,
      "client-cert.pem": f(good, "client-cert.pem"),
      // The stray directory's client key belongs to no certificate of ours.
      "client-key.pem": f(stray, "client-key.pem"),
    }),
    foreignServerDir: credsDir(root, "server-foreign", {
      "ca-cert.pem": other.ca.certFile,
      "server-cert.pem": f(other, "server-cert.pem"),
      "server-key.pem": f(other, "server-key.pem"),
    }),
    expiredServerDir: credsDir(root, "server-expired", {
      "ca-cert.pem": good.ca.certFile,
      "server-cert.pem": f(expired, "server-cert.pem"),
      "server-key.pem": f(expired, "server-key.pem"),
    }),
    pskDir: pskDir(root, "psk", PSK_IDENTITY, PSK_KEY),
    pskFile: join(root, "psk", "keys.psk"),
    pskIdentity: PSK_IDENTITY,
    wrongPskDir: pskDir(root, "psk-wrong-key", PSK_IDENTITY, WRONG_PSK_KEY),
    unknownIdentityPskDir: pskDir(root, "psk-unknown-identity", "mallory", PSK_KEY),
  };
}
