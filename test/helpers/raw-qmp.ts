/**
 * A minimal QMP client on a raw unix socket, for tests that must send what no real client would: bytes
 * split anywhere, values back to back, malformed JSON, oversize input, hang-ups mid-command. It keeps
 * every message the server sent, in order; each wait has a timeout, so a server that stops answering
 * fails the test instead of hanging it.
 */
import * as net from "node:net";

export const QMP_READ_TIMEOUT_MS = 5_000;

export type QmpMessage = Record<string, unknown>;

export class RawQmp {
  readonly socket: net.Socket;
  /** Every byte received, decoded, for checks on the exact wire text. */
  raw = "";
  #pending = "";
  readonly #messages: QmpMessage[] = [];
  #wake: (() => void) | null = null;
  #ended = false;
  readonly closed: Promise<void>;

  private constructor(socket: net.Socket) {
    this.socket = socket;
    socket.setEncoding("utf8");
    socket.on("data", (text: string) => {
      this.raw += text;
      this.#pending += text;
      let end: number;
      while ((end = this.#pending.indexOf("\r\n")) >= 0) {
        const line = this.#pending.slice(0, end);
        this.#pending = this.#pending.slice(end + 2);
        this.#messages.push(JSON.parse(line) as QmpMessage);
      }
      this.#notify();
    });
    socket.on("error", () => {});
    this.closed = new Promise((resolve) =>
      socket.on("close", () => {
        this.#ended = true;
        this.#notify();
        resolve();
      }),
    );
  }

  /** Connects and returns once the greeting has arrived (it stays the first message). */
  static async connect(path: string): Promise<RawQmp> {
    const socket = net.createConnection(path);
    await new Promise<void>((resolve, reject) => {
      socket.once("connect", resolve);
      socket.once("error", reject);
    });
    const client = new RawQmp(socket);
    await client.#waitFor(() => client.#messages.length > 0, "the greeting");
    return client;
  }

  /** Connects and negotiates capabilities; the greeting is consumed. */
  static async ready(path: string): Promise<RawQmp> {
    const client = await RawQmp.connect(path);
    client.take((m) => "QMP" in m);
    const reply = await client.execute("qmp_capabilities");
    if (JSON.stringify(reply) !== '{"return":{}}')
      throw new Error(`negotiation failed: ${JSON.stringify(reply)}`);
    return client;
  }

  /** Messages received and not yet taken, oldest first. */
  get messages(): readonly QmpMessage[] {
    return this.#messages;
  }

  /** Removes and returns the oldest message matching `match`, if one has arrived. */
  take(match: (m: QmpMessage) => boolean): QmpMessage | undefined {
    const i = this.#messages.findIndex(match);
    return i < 0 ? undefined : this.#messages.splice(i, 1)[0];
  }

  /** Waits for the oldest message matching `match` and removes it. */
  async next(match: (m: QmpMessage) => boolean = () => true, what = "a message"): Promise<QmpMessage> {
    let found: QmpMessage | undefined;
    await this.#waitFor(() => (found = this.take(match)) !== undefined, what);
    return found!;
  }

  /** Waits until a message matching `match` has arrived, leaving it (and all others) in place. */
  async seen(match: (m: QmpMessage) => boolean, what = "a message"): Promise<void> {
    await this.#waitFor(() => this.#messages.some(match), what);
  }

  /** The next reply (anything but an event). */
  reply(): Promise<QmpMessage> {
    return this.next((m) => !("event" in m), "a reply");
  }

  event(name: string): Promise<QmpMessage> {
    return this.next((m) => m.event === name, `event ${name}`);
  }

  write(data: string | Buffer): void {
    this.socket.write(data);
  }

  send(request: unknown): void {
    this.write(JSON.stringify(request) + "\n");
  }

  /** Sends one command and waits for its reply. */
  async execute(name: string, args?: Record<string, unknown>, id?: unknown): Promise<QmpMessage> {
    const request: Record<string, unknown> = { execute: name };
    if (args !== undefined) request.arguments = args;
    if (id !== undefined) request.id = id;
    this.send(request);
    return this.reply();
  }

  /** Resolves once the server has closed its side. */
  async waitClosed(): Promise<void> {
    await this.#waitFor(() => this.#ended, "the server to close");
  }

  destroy(): void {
    this.socket.destroy();
  }

  #notify(): void {
    const wake = this.#wake;
    this.#wake = null;
    wake?.();
  }

  async #waitFor(ready: () => boolean, what: string): Promise<void> {
    const deadline = Date.now() + QMP_READ_TIMEOUT_MS;
    while (!ready()) {
      if (this.#ended)
        throw new Error(`connection closed while waiting for ${what}; got ${this.#describe()}`);
      const remaining = deadline - Date.now();
      if (remaining <= 0) throw new Error(`timed out waiting for ${what}; got ${this.#describe()}`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, remaining);
        this.#wake = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }

  #describe(): string {
    return JSON.stringify(this.#messages).slice(0, 500);
  }
}
