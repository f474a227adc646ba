import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { CladeError } from '../util/errors.js';
import { packageRoot } from '../util/paths.js';
import { CLADE_IN_RUNNER, cladeCarry, GUEST_PATHS, qemuCarry } from '../runner/carry.js';
import { shellQuote, type Carry } from '../runner/payload.js';
import { runInRunner } from '../runner/runner.js';
import { saveBenchResult, summarize, type Summary } from './stats.js';
import type { EngineUnderTest, VmmBenchPlan } from './vmm-payload.js';

export type { EngineUnderTest, VmmBenchPlan } from './vmm-payload.js';

export type VmmBenchOptions = VmmBenchPlan & {
  /** Runner RAM, MiB: every guest, and QEMU's children, live in it. */
  runnerMemoryMiB: number;
  /** Limit for the whole runner run, boot included, ms. */
  timeoutMs: number;
  /** The guest image both engines boot (a name or digest prefix here; it is the runner's default image). */
  image?: string;
  log?: (line: string) => void;
};

export type EngineFigures = { metrics: Record<string, Summary>; notes: string[]; raw: Record<string, number[]> };

export type VmmBenchResult = {
  benchmark: 'vmm';
  date: string;
  /** Where the figures come from: everything ran inside the runner, itself emulated. */
  where: string;
  plan: VmmBenchPlan;
  runnerMemoryMiB: number;
  engines: Partial<Record<EngineUnderTest, EngineFigures>>;
  /** Median ratios (NaN when a side is missing). */
  ratios: {
    /** QEMU's snapshot restore of a child / clade-vmm's fork(2) → first KVM_RUN. */
    hostForkWorkQemuOverVmm: number;
    /** Fork → result at the deepest depth / at depth 1, per engine. */
    deepestOverDepth1: Partial<Record<EngineUnderTest, number>>;
  };
  runner: { bootMs: number; payloadMs: number; exitCode: number };
  jsonPath?: string;
};

const PAYLOAD = 'dist/bench/vmm-payload.js';

/** What the runner needs to run the SDK on both engines: clade itself and QEMU. */
async function carries(image: string | undefined): Promise<Carry[]> {
  if (!existsSync(join(packageRoot(), PAYLOAD))) throw new CladeError('unavailable', `${join(packageRoot(), PAYLOAD)} is missing: run \`npm run build\` first`);
  return [...(await cladeCarry({ daemon: true, image })), ...(await qemuCarry())];
}

/** Reads the payload's lines (src/bench/vmm-payload.ts) as they stream out of the runner. */
class PayloadReader {
  readonly samples: Partial<Record<EngineUnderTest, Record<string, number[]>>> = {};
  readonly notes: Partial<Record<EngineUnderTest, string[]>> = {};
  readonly generalNotes: string[] = [];
  done = false;
  private partial = '';

  constructor(private readonly log: (line: string) => void) {}

  feed(chunk: Buffer): void {
    const lines = (this.partial + chunk.toString('utf8')).split('\n');
    this.partial = lines.pop() ?? '';
    for (const raw of lines) this.line(raw.replace(/\r$/, ''));
  }

  private line(line: string): void {
    const [kind, ...rest] = line.split(' ');
    if (kind === 'bench-sample') {
      const [engine, metric, value] = rest as [EngineUnderTest, string, string];
      ((this.samples[engine] ??= {})[metric] ??= []).push(Number(value));
    } else if (kind === 'bench-note') {
      const [engine, ...text] = rest;
      if (engine === 'vmm' || engine === 'qemu') (this.notes[engine] ??= []).push(text.join(' '));
      else this.generalNotes.push(text.join(' '));
      this.log(`note (${engine}): ${text.join(' ')}`);
    } else if (kind === 'bench-progress') this.log(rest.join(' '));
    else if (kind === 'bench-done') this.done = true;
    else if (line.trim()) this.log(`runner: ${line}`);
  }
}

/**
 * clade-vmm against the qemu engine (with KVM), both inside one runner run:
 * cold boot, forks of 1/10/100 children, host-side fork work, nested forks,
 * child memory and parent pause, each to the guest's answer reaching the SDK.
 */
