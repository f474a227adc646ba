import { CladeError } from '../util/errors.js';

/** Items queued for a slow reader before what feeds the queue is paused. */
const HIGH_WATER = 64;
/** How long a reader may leave the queue full (the source paused) before it is cut off. */
export const STALLED_READER_MS = 120_000;

export type Next<T> = { kind: 'item'; value: T } | { kind: 'end' } | { kind: 'idle' };

/**
 * A queue between a sandbox's output and one streamed answer (a Connect
 * stream, an NDJSON body). The answer pulls items as fast as its client takes
 * them; while more than HIGH_WATER items wait, `hold` is called (the
 * sandbox's agent channel stops being read, so the guest waits) until the
 * reader catches up. A reader that stays behind for STALLED_READER_MS is cut
 * off, so a client that never reads cannot keep a sandbox paused. Consecutive
 * items may be merged (`merge`), so output that arrives a byte at a time
 * becomes few messages.
 */
export class PacedQueue<T> {
  private readonly items: T[] = [];
  private waiter?: (n: Next<T>) => void;
  private ended = false;
  private failure?: Error;
  private release?: () => void;
  private stall?: NodeJS.Timeout;

  constructor(
    private readonly opts: {
      /** Pauses the source; returns how to resume it. */
      hold?: () => () => void;
      /** Merges `next` into `last` (returning the merged item), or returns undefined to queue it apart. */
      merge?: (last: T, next: T) => T | undefined;
      highWater?: number;
      stalledMs?: number;
    } = {},
  ) {}

  get closed(): boolean {
    return this.ended || this.failure !== undefined;
  }

  push(item: T): void {
    if (this.closed) return;
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      w({ kind: 'item', value: item });
      return;
    }
    const last = this.items.length > 0 ? this.items[this.items.length - 1] : undefined;
    const merged = last !== undefined && this.opts.merge ? this.opts.merge(last, item) : undefined;
    if (merged !== undefined) this.items[this.items.length - 1] = merged;
    else this.items.push(item);
    if (this.items.length >= (this.opts.highWater ?? HIGH_WATER) && !this.release && this.opts.hold) {
      this.release = this.opts.hold();
      this.stall = setTimeout(() => this.fail(new CladeError('timeout', `the client read nothing for ${Math.round((this.opts.stalledMs ?? STALLED_READER_MS) / 1000)} s while output waited; the stream was cut off`)), this.opts.stalledMs ?? STALLED_READER_MS);
      this.stall.unref();
    }
  }

  /** No more items; the reader gets what is queued, then the end. */
  end(): void {
    if (this.closed) return;
    this.ended = true;
    this.wake();
  }

  /** Ends the queue with an error, after nothing else: what was queued is dropped. */
  fail(err: Error): void {
    if (this.closed) return;
    this.failure = err;
    this.items.length = 0;
    this.unhold();
    this.wake();
  }

  /** The reader went away: drop everything and resume the source. */
  close(): void {
    this.ended = true;
    this.items.length = 0;
    this.unhold();
    this.wake();
  }

  /** The next item, the end, or `idle` after `idleMs` with nothing (for keep-alives). Throws the queue's failure. */
  next(idleMs?: number, signal?: AbortSignal): Promise<Next<T>> {
    if (this.failure) return Promise.reject(this.failure);
    const item = this.items.shift();
    if (item !== undefined) {
      if (this.items.length < (this.opts.highWater ?? HIGH_WATER) / 2) this.unhold();
      return Promise.resolve({ kind: 'item', value: item });
    }
    this.unhold();
    if (this.ended) return Promise.resolve({ kind: 'end' });
    return new Promise<Next<T>>((resolve, reject) => {
      let timer: NodeJS.Timeout | undefined;
      const onAbort = () => settle({ kind: 'end' });
      const settle = (n: Next<T>) => {
        clearTimeout(timer);
        signal?.removeEventListener('abort', onAbort);
        if (this.waiter === settle) this.waiter = undefined;
        if (this.failure) reject(this.failure);
        else resolve(n);
      };
      this.waiter = settle;
      if (idleMs !== undefined && idleMs > 0) timer = setTimeout(() => settle({ kind: 'idle' }), idleMs);
      if (signal) {
        if (signal.aborted) onAbort();
        else signal.addEventListener('abort', onAbort, { once: true });
      }
    });
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = undefined;
    w?.({ kind: 'end' });
  }

  private unhold(): void {
    clearTimeout(this.stall);
    this.stall = undefined;
    this.release?.();
    this.release = undefined;
  }
}
