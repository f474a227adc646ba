import { connect, type Socket } from 'node:net';
import { CladeError } from '../../util/errors.js';

type QmpReply = { return?: unknown; error?: { class: string; desc: string }; event?: string; data?: unknown; id?: number };

/** Largest QMP line we accept from QEMU before treating the stream as broken. */
const MAX_LINE = 4 * 1024 * 1024;

/**
 * A small client for QEMU's QMP (JSON lines over a unix socket): negotiation,
 * commands matched to replies by id, and event subscriptions.
 */
export class QmpClient {
  private socket!: Socket;
  private buf = '';
  private nextId = 1;
  private readonly waiting = new Map<number, { resolve: (v: unknown) => void; reject: (e: Error) => void }>();
  private readonly listeners = new Set<(event: string, data: unknown) => void>();
  private markClosed!: () => void;
  /** Resolves when the connection ends; QEMU closing it unasked means the process is exiting. */
  readonly closed = new Promise<void>((resolve) => (this.markClosed = resolve));

  static async connect(path: string): Promise<QmpClient> {
    const c = new QmpClient();
    await new Promise<void>((resolve, reject) => {
      c.socket = connect(path);
      c.socket.once('connect', () => resolve());
      c.socket.once('error', reject);
    });
    c.socket.on('error', () => undefined);
    c.socket.on('data', (d: Buffer) => c.onData(d.toString('utf8')));
    c.socket.on('close', () => {
      for (const w of c.waiting.values()) w.reject(new CladeError('killed', 'QEMU closed its control socket'));
      c.waiting.clear();
      c.markClosed();
    });
    await c.execute('qmp_capabilities');
    return c;
  }

  execute<T = unknown>(command: string, args?: Record<string, unknown>, timeoutMs = 30_000): Promise<T> {
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiting.delete(id);
        reject(new CladeError('timeout', `QEMU did not answer ${command} within ${timeoutMs} ms`));
      }, timeoutMs);
      this.waiting.set(id, {
        resolve: (v) => (clearTimeout(timer), resolve(v as T)),
        reject: (e) => (clearTimeout(timer), reject(e)),
      });
      this.socket.write(JSON.stringify({ execute: command, ...(args ? { arguments: args } : {}), id }) + '\n');
    });
  }

  onEvent(listener: (event: string, data: unknown) => void): () => void {
    this.listeners.add(listener);
    return () => this.listeners.delete(listener);
  }

  close(): void {
    this.socket?.destroy();
  }

  private onData(text: string): void {
    this.buf += text;
    if (this.buf.length > MAX_LINE) {
      this.buf = '';
      this.socket.destroy();
      return;
    }
    let nl: number;
    while ((nl = this.buf.indexOf('\n')) >= 0) {
      const line = this.buf.slice(0, nl).trim();
      this.buf = this.buf.slice(nl + 1);
      if (line) this.onMessage(JSON.parse(line) as QmpReply);
    }
  }

  private onMessage(msg: QmpReply): void {
    if (msg.event) {
      for (const l of this.listeners) l(msg.event, msg.data);
      return;
    }
    if (msg.id === undefined) return;
    const w = this.waiting.get(msg.id);
    if (!w) return;
    this.waiting.delete(msg.id);
    if (msg.error) w.reject(new CladeError('internal', `QEMU refused: ${msg.error.desc}`));
    else w.resolve(msg.return);
  }
}
