/**
 * The client's STARTTLS step (NBD spec, "TLS support"): right after the client flags, the client
 * sends NBD_OPT_STARTTLS; on NBD_REP_ACK both sides run a TLS handshake on the same socket and the
 * rest of the negotiation (and every request) goes over TLS. This file checks the server's answer,
 * upgrades the socket, and turns TLS failures into messages that say what to fix.
 */
import type * as net from "node:net";
import * as tls from "node:tls";
import { BlockError, ProtocolError } from "../../core/errors.js";
import { clientTlsOptions, type TlsCredentials } from "../tls/credentials.js";
import * as C from "../protocol/constants.js";

export interface ClientTls {
  readonly creds: TlsCredentials;
  /**
   * The name the server's certificate must carry (QEMU's tls-hostname, by default the inet host).
   * Undefined: the certificate must be signed by the CA, its name is not checked (a unix socket).
   */
  readonly hostname?: string;
}

function tlsFailed(message: string): BlockError {
  return new BlockError("ENOTCONN", `TLS handshake with the NBD server failed: ${message}`);
}

/** The server's answer to NBD_OPT_STARTTLS: only an ACK lets the handshake go on. */
export function checkStartTlsReply(type: number, data: Buffer): void {
  if (type === C.NBD_REP_ACK) return;
  // The spec's answer is ERR_UNSUP; qemu-nbd without --tls-creds answers ERR_POLICY.
  if (type === C.NBD_REP_ERR_UNSUP || type === C.NBD_REP_ERR_POLICY) {
    const said = data.length > 0 ? `: ${data.toString("utf8")}` : "";
    throw new BlockError("ENOTCONN", `server does not support TLS (it refused NBD_OPT_STARTTLS${said})`);
  }
  if (!C.isOptionReplyError(type)) throw new ProtocolError(`reply ${type} to NBD_OPT_STARTTLS`);
  const why = data.toString("utf8") || `error 0x${type.toString(16)}`;
  throw new BlockError("ENOTCONN", `the NBD server refused STARTTLS: ${why}`);
}

/**
 * Runs the TLS handshake over `socket` (nothing else may be reading it) and resolves with the TLS
 * socket once it is established. Writes and reads go through the returned socket from then on.
 */
export function upgradeToTls(socket: net.Socket, t: ClientTls): Promise<tls.TLSSocket> {
  return new Promise((resolve, reject) => {
    let secure: tls.TLSSocket;
    try {
      secure = tls.connect({ socket, ...clientTlsOptions(t.creds, t.hostname) });
    } catch (err) {
      reject(tlsFailed((err as Error).message));
      return;
    }
    const onError = (err: Error): void => {
      secure.destroy();
      reject(describeTlsError(err, t));
    };
    const onClose = (): void => reject(tlsFailed("the server closed the connection"));
    secure.once("error", onError);
    secure.once("close", onClose);
    secure.once("secureConnect", () => {
      secure.off("error", onError);
      secure.off("close", onClose);
      resolve(secure);
    });
  });
}

/** What the server probably refused when it closed the TLS connection without saying why. */
function closedHint(t: ClientTls): string {
  const creds = t.creds;
  if (creds.kind === "psk") {
    return `the server closed the connection: it does not know PSK identity '${creds.username}' or has another key for it`;
  }
  if (!creds.cert) {
    return `the server closed the connection: it may require a client certificate (${creds.dir} has no client-cert.pem)`;
  }
  return `the server closed the connection: it may not accept the client certificate ${creds.dir}/client-cert.pem`;
}

/** The server hung up right after the TLS handshake without a word: what it probably refused. */
export function describeTlsClose(t: ClientTls): BlockError {
  return tlsFailed(closedHint(t));
}

/** A TLS error (during or right after the handshake) as a BlockError that says what to fix. */
export function describeTlsError(err: Error, t: ClientTls): BlockError {
  const code = (err as NodeJS.ErrnoException).code ?? "";
  const creds = t.creds;
  const ca = creds.kind === "x509" ? `${creds.dir}/ca-cert.pem` : "";
  const identity = creds.kind === "psk" ? creds.username : undefined;
  let hint: string | undefined;
  switch (code) {
    case "UNABLE_TO_VERIFY_LEAF_SIGNATURE":
    case "UNABLE_TO_GET_ISSUER_CERT":
    case "UNABLE_TO_GET_ISSUER_CERT_LOCALLY":
    case "SELF_SIGNED_CERT_IN_CHAIN":
    case "DEPTH_ZERO_SELF_SIGNED_CERT":
    case "CERT_SIGNATURE_FAILURE":
      hint = `the server's certificate is not signed by the CA in ${ca}`;
      break;
    case "ERR_TLS_CERT_ALTNAME_INVALID":
      hint = `the server's certificate is not for '${t.hostname}' (tls-hostname)`;
      break;
    case "CERT_HAS_EXPIRED":
      hint = "the server's certificate has expired";
      break;
    case "CERT_NOT_YET_VALID":
      hint = "the server's certificate is not valid yet";
      break;
    case "CERT_REVOKED":
      hint = `the server's certificate is revoked (${creds.kind === "x509" ? creds.dir : ""}/ca-crl.pem)`;
      break;
    case "ERR_SSL_TLSV1_ALERT_UNKNOWN_PSK_IDENTITY":
      hint = `the server does not know PSK identity '${identity}'`;
      break;
    case "ERR_SSL_TLSV13_ALERT_CERTIFICATE_REQUIRED":
      hint = "the server requires a client certificate (client-cert.pem and client-key.pem)";
      break;
    case "ERR_SSL_TLSV1_ALERT_UNKNOWN_CA":
    case "ERR_SSL_SSLV3_ALERT_BAD_CERTIFICATE":
    case "ERR_SSL_SSLV3_ALERT_CERTIFICATE_UNKNOWN":
    case "ERR_SSL_TLSV1_ALERT_ACCESS_DENIED":
      hint = "the server refused the client certificate";
      break;
    case "ERR_SSL_DECRYPTION_FAILED_OR_BAD_RECORD_MAC":
    case "ERR_SSL_TLSV1_ALERT_DECRYPT_ERROR":
    case "ERR_SSL_SSLV3_ALERT_BAD_RECORD_MAC":
    case "ERR_SSL_TLSV1_ALERT_DECRYPTION_FAILED":
      if (creds.kind === "psk") hint = `the PSK key for '${identity}' is not the server's key`;
      break;
    case "ECONNRESET":
    case "EPIPE":
    case "ECONNABORTED":
    case "ERR_SSL_CLIENT_DISCONNECTED":
      // GnuTLS servers (qemu-nbd, nbdkit) often just close on a credential they refuse, without an
      // alert that would say which: name what our side presented.
      hint = closedHint(t);
      break;
  }
  if (hint === undefined && /disconnected before secure TLS connection/i.test(err.message))
    hint = closedHint(t);
  const why = err.message.replace(/^error:[0-9A-F]+:SSL routines::/, "");
  return tlsFailed(hint ? `${hint} (${why})` : why);
}