export async function benchVmm(opts: VmmBenchOptions): Promise<VmmBenchResult> {
  const log = opts.log ?? (() => undefined);
  const plan: VmmBenchPlan = { engines: opts.engines, runs: opts.runs, fanoutRuns: opts.fanoutRuns, fanouts: opts.fanouts, largeFanoutRuns: opts.largeFanoutRuns, depths: opts.depths, depthRuns: opts.depthRuns, guestMiB: opts.guestMiB };
  const reader = new PayloadReader(log);
  log(`booting a runner (${opts.runnerMemoryMiB} MiB) with Node.js, QEMU, clade-vmm and the image ${opts.image ?? 'default'}`);
  const env = `CLADE_HOME=${CLADE_IN_RUNNER.home} CLADE_QEMU=${GUEST_PATHS.qemu}`;
  const r = await runInRunner({
    carry: await carries(opts.image),
    command: `${env} ${GUEST_PATHS.node} ${CLADE_IN_RUNNER.package}/${PAYLOAD} ${shellQuote(JSON.stringify(plan))}`,
    memoryMiB: opts.runnerMemoryMiB,
    timeoutMs: opts.timeoutMs,
    onOutput: (chunk) => reader.feed(chunk),
  });
  if (!reader.done) {
    throw new CladeError('internal', `the benchmark payload stopped early (exit ${r.exitCode}); its last output:\n${r.output.split('\n').slice(-30).join('\n')}`);
  }

  const engines: Partial<Record<EngineUnderTest, EngineFigures>> = {};
  for (const engine of opts.engines) {
    const raw = reader.samples[engine] ?? {};
    const metrics: Record<string, Summary> = {};
    for (const [k, v] of Object.entries(raw)) metrics[k] = summarize(v);
    engines[engine] = { metrics, notes: reader.notes[engine] ?? [], raw };
  }
  const median = (e: EngineUnderTest, k: string) => engines[e]?.metrics[k]?.median ?? NaN;
  const deepest = Math.max(...opts.depths);
  const deepestOverDepth1: Partial<Record<EngineUnderTest, number>> = {};
  for (const e of opts.engines) deepestOverDepth1[e] = median(e, `depth${deepest}Ms`) / median(e, 'depth1Ms');
  const result: VmmBenchResult = {
    benchmark: 'vmm',
    date: new Date().toISOString(),
    where: 'inside the runner: QEMU TCG with nested SVM, 1 vCPU; both engines use the runner\'s /dev/kvm',
    plan,
    runnerMemoryMiB: opts.runnerMemoryMiB,
    engines,
    ratios: { hostForkWorkQemuOverVmm: median('qemu', 'hostForkWorkUs') / median('vmm', 'hostForkWorkUs'), deepestOverDepth1 },
    runner: { bootMs: r.timings.bootMs, payloadMs: r.timings.payloadMs, exitCode: r.exitCode },
  };
  return saveBenchResult(result);
}

type Row = { key: string; label: string; unit: 'ms' | 'µs' | 'MiB' };

/** Owners of the guest pages a vmm child wrote (src/bench/guest-pages.ts), in table order. */
const GUEST_PAGE_ORIGINS = [
  ['interpreterWorkerHeap', 'Python worker (runs the code): heap'],
  ['interpreterWorkerLibraries', 'Python worker: libraries\' data'],
  ['interpreterWorkerStack', 'Python worker: stack'],
  ['interpreterSupervisorHeap', 'Python supervisor: heap'],
  ['interpreterSupervisorLibraries', 'Python supervisor: libraries\' data'],
  ['interpreterSupervisorStack', 'Python supervisor: stack'],
  ['agent', 'guest agent'],
  ['otherProcesses', 'other processes'],
  ['kernelData', 'kernel image: data'],
  ['kernelBss', 'kernel image: bss'],
  ['kernelSlab', 'kernel slab'],
  ['kernelPageTables', 'page tables'],
  ['kernelReserved', 'other reserved kernel memory'],
  ['kernelOther', 'other kernel memory (per-CPU, vmalloc, stacks, free blocks)'],
  ['tmpfs', 'tmpfs and shared memory'],
  ['pageCache', 'page cache'],
  ['freed', 'freed again'],
] as const;

