import { Sandbox } from '../sdk/sandbox.js';
import { saveBenchResult, summarize, type Summary } from './stats.js';

export type BootBenchResult = {
  benchmark: 'boot';
  date: string;
  accelerator: string;
  runs: number;
  /** Request to the first command's output reaching the host, ms. */
  toFirstResultMs: Summary;
  /** Of which: until the agent answered HELLO, ms. */
  toReadyMs: Summary;
  /** `python3 -c 'import numpy'` in a fresh guest, ms. */
  coldNumpyImportMs: Summary;
  raw: { toFirstResultMs: number[]; toReadyMs: number[]; coldNumpyImportMs: number[] };
  jsonPath?: string;
};

/** Cold boot to the first command result inside the guest, repeated `runs` times. */
export async function benchBoot(runs: number, onRun?: (i: number, ms: number) => void): Promise<BootBenchResult> {
  const first: number[] = [];
  const ready: number[] = [];
  const numpy: number[] = [];
  let accelerator = '';
  for (let i = 0; i < runs; i++) {
    const t0 = performance.now();
    const sb = await Sandbox.create();
    try {
      const r = await sb.commands.run('echo ready');
      if (r.stdout.trim() !== 'ready') throw new Error(`unexpected output ${JSON.stringify(r.stdout)}`);
      const t1 = performance.now();
      first.push(t1 - t0);
      ready.push(sb.getInfo().bootMs);
      accelerator = sb.getInfo().accelerator;
      const n0 = performance.now();
      await sb.commands.run(['python3', '-c', 'import numpy']);
      numpy.push(performance.now() - n0);
      onRun?.(i, t1 - t0);
    } finally {
      await sb.kill();
    }
  }
  const result: BootBenchResult = {
    benchmark: 'boot',
    date: new Date().toISOString(),
    accelerator,
    runs,
    toFirstResultMs: summarize(first),
    toReadyMs: summarize(ready),
    coldNumpyImportMs: summarize(numpy),
    raw: { toFirstResultMs: first, toReadyMs: ready, coldNumpyImportMs: numpy },
  };
  return saveBenchResult(result);
}
