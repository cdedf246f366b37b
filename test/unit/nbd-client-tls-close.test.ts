/**
 * The NBD client's message when a server hangs up right after the TLS handshake without a word, as a
 * GnuTLS server refusing our certificate under TLS 1.3 may (the client's side of the handshake is
 * done before the server has checked the certificate). A scripted server below the client makes the
 * close certain; against real servers it races with the TLS alert.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import * as net from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import * as tls from "node:tls";
import { NbdConnection } from "../../src/nbd/client/connection.js";
import * as C from "../../src/nbd/protocol/constants.js";
import { loadX509 } from "../../src/nbd/tls/credentials.js";
import { tempDir } from "../helpers/run.js";
import { makeX509Dir } from "../helpers/tls-certs.js";

/** Answers STARTTLS with ACK, completes the TLS handshake, then closes without sending anything. */
function silentTlsServer(dir: string, path: string): Promise<net.Server> {
  const server = net.createServer((socket) => {
    const greeting = Buffer.alloc(C.NBD_HANDSHAKE_BYTES);
    greeting.writeBigUInt64BE(C.NBD_MAGIC, 0);
    greeting.writeBigUInt64BE(C.NBD_IHAVEOPT, 8);
    greeting.writeUInt16BE(C.NBD_FLAG_FIXED_NEWSTYLE | C.NBD_FLAG_NO_ZEROES, 16);
    socket.write(greeting);
    let got = Buffer.alloc(0);
    const onData = (b: Buffer): void => {
      got = Buffer.concat([got, b]);
      if (got.length < 4 + 16) return; // client flags, then the STARTTLS option header
      socket.off("data", onData);
      assert.equal(got.readUInt32BE(4 + 8), C.NBD_OPT_STARTTLS);
      const reply = Buffer.alloc(20);
      reply.writeBigUInt64BE(C.NBD_REP_MAGIC, 0);
      reply.writeUInt32BE(C.NBD_OPT_STARTTLS, 8);
      reply.writeUInt32BE(C.NBD_REP_ACK, 12);
      reply.writeUInt32BE(0, 16);
      socket.write(reply);
      const secure = new tls.TLSSocket(socket, {
        isServer: true,
        key: readFileSync(join(dir, "server-key.pem")),
        cert: readFileSync(join(dir, "server-cert.pem")),
      });
      secure.on("error", () => {});
      secure.once("secure", () => secure.destroy());
    };
    socket.on("data", onData);
    socket.on("error", () => {});
  });
  return new Promise((resolve) => server.listen(path, () => resolve(server)));
}

test("a server that hangs up right after the TLS handshake is reported as a refused client certificate", async (t) => {
  const root = tempDir(t, "drivetap-tls-close-");
  const x509 = makeX509Dir(join(root, "creds"));
  const server = await silentTlsServer(x509.dir, join(root, "nbd.sock"));
  t.after(() => server.close());
  const creds = loadX509(x509.dir, "client", true);
  await assert.rejects(
    NbdConnection.open({ type: "unix", path: join(root, "nbd.sock") }, "", 10_000, { creds }),
    (err: Error) => {
      assert.match(
        err.message,
        /^TLS handshake with the NBD server failed: the server closed the connection: it may not accept the client certificate .*client-cert\.pem$/,
      );
      return true;
    },
  );
});
