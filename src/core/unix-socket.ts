/**
 * Listening on a unix socket path without stealing it from a running server or losing it to one.
 *
 * Before binding: a path where a live server answers a connect is refused; a socket file nobody
 * listens on (connect: ECONNREFUSED) is stale and replaced; anything else (a regular file, a
 * directory) is refused and never deleted. The server binds a temporary name in the same directory
 * and the socket is then hard-linked to its real path, which fails if the path appeared meanwhile,
 * so two servers starting together cannot both take it. This also matters at stop: libuv unlinks a
 * listener's bound path by name when it closes, which would delete whatever socket has the name by
 * then; with the temporary name it deletes nothing. The real path is removed only while it is
 * still the socket this process created (same device and inode as recorded after listen).
 */
import { randomBytes } from "node:crypto";
import * as fs from "node:fs";
import * as net from "node:net";
import * as path from "node:path";

/** How long the liveness probe of an existing socket waits for connect. */
export const SOCKET_PROBE_TIMEOUT_MS = 2_000;
/** sun_path holds 108 bytes with its NUL; a longer temporary name falls back to binding the path. */
const SUN_PATH_BYTES_MAX = 107;

/** The path cannot be used: a live server has it, or it is not a socket. */
export class SocketPathError extends Error {
  readonly path: string;
  constructor(socketPath: string, message: string) {
    super(message);
    this.name = "SocketPathError";
    this.path = socketPath;
  }
}

function identity(p: string): string | null {
  try {
    const st = fs.lstatSync(p, { bigint: true });
    return st.isSocket() ? `${st.dev}:${st.ino}` : null;
  } catch {
    return null;
  }
}

/** "live" if a server accepts a connect on the socket, "stale" if nobody listens, "gone" if no file. */
function probe(socketPath: string): Promise<"live" | "stale" | "gone"> {
  return new Promise((resolve, reject) => {
    const socket = net.createConnection(socketPath);
    const timer = setTimeout(() => {
      socket.destroy();
      // A server too busy to accept is still a server.
      resolve("live");
    }, SOCKET_PROBE_TIMEOUT_MS);
    socket.once("connect", () => {
      clearTimeout(timer);
      socket.destroy();
      resolve("live");
    });
    socket.once("error", (err: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      socket.destroy();
      if (err.code === "ECONNREFUSED") resolve("stale");
      else if (err.code === "ENOENT") resolve("gone");
      else if (err.code === "EAGAIN") resolve("live");
      else reject(new SocketPathError(socketPath, `cannot check socket ${socketPath}: ${err.message}`));
    });
  });
}

/** Makes `socketPath` free to bind: refuses a live socket or a non-socket, removes a stale socket. */
async function clearPath(socketPath: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(socketPath);
  } catch {
    return;
  }
  if (!st.isSocket()) {
    throw new SocketPathError(socketPath, `${socketPath} exists and is not a socket; not replacing it`);
  }
  const before = identity(socketPath);
  const state = await probe(socketPath);
  if (state === "live") {
    throw new SocketPathError(socketPath, `socket ${socketPath} is in use by a running server`);
  }
  // Remove only the stale socket that was probed, not one a new server bound meanwhile.
  if (state === "stale" && before !== null && identity(socketPath) === before) {
    fs.rmSync(socketPath, { force: true });
  }
}

function listenOn(server: net.Server, bindPath: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const onError = (err: Error): void => reject(err);
    server.once("error", onError);
    server.listen(bindPath, () => {
      server.off("error", onError);
      resolve();
    });
  });
}

/** A socket file this process listens on; release() removes it only while it is still ours. */
export class OwnedSocket {
  readonly path: string;
  readonly #id: string | null;

  constructor(socketPath: string) {
    this.path = socketPath;
    this.#id = identity(socketPath);
  }

  /** Removes the socket file if it is the one this process created. Call after the server closed. */
  release(): void {
    if (this.#id !== null && identity(this.path) === this.#id) fs.rmSync(this.path, { force: true });
  }
}

export interface ListenUnixOptions {
  /** Mode for the socket file, set before it appears at its path (QMP's 0600). */
  readonly mode?: number;
}

/**
 * Listens `server` on `socketPath` (see the module comment). Rejects with SocketPathError when the
 * path is taken, or with the listen error; the server is then not listening and nothing was removed
 * except a stale socket.
 */
export async function listenUnix(
  server: net.Server,
  socketPath: string,
  options: ListenUnixOptions = {},
): Promise<OwnedSocket> {
  await clearPath(socketPath);
  const tempPath = path.join(path.dirname(socketPath), `.${randomBytes(6).toString("hex")}.sock`);
  if (Buffer.byteLength(tempPath) > SUN_PATH_BYTES_MAX) {
    // No room for the temporary name: bind the path itself (libuv will unlink it by name at close).
    await listenOn(server, socketPath);
    if (options.mode !== undefined) chmodOrClose(server, socketPath, options.mode);
    return new OwnedSocket(socketPath);
  }
  await listenOn(server, tempPath);
  try {
    if (options.mode !== undefined) fs.chmodSync(tempPath, options.mode);
    try {
      fs.linkSync(tempPath, socketPath);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "EEXIST") {
        throw new SocketPathError(socketPath, `socket ${socketPath} is in use by a running server`);
      }
      throw err;
    }
  } catch (err) {
    await new Promise<void>((resolve) => server.close(() => resolve()));
    throw err;
  } finally {
    // Clients use the real path; the temporary name goes at once (libuv's unlink at close then
    // finds nothing).
    fs.rmSync(tempPath, { force: true });
  }
  return new OwnedSocket(socketPath);
}

function chmodOrClose(server: net.Server, socketPath: string, mode: number): void {
  try {
    fs.chmodSync(socketPath, mode);
  } catch (err) {
    server.close();
    throw err;
  }
}
