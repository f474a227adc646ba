import { rmSync } from 'node:fs';
import { CladeError } from '../util/errors.js';
import { defaultManager } from '../core/default.js';
import { snapshotDir } from '../core/snapshots.js';
import { Sandbox } from '../sdk/sandbox.js';
import { hostUsedBytes, privateBytes, pssBytes } from './memory.js';
import { saveBenchResult, summarize, type Summary } from './stats.js';

const PROBE = 'numpy.zeros(5).tolist()';
const EXPECTED = '[0.0, 0.0, 0.0, 0.0, 0.0]';

export type ForkBenchOptions = { runs: number; fanout: number; depth: number; log?: (line: string) => void };

export type ForkBenchResult = {
  benchmark: 'fork';
  date: string;
  accelerator: string;
  runs: number;
  fanout: number;
  metrics: Record<string, Summary>;
  memory: { childPssMiB: Summary; childPrivateMiB: Summary; hostUsedByFanoutMiB: number; fanout: number };
  raw: Record<string, number[]>;
  jsonPath?: string;
};

function ok(results: (Sandbox | CladeError)[]): Sandbox[] {
  const bad = results.find((r) => r instanceof CladeError);
  if (bad) throw bad;
  return results as Sandbox[];
}

async function probe(sb: Sandbox): Promise<void> {
  const r = await sb.runCode(PROBE);
  if (r.value !== EXPECTED) throw new CladeError('internal', `child answered ${JSON.stringify(r.value)} instead of ${EXPECTED}: ${r.error?.traceback ?? ''}`);
}

async function killAll(sbs: Sandbox[]): Promise<void> {
  await Promise.all(sbs.map((s) => s.kill()));
}

/**
 * clade's fork benchmark, every figure measured from the request to the
 * guest's answer reaching the host, side by side with a cold boot and with a
 * restore of a persistent snapshot in the same run.
 */
export async function benchFork(opts: ForkBenchOptions): Promise<ForkBenchResult> {
  const log = opts.log ?? (() => undefined);
  const raw: Record<string, number[]> = {
    coldBootToNumpyResultMs: [],
    snapshotRestoreToResultMs: [],
    fork1ToResultMs: [],
    fork1WarmToResultMs: [],
    parentPauseMs: [],
    fanoutAllResultsMs: [],
    fanoutWarmAllResultsMs: [],
    depth1Ms: [],
    depth5Ms: [],
    depth10Ms: [],
  };
  const childPss: number[] = [];
  const childPrivate: number[] = [];
  let hostUsedByFanout = 0;
  let accelerator = '';
  const tag = `bench-fork-${process.pid}`;

  log('(a) cold boot + import numpy + first result');
  for (let i = 0; i < opts.runs; i++) {
    const t0 = performance.now();
    const sb = await Sandbox.create({ engine: 'qemu' }); // this benchmark compares the qemu engine's fork strategies
    try {
      await sb.runCode('import numpy');
      await probe(sb);
      raw.coldBootToNumpyResultMs!.push(performance.now() - t0);
      accelerator = sb.getInfo().accelerator;
    } finally {
      await sb.kill();
    }
  }

  const parent = await Sandbox.create({ engine: 'qemu' });
  try {
    await parent.runCode('import numpy');
    await probe(parent);
    await parent.snapshot({ tag });

    log('(restore) persistent snapshot → first result');
    for (let i = 0; i < opts.runs; i++) {
      const t0 = performance.now();
      const [kid] = ok(await Sandbox.fromSnapshot(tag));
      await probe(kid!);
      raw.snapshotRestoreToResultMs!.push(performance.now() - t0);
      await kid!.kill();
    }

    log('(b, e) fork 1 child → its first result; parent pause');
    for (const warm of [false, true]) {
      for (let i = 0; i < opts.runs; i++) {
        await parent.prewarmForks(warm ? 1 : 0);
        const t0 = performance.now();
        const [kid] = ok(await parent.fork(1));
        await probe(kid!);
        (warm ? raw.fork1WarmToResultMs! : raw.fork1ToResultMs!).push(performance.now() - t0);
        raw.parentPauseMs!.push(parent.lastForkTimings!.parentPauseMs);
        await kid!.kill();
      }
    }
    await parent.prewarmForks(0);

    log(`(c, d) ${opts.fanout} children at once, without and with a warm pool`);
    for (const warm of [false, true]) {
      for (let i = 0; i < opts.runs; i++) {
        const before = hostUsedBytes();
        await parent.prewarmForks(warm ? opts.fanout : 0);
        const t0 = performance.now();
        const kids = ok(await parent.fork(opts.fanout));
        await Promise.all(kids.map((k) => probe(k)));
        (warm ? raw.fanoutWarmAllResultsMs! : raw.fanoutAllResultsMs!).push(performance.now() - t0);
        raw.parentPauseMs!.push(parent.lastForkTimings!.parentPauseMs);
        if (warm && i === 0) {
          // Pool slots and children together: what the host gave these children.
          hostUsedByFanout = hostUsedBytes() - before;
          for (const k of kids) {
            const pid = defaultManager().get(k.sandboxId).vm.pid;
            childPss.push(pssBytes(pid) / 2 ** 20);
            childPrivate.push(privateBytes(pid) / 2 ** 20);
          }
        }
        await killAll(kids);
      }
    }
    await parent.prewarmForks(0);

    log(`(f) fork latency by depth, to ${opts.depth}`);
    for (let i = 0; i < opts.runs; i++) {
      const chain: Sandbox[] = [];
      let current = parent;
      for (let d = 1; d <= opts.depth; d++) {
        const t0 = performance.now();
        const [kid] = ok(await current.fork(1));
        await probe(kid!);
        const ms = performance.now() - t0;
        if (d === 1) raw.depth1Ms!.push(ms);
        if (d === 5) raw.depth5Ms!.push(ms);
        if (d === 10) raw.depth10Ms!.push(ms);
        chain.push(kid!);
        current = kid!;
      }
      await killAll(chain);
    }
  } finally {
    await parent.kill();
    rmSync(snapshotDir(tag), { recursive: true, force: true });
  }

  const metrics: Record<string, Summary> = {};
  for (const [k, v] of Object.entries(raw)) if (v.length > 0) metrics[k] = summarize(v);
  const result: ForkBenchResult = {
    benchmark: 'fork',
    date: new Date().toISOString(),
    accelerator,
    runs: opts.runs,
    fanout: opts.fanout,
    metrics,
    memory: { childPssMiB: summarize(childPss), childPrivateMiB: summarize(childPrivate), hostUsedByFanoutMiB: hostUsedByFanout / 2 ** 20, fanout: opts.fanout },
    raw,
  };
  return saveBenchResult(result);
}
