import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from 'prom-client';

export type Operation = 'create' | 'fork' | 'exec' | 'snapshot' | 'start' | 'code';

/** Prometheus metrics of one daemon: operation counts and latencies, sandboxes, process memory. */
export class Metrics {
  readonly registry = new Registry();
  private readonly ops = new Counter({ name: 'clade_operations_total', help: 'operations by kind and outcome', labelNames: ['op', 'outcome'], registers: [this.registry] });
  private readonly latency = new Histogram({
    name: 'clade_operation_seconds',
    help: 'operation latency (exec: until the command ended)',
    labelNames: ['op'],
    buckets: [0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64],
    registers: [this.registry],
  });

  constructor(sandboxesAlive: () => number, poolSlots: () => number) {
    collectDefaultMetrics({ register: this.registry });
    new Gauge({ name: 'clade_sandboxes_alive', help: 'sandboxes this daemon runs', registers: [this.registry], collect() { this.set(sandboxesAlive()); } });
    new Gauge({ name: 'clade_pool_slots', help: 'pre-started VM processes waiting for a fork or snapshot start', registers: [this.registry], collect() { this.set(poolSlots()); } });
  }

  /** Times `fn` as operation `op`, counting success and failure. */
  async time<T>(op: Operation, fn: () => Promise<T>): Promise<T> {
    const end = this.latency.startTimer({ op });
    try {
      const r = await fn();
      this.ops.inc({ op, outcome: 'ok' });
      return r;
    } catch (err) {
      this.ops.inc({ op, outcome: 'error' });
      throw err;
    } finally {
      end();
    }
  }
}
