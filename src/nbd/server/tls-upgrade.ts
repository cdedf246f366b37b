/**
 * Server-side TLS for NBD: the policy (`--tls on|require`, `--tls-authz`), one secure context built
 * at start, and the upgrade of a connection's socket once NBD_OPT_STARTTLS has been acknowledged.
 *
 * The upgrade wraps the accepted socket in a server `tls.TLSSocket` (not a `tls.Server`: a standalone
 * socket belongs to the connection from the first byte, so every failure is that connection's to
 * log). After the handshake the peer is checked: with `--tls-verify-peer` the client's certificate
 * must verify against the CA (else the session ends, as the spec requires after a failed TLS
 * negotiation), and with `--tls-authz` its subject DN or PSK identity must be listed (else the
 * connection refuses every option with NBD_REP_ERR_POLICY and a message that names the peer).
 */
import type * as net from "node:net";
import * as tls from "node:tls";
import {
  TlsCredentialsError,
  offeredPskIdentity,
  serverTlsOptions,
  tlsPeer,
  type TlsCredentials,
  type TlsPeer,
} from "../tls/credentials.js";

/** nbdkit's `--tls`: off (no TLS), on (TLS offered, plaintext allowed), require (STARTTLS first). */
export type TlsMode = "off" | "on" | "require";

/**
 * Who may go on after the TLS handshake: `--tls-authz`'s list, or a QMP authz object. The identity
 * is the client certificate's RFC 2253 subject DN or the PSK identity.
 */
export interface PeerAuthz {
  allows(identity: string): boolean;
  /** Names the rule in refusals and the start-up log ("--tls-authz", "authz-list 'auth0'"). */
  readonly source: string;
  /** For the start-up log: "2 authorized peers", "1 rule, default deny". */
  describe(): string;
}

/** `--tls-authz NAME`, repeated: exactly these identities. */
export function listedPeers(names: readonly string[]): PeerAuthz {
  const set = new Set(names);
  return {
    allows: (identity) => set.has(identity),
    source: "--tls-authz",
    describe: () => `${set.size} authorized peers`,
  };
}

export interface ServerTlsConfig {
  readonly mode: "on" | "require";
  readonly creds: TlsCredentials;
  /** Peers accepted after the handshake; null: any. */
  readonly authz: PeerAuthz | null;
}

/**
 * How a TLS handshake ended: a session (its peer still to be checked against authz, `refusal`), or
 * why the connection must close. Plain data, so a worker thread can report it (tls-worker.ts).
 */
export type HandshakeResult =
  | {
      readonly ok: true;
      readonly peer: TlsPeer | null;
      readonly protocol: string | null;
      readonly cipher: string | null;
    }
  | { readonly ok: false; readonly reason: string };

interface VerifyHandle {
  verifyError?: () => (Error & { code?: string }) | null;
}

export class ServerTls {
  readonly mode: "on" | "require";
  readonly creds: TlsCredentials;
  readonly #authz: PeerAuthz | null;
  readonly #options: tls.TLSSocketOptions;

  constructor(config: ServerTlsConfig) {
    this.mode = config.mode;
    this.creds = config.creds;
    this.#authz = config.authz;
    const options = serverTlsOptions(config.creds);
    let secureContext: tls.SecureContext;
    try {
      // One context for every connection: building one parses the key and certificates.
      secureContext = tls.createSecureContext(options);
    } catch (err) {
      throw new TlsCredentialsError(contextError(config.creds, err as Error));
    }
    this.#options = { ...options, isServer: true, secureContext };
  }

  get required(): boolean {
    return this.mode === "require";
  }

