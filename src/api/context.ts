import { CladeError } from '../util/errors.js';
import type { Metrics } from './metrics.js';
import type { SandboxRegistry } from './registry.js';

/** Runs at most `max` operations at once and refuses the rest at once (no unbounded queue). */
export class ConcurrencyGate {
  private active = 0;

  constructor(
    private readonly max: number,
    private readonly what: string,
    /** An operation holds its place at most this long; then its caller gets a timeout and the place is free again. */
    private readonly holdLimitMs = Infinity,
  ) {}

  private readonly byKey = new Map<string, number>();

  /**
   * Like run(), but calls with the same key share one place: concurrent forks
   * of one parent are merged into a single fork by the core, so they are one
   * operation, not many.
   */
  async runKeyed<T>(key: string, fn: () => Promise<T>): Promise<T> {
    const sharing = this.byKey.get(key) ?? 0;
    if (sharing === 0 && this.active >= this.max) throw this.refusal();
    if (sharing === 0) this.active++;
    this.byKey.set(key, sharing + 1);
    try {
      return await this.bounded(fn);
    } finally {
      const left = this.byKey.get(key)! - 1;
      if (left === 0) {
        this.byKey.delete(key);
        this.active--;
      } else this.byKey.set(key, left);
    }
  }

  private refusal(): CladeError {
    return new CladeError('unavailable', `${this.active} ${this.what} are already running (limit ${this.max}); retry shortly, or restart \`clade serve\` with a larger --max-concurrent-forks`);
  }

  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.active >= this.max) throw this.refusal();
    this.active++;
    try {
      return await this.bounded(fn);
    } finally {
      this.active--;
    }
  }

  /** Runs fn, but stops waiting for it after the hold limit (fn itself goes on, and fails on its own deadlines). */
  private bounded<T>(fn: () => Promise<T>): Promise<T> {
    const work = fn();
    if (!Number.isFinite(this.holdLimitMs)) return work;
    let timer: NodeJS.Timeout | undefined;
    const limit = new Promise<never>((_, reject) => {
      timer = setTimeout(() => reject(new CladeError('timeout', `gave up waiting after ${Math.round(this.holdLimitMs / 1000)} s: the sandbox is not answering; it keeps its own deadlines, kill it if it stays stuck`)), this.holdLimitMs);
    });
    work.catch(() => undefined);
    return Promise.race([work, limit]).finally(() => clearTimeout(timer));
  }
}

/** What every route needs; one per daemon, shared by its unix and TCP listeners. */
export type DaemonContext = {
  registry: SandboxRegistry;
  metrics: Metrics;
  /** Forks, snapshots and starts from snapshots: each pauses or starts many VMs. */
  forkGate: ConcurrencyGate;
  /** Lifetime of a sandbox whose request gives none, ms (0 = until deleted). */
  defaultTimeoutMs: number;
  startedAt: number;
  version: string;
};
