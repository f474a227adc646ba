import { CladeError } from '../core/errors.js';
import type { Metrics } from './metrics.js';
import type { SandboxRegistry } from './registry.js';

/** Runs at most `max` operations at once and refuses the rest at once (no unbounded queue). */
export class ConcurrencyGate {
  private active = 0;

  constructor(
    private readonly max: number,
    private readonly what: string,
  ) {}

  async run<T>(fn: () => Promise<T>): Promise<T> {
    if (this.active >= this.max) throw new CladeError('unavailable', `${this.active} ${this.what} are already running (limit ${this.max}); retry shortly, or restart \`clade serve\` with a larger --max-concurrent-forks`);
    this.active++;
    try {
      return await fn();
    } finally {
      this.active--;
    }
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