  /** For the start-up log: what the server offers. */
  describe(): string {
    const c = this.creds;
    const what =
      c.kind === "psk"
        ? `PSK (${c.file}, ${c.keys.size} identities)`
        : `x509 (${c.dir}${c.verifyPeer ? ", client certificates verified" : ""})`;
    return `${what}, ${this.mode === "require" ? "required" : "optional"}${this.#authz ? `, ${this.#authz.describe()}` : ""}`;
  }

  /**
   * Wraps `raw` (the NBD_REP_ACK to STARTTLS already sent, nothing read past it) in a server TLS
   * socket and returns that socket at once. `done` is called once, when the handshake has ended.
   */
  upgrade(raw: net.Socket, done: (result: HandshakeResult) => void): tls.TLSSocket {
    // No handshake timeout of its own: the connection's handshake bound (HANDSHAKE_TIMEOUT_MS from
    // accept to GO) covers the TLS handshake too.
    const socket = new tls.TLSSocket(raw, this.#options);
    let settled = false;
    const settle = (r: HandshakeResult): void => {
      if (settled) return;
      settled = true;
      socket.removeListener("error", onError);
      socket.removeListener("close", onClose);
      done(r);
    };
    const onError = (err: Error & { code?: string }): void =>
      settle({ ok: false, reason: handshakeError(this.creds, err, offeredPskIdentity(socket)) });
    // A client that refuses our certificate may just hang up: with a FIN (a clean close here) or, with
    // bytes of ours unread, a reset (ECONNRESET, handshakeError). Either is worth the same hint.
    const onClose = (): void => settle({ ok: false, reason: closedDuringHandshake(this.creds) });
    socket.on("error", onError);
    socket.on("close", onClose);
    // A TLSSocket made outside a tls.Server reports TLS errors after the handshake (a renegotiation
    // past Node's limit, a corrupt record) only as the internal "_tlsError" event, and the session
    // would go on: end it, as tls.Server does.
    socket.on("_tlsError", (err: Error) => socket.destroy(err));
    socket.once("secure", () => settle(this.#checkPeer(socket)));
    return socket;
  }

  #checkPeer(socket: tls.TLSSocket): HandshakeResult {
    const c = this.creds;
    if (c.kind === "x509" && c.verifyPeer) {
      const refused = certificateRefusal(socket, c.dir);
      if (refused !== null) return { ok: false, reason: refused };
    }
    const cipher = socket.getCipher()?.name ?? null;
    return { ok: true, peer: tlsPeer(socket, c), protocol: socket.getProtocol(), cipher };
  }

  /** Why authz refuses a peer whose handshake succeeded (every option then gets ERR_POLICY), or null. */
  refusal(peer: TlsPeer | null): string | null {
    if (this.#authz === null) return null;
    if (peer !== null && this.#authz.allows(peer.name)) return null;
    const who =
      peer === null
        ? "an unidentified peer"
        : `${peer.kind === "psk" ? "PSK identity" : "certificate subject"} '${peer.name}'`;
    return `TLS peer not authorized: ${who} is not in ${this.#authz.source}`;
  }
}

/**
 * Why a client certificate is refused, or null. Node checks the chain during the handshake but lets
 * a standalone server socket finish it either way (only tls.Server acts on the result), so the
 * result is read here the way tls.Server reads it.
 */
function certificateRefusal(socket: tls.TLSSocket, dir: string): string | null {
  const cert = socket.getPeerX509Certificate();
  if (cert === undefined)
    return `the client presented no certificate (--tls-verify-peer needs one signed by ${dir}/ca-cert.pem)`;
  const handle = (socket as unknown as { _handle?: VerifyHandle | null })._handle;
  if (typeof handle?.verifyError !== "function") {
    return "cannot tell whether the client certificate verifies on this Node version; refusing it";
  }
  const err = handle.verifyError();
  if (err === null) return null;
  const subject = cert.subject.split("\n").reverse().join(",");
  switch (err.code) {
    case "CERT_HAS_EXPIRED":
      return `the client certificate '${subject}' expired on ${cert.validTo}`;
    case "CERT_NOT_YET_VALID":
      return `the client certificate '${subject}' is not valid before ${cert.validFrom}`;
    case "UNABLE_TO_VERIFY_LEAF_SIGNATURE":
    case "UNABLE_TO_GET_ISSUER_CERT":
    case "UNABLE_TO_GET_ISSUER_CERT_LOCALLY":
    case "DEPTH_ZERO_SELF_SIGNED_CERT":
    case "SELF_SIGNED_CERT_IN_CHAIN":
    case "CERT_SIGNATURE_FAILURE":
      return `the client certificate '${subject}' is not signed by the CA in ${dir}/ca-cert.pem (${err.code})`;
    case "CERT_REVOKED":
      return `the client certificate '${subject}' is revoked (${dir}/ca-crl.pem)`;
    case "INVALID_PURPOSE":
      return `the client certificate '${subject}' is not for TLS clients (extendedKeyUsage lacks clientAuth)`;
    default:
      return `the client certificate '${subject}' does not verify: ${err.code ?? err.message}`;
  }
}

/** A handshake failure as a user can act on it; the TLS library's words stay at the end. */
function handshakeError(creds: TlsCredentials, err: Error & { code?: string }, identity?: string): string {
  const code = err.code ?? "";
  const detail = `(${code || err.message})`;
  if (creds.kind === "psk") {
    if (code === "ERR_SSL_PSK_IDENTITY_NOT_FOUND")
      return `unknown PSK identity '${identity ?? ""}': ${creds.file} has no key for it ${detail}`;
    if (/CIPHER_OPERATION_FAILED|DECRYPT|BAD_RECORD_MAC|DIGEST_CHECK/.test(code))
      return `the client's key for PSK identity '${identity ?? ""}' is not the one in ${creds.file} ${detail}`;
  }
  if (
    /^ERR_SSL_(WRONG_VERSION_NUMBER|HTTP_REQUEST|UNKNOWN_PROTOCOL|PACKET_LENGTH_TOO_LONG|RECORD_LENGTH_MISMATCH|UNEXPECTED_RECORD)/.test(
      code,
    )
  ) {
    return `the client did not start a TLS handshake after STARTTLS ${detail}`;
  }
  if (code === "ERR_SSL_NO_SHARED_CIPHER") {
    return creds.kind === "psk"
      ? `no cipher suite in common: this server takes TLS-PSK only (TLS 1.2); does the client use the PSK file? ${detail}`
      : `no cipher suite in common: this server takes x509 certificates; a PSK-only client cannot connect ${detail}`;
  }
  if (code === "ERR_SSL_PEER_DID_NOT_RETURN_A_CERTIFICATE") {
    const dir = creds.kind === "x509" ? creds.dir : "";
    return `the client presented no certificate (--tls-verify-peer needs one signed by ${dir}/ca-cert.pem) ${detail}`;
  }
  if (/^ERR_SSL_(SSLV3|TLSV1|TLSV13)_ALERT_/.test(code)) {
    const alert = code
      .replace(/^ERR_SSL_(SSLV3|TLSV1|TLSV13)_ALERT_/, "")
      .toLowerCase()
      .replaceAll("_", " ");
    const hint =
      creds.kind === "psk"
        ? "the client refused the handshake: is its key for this identity the server's?"
        : "the client refused the server's certificate: does it trust the CA that signed server-cert.pem, and is the certificate valid for the name it connects to?";
    return `${hint} (TLS alert '${alert}')`;
  }
  if (code === "ECONNRESET" || code === "EPIPE") return `${closedDuringHandshake(creds)} ${detail}`;
  return `TLS handshake failed: ${code ? `${code}: ` : ""}${err.message.trim()}`;
}

function closedDuringHandshake(creds: TlsCredentials): string {
  return creds.kind === "x509"
    ? "the client closed the connection during the TLS handshake (it may have refused the server's certificate)"
    : "the client closed the connection during the TLS handshake";
}

/** Why the credentials could not become a secure context, naming the files. */
function contextError(creds: TlsCredentials, err: Error): string {
  if (creds.kind === "psk") return `TLS PSK credentials in ${creds.file}: ${err.message}`;
  const d = creds.dir;
  if (/key values mismatch/i.test(err.message)) {
    return `TLS credentials in ${d}: server-key.pem is not the key of server-cert.pem (${err.message})`;
  }
  return `TLS credentials in ${d} (ca-cert.pem, server-cert.pem, server-key.pem) cannot be used: ${err.message}`;
}