/** The table's rows in order; metrics not listed here follow under their own names. */
function rowsFor(plan: VmmBenchPlan): Row[] {
  const rows: Row[] = [{ key: 'coldBootToResultMs', label: '(1) cold boot -> first command result', unit: 'ms' }];
  for (const n of plan.fanouts) {
    rows.push({ key: `fork${n}ChildResultMs`, label: n === 1 ? '(2) fork 1 child -> its first result' : `(2) fork ${n} -> each child's first result`, unit: 'ms' });
    if (n > 1) rows.push({ key: `fork${n}AllResultsMs`, label: `(2) fork ${n} -> all ${n} results`, unit: 'ms' });
  }
  rows.push(
    { key: 'parentRamCopyBeforeForkMs', label: '    qemu: RAM copy a forked parent needs before its next fork (done ahead, not in (2))', unit: 'ms' },
    { key: 'hostForkWorkUs', label: '(3) host fork work per child, fork of 1 (vmm: fork(2) -> first KVM_RUN; qemu: state load -> running)', unit: 'µs' },
    { key: 'childBuiltUs', label: '    vmm: fork(2) -> child VM built', unit: 'µs' },
    { key: 'childRestoredUs', label: '    vmm: fork(2) -> child state restored', unit: 'µs' },
  );
  for (const n of plan.fanouts) if (n > 1) rows.push({ key: `fork${n}HostForkWorkUs`, label: `(3) host fork work per child, fork of ${n}`, unit: 'µs' });
  for (const d of plan.depths) rows.push({ key: `depth${d}Ms`, label: `(4) fork at depth ${d} -> result`, unit: 'ms' });
  for (const d of plan.depths) rows.push({ key: `depth${d}PromoteMs`, label: `(4) qemu: RAM copy in the fork at depth ${d} (part of the line above)`, unit: 'ms' });
  for (const d of plan.depths) rows.push({ key: `depth${d}HostForkWorkUs`, label: `(4) host fork work at depth ${d}`, unit: 'µs' });
  rows.push(
    { key: 'parentRssBeforeForkMiB', label: '(5) parent resident memory before the fork of 10 (each child\'s PSS holds 1/11 of what stays shared)', unit: 'MiB' },
    { key: 'childIdlePssMiB', label: '(5) child PSS, idle after its fixups (fork of 10)', unit: 'MiB' },
    { key: 'childIdlePrivateMiB', label: '(5) child private memory (what it alone holds), idle after its fixups', unit: 'MiB' },
    { key: 'childPssMiB', label: '(5) child PSS after one command (fork of 10)', unit: 'MiB' },
    { key: 'childPrivateMiB', label: '(5) child private memory after one command', unit: 'MiB' },
  );
  for (const when of ['Idle', 'AfterCommand']) {
    rows.push({ key: `childGuestPages${when}MiB`, label: `(5) vmm: guest pages the child wrote${when === 'Idle' ? ', idle' : ', after one command'}`, unit: 'MiB' });
    for (const [origin, what] of GUEST_PAGE_ORIGINS)
      rows.push({ key: `childGuestPages${when}_${origin}MiB`, label: `    · ${what}`, unit: 'MiB' });
  }
  for (const n of plan.fanouts) rows.push({ key: `fork${n}ParentPauseMs`, label: `(6) parent pause, fork of ${n}`, unit: 'ms' });
  for (const d of plan.depths) rows.push({ key: `depth${d}ParentPauseMs`, label: `(6) parent pause, fork at depth ${d}`, unit: 'ms' });
  return rows;
}

function format(value: number | undefined, unit: Row['unit']): string {
  if (value === undefined || !Number.isFinite(value)) return '-';
  return unit === 'µs' ? value.toFixed(0) : unit === 'MiB' && value < 10 ? value.toFixed(2) : value.toFixed(1);
}

/** The result as table rows: metric, then median / p90 / n for each engine. */
export function vmmBenchRows(r: VmmBenchResult): string[][] {
  const engines = r.plan.engines;
  const header = ['METRIC', 'UNIT', ...engines.flatMap((e) => [`${e} MEDIAN`, `${e} P90`, `${e} N`])];
  const known = rowsFor(r.plan);
  const seen = new Set(known.map((row) => row.key));
  const extra = engines.flatMap((e) => Object.keys(r.engines[e]?.metrics ?? {})).filter((k) => !seen.has(k) && (seen.add(k), true));
  const all = [...known, ...extra.map((key): Row => ({ key, label: key, unit: key.endsWith('Us') ? 'µs' : key.endsWith('MiB') ? 'MiB' : 'ms' }))];
  const rows = all
    .filter((row) => engines.some((e) => r.engines[e]?.metrics[row.key]))
    .map((row) => [
      row.label,
      row.unit,
      ...engines.flatMap((e) => {
        const s = r.engines[e]?.metrics[row.key];
        return [format(s?.median, row.unit), format(s?.p90, row.unit), s ? String(s.n) : '-'];
      }),
    ]);
  return [header, ...rows];
}
