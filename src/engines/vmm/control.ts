import { createConnection, type Socket } from 'node:net';
import { CladeError, errorMessage } from '../../util/errors.js';

/** A reply line longer than this is a broken VMM, not a big answer (a `forks 256` reply is at most ~70 KiB; clade-vmm caps replies at 128 KiB). */
const MAX_REPLY_BYTES = 256 * 1024;
const DEFAULT_TIMEOUT_MS = 30_000;

export type ControlReply = { ok: boolean; error?: string } & Record<string, unknown>;

/** A request clade-vmm answered with ok: false; `reply` holds what else it said (a fork that failed half-way lists the children it made). */
export class VmmRefusal extends CladeError {
  constructor(
    message: string,
    readonly reply: ControlReply,
  ) {
    super('internal', message);
  }
}

type Waiter = { resolve: (r: ControlReply) => void; reject: (e: CladeError) => void; timer: NodeJS.Timeout };

/**
 * The control channel of one clade-vmm process (docs/vmm.md): a request is a
 * line of words, each answered in order by one JSON line. Requests queue on
 * one connection, so replies pair with requests by order.
 */
export class VmmControl {
  private socket?: Socket;
  private buffer = '';
  private readonly waiting: Waiter[] = [];
  private closed?: CladeError;

  private constructor(private readonly path: string) {}

  /** Connects, retrying while the VMM is still starting, until `deadline`. */
  static async connect(path: string, deadline: number, isAlive: () => boolean = () => true): Promise<VmmControl> {
    const control = new VmmControl(path);
    for (;;) {
      try {
        await control.open();
        return control;
      } catch (err) {
        if (!isAlive()) throw new CladeError('boot_failed', `clade-vmm exited before its control socket ${path} answered`);
        if (Date.now() > deadline) throw new CladeError('timeout', `could not connect to clade-vmm's control socket ${path}: ${errorMessage(err)}`);
        await new Promise((r) => setTimeout(r, 5));
      }
    }
  }

  /** Sends one request; resolves with its reply, or rejects with the VMM's error. */
  request(words: (string | number)[], timeoutMs = DEFAULT_TIMEOUT_MS): Promise<ControlReply> {
    if (this.closed) return Promise.reject(this.closed);
    const line = words.map(String).join(' ');
    if (/[\n\r]/.test(line)) return Promise.reject(new CladeError('bad_request', 'a control request cannot contain a line break'));
    return new Promise<ControlReply>((resolve, reject) => {
      const timer = setTimeout(() => this.fail(new CladeError('timeout', `clade-vmm did not answer "${words[0]}" within ${timeoutMs} ms`)), timeoutMs);
      this.waiting.push({ resolve, reject, timer });
      this.socket!.write(line + '\n');
    }).then((reply) => {
      if (!reply.ok) throw new VmmRefusal(`clade-vmm refused "${words[0]}": ${reply.error ?? 'no reason given'}`, reply);
      return reply;
    });
  }

  close(): void {
    this.fail(new CladeError('killed', 'the control channel was closed'));
  }

  private open(): Promise<void> {
    return new Promise((resolve, reject) => {
      const s = createConnection(this.path);
      s.once('connect', () => {
        s.removeListener('error', reject);
        this.attach(s);
        resolve();
      });
      s.once('error', reject);
    });
  }

  private attach(s: Socket): void {
    this.socket = s;
    s.setEncoding('utf8');
    s.on('data', (chunk: string) => this.onData(chunk));
    s.on('error', () => undefined);
    s.on('close', () => this.fail(new CladeError('killed', 'clade-vmm closed its control channel (the VM ended)')));
  }

  private onData(chunk: string): void {
    this.buffer += chunk;
    let nl: number;
    while ((nl = this.buffer.indexOf('\n')) >= 0) {
      const line = this.buffer.slice(0, nl);
      this.buffer = this.buffer.slice(nl + 1);
      const waiter = this.waiting.shift();
      if (!waiter) return this.fail(new CladeError('protocol_error', 'clade-vmm sent a reply nobody asked for'));
      clearTimeout(waiter.timer);
      try {
        waiter.resolve(JSON.parse(line) as ControlReply);
      } catch {
        return this.fail(new CladeError('protocol_error', `clade-vmm sent a reply that is not JSON: ${line.slice(0, 200)}`));
      }
    }
    if (this.buffer.length > MAX_REPLY_BYTES) this.fail(new CladeError('protocol_error', `clade-vmm sent a reply line over ${MAX_REPLY_BYTES} bytes`));
  }

  private fail(err: CladeError): void {
    if (this.closed) return;
    this.closed = err;
    this.socket?.destroy();
    for (const w of this.waiting.splice(0)) {
      clearTimeout(w.timer);
      w.reject(err);
    }
  }
}
