// The payload of `clade bench vmm`: it runs inside the runner VM (whose
// /dev/kvm runs Linux guests), with this package's dist/ and clade-vmm, QEMU
// and the default image carried in. It drives both engines through the SDK
// and prints one line per measurement, which the host (src/bench/vmm.ts)
// collects:
//
//   bench-sample ENGINE METRIC VALUE    one sample (ms, µs or MiB as the metric's name says)
//   bench-note ENGINE TEXT              something that could not be measured, and why
//   bench-progress TEXT                 what it is doing now
//   bench-done                          the end
//
// Only the SDK and modules it already loads are imported: the runner gets the
// package's runtime dependencies only (cladeCarry with `daemon`).
import { defaultManager } from '../core/default.js';
import { VmmVm } from '../engines/vmm/vmm-engine.js';
import { Sandbox } from '../sdk/index.js';
import { framesByOrigin, privateGuestFrames } from './guest-pages.js';
import { privateBytes, pssBytes, rssBytes } from './memory.js';

export type EngineUnderTest = 'vmm' | 'qemu';

export type VmmBenchPlan = {
  engines: EngineUnderTest[];
  /** Repetitions of the cold boot and of the fork of one child. */
  runs: number;
  /** Repetitions of forks of 2 to 10 children. */
  fanoutRuns: number;
  /** Children per fork, measured each in its own forks. */
  fanouts: number[];
  /** Repetitions of forks of more than 10 children. */
  largeFanoutRuns: number;
  /** Depths at which fork → result is recorded (the chain goes to the deepest). */
  depths: number[];
  depthRuns: number;
  /** Guest RAM of every sandbox, MiB. */
  guestMiB: number;
};

/** The child's first command: an expression in the interpreter it inherited from the parent. */
const PROBE_CODE = 'counter + 1';
const PROBE_ANSWER = '42';
const STEP_TIMEOUT_MS = 120_000;
const LARGE_STEP_TIMEOUT_MS = 600_000;

function sample(engine: EngineUnderTest, metric: string, value: number): void {
  if (Number.isFinite(value)) console.log(`bench-sample ${engine} ${metric} ${value.toFixed(3)}`);
}
function note(engine: EngineUnderTest, text: string): void {
  console.log(`bench-note ${engine} ${text.replace(/\s+/g, ' ')}`);
}
function progress(text: string): void {
  console.log(`bench-progress ${text}`);
}

/** Rejects when `promise` takes longer than `ms`: a VMM whose control socket stopped answering must not stall the run. */
async function within<T>(ms: number, what: string, promise: Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const limit = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not finish within ${ms / 1000} s (a hung VM?)`)), ms);
  });
  try {
    return await Promise.race([promise, limit]);
  } finally {
    clearTimeout(timer);
  }
}

/** Every sandbox started, so that none outlives a failed step. */
const started = new Set<Sandbox>();

async function killAll(sandboxes: Iterable<Sandbox>): Promise<void> {
  const list = [...sandboxes];
  await Promise.all(list.map((s) => within(30_000, 'kill', s.kill()).catch(() => undefined)));
  for (const s of list) started.delete(s);
}

/** The children that started; with `partialNote`, a fork where some did not start goes on with the others (noted), else it fails. */
function forked(results: (Sandbox | Error)[], partialNote?: (text: string) => void): Sandbox[] {
  const kids = results.filter((r): r is Sandbox => r instanceof Sandbox);
  for (const k of kids) started.add(k);
  const failed = results.find((r): r is Error => !(r instanceof Sandbox));
  if (failed) {
    const text = `${results.length - kids.length} of ${results.length} children did not start: ${failed.message}`;
    if (!partialNote || kids.length === 0) throw new Error(text);
    partialNote(`${text}; the figures of this fork are for the ${kids.length} that did`);
  }
  return kids;
}

async function probe(sb: Sandbox): Promise<void> {
  const r = await sb.runCode(PROBE_CODE);
  if (r.value !== PROBE_ANSWER) throw new Error(`child answered ${JSON.stringify(r.value)} instead of ${PROBE_ANSWER}: ${r.error?.traceback ?? ''}`);
}

/** Host-side fork work of one child, µs: vmm, fork(2) → its first KVM_RUN (its own clock); qemu, the state load into its pre-started VM → running. */
async function recordHostForkWork(engine: EngineUnderTest, metricPrefix: string, kids: Sandbox[], restoreMs: number[]): Promise<void> {
  if (engine === 'qemu') {
    for (const ms of restoreMs) sample(engine, `${metricPrefix}Us`, ms * 1000);
    return;
  }
  for (const kid of kids) {
    const vm = defaultManager().get(kid.sandboxId).vm;
    if (!(vm instanceof VmmVm)) continue;
    const t = (await vm.status()).timing;
    if (t.forkNs <= 0 || t.firstRunNs <= 0) continue;
    sample(engine, `${metricPrefix}Us`, (t.firstRunNs - t.forkNs) / 1000);
    if (metricPrefix === 'hostForkWork') {
      sample(engine, 'childBuiltUs', (t.builtNs - t.forkNs) / 1000);
      sample(engine, 'childRestoredUs', (t.restoredNs - t.forkNs) / 1000);
    }
  }
}

async function coldBoots(engine: EngineUnderTest, plan: VmmBenchPlan): Promise<void> {
  for (let i = 0; i < plan.runs; i++) {
    progress(`${engine}: cold boot ${i + 1}/${plan.runs}`);
    const t0 = performance.now();
    const sb = await within(STEP_TIMEOUT_MS, 'cold boot', Sandbox.create({ engine, memoryMiB: plan.guestMiB }));
    started.add(sb);
    try {
      const r = await within(STEP_TIMEOUT_MS, 'first command', sb.commands.run('echo ready'));
      if (r.stdout !== 'ready\n') throw new Error(`the first command printed ${JSON.stringify(r.stdout)}`);
      sample(engine, 'coldBootToResultMs', performance.now() - t0);
      if (i === 0) note(engine, `accelerator ${sb.getInfo().accelerator}`);
    } finally {
      await killAll([sb]);
    }
  }
}

async function fanouts(engine: EngineUnderTest, plan: VmmBenchPlan, parent: Sandbox, sizes: number[]): Promise<void> {
  for (const n of sizes) {
    const runs = n > 10 ? plan.largeFanoutRuns : n > 1 ? plan.fanoutRuns : plan.runs;
    const timeoutMs = n > 10 ? LARGE_STEP_TIMEOUT_MS : STEP_TIMEOUT_MS;
    for (let i = 0; i < runs; i++) {
      progress(`${engine}: fork ${n} ${i + 1}/${runs}`);
      let kids: Sandbox[] = [];
      try {
        if (engine === 'qemu') {
          // A qemu parent that was forked before runs on a copy-on-write mapping and needs a RAM file of its own
          // (a RAM copy) before it can be frozen again: done ahead here, timed apart, as prewarmForks does.
          const c0 = performance.now();
          await within(timeoutMs, 'RAM copy of the parent', parent.prewarmForks(0));
          if (i > 0 || n !== plan.fanouts[0]) sample(engine, 'parentRamCopyBeforeForkMs', performance.now() - c0);
        }
        const t0 = performance.now();
        kids = await within(timeoutMs, `fork of ${n}`, parent.fork(n).then((r) => forked(r, n > 10 ? (text) => note(engine, `fork of ${n}, run ${i + 1}: ${text}`) : undefined)));
        const childMs = await within(timeoutMs, `first results of ${n} children`, Promise.all(kids.map((k) => probe(k).then(() => performance.now() - t0))));
        if (n > 1) sample(engine, `fork${n}AllResultsMs`, Math.max(...childMs));
        for (const ms of childMs) sample(engine, `fork${n}ChildResultMs`, ms);
        const timings = parent.lastForkTimings;
        if (timings) sample(engine, `fork${n}ParentPauseMs`, timings.parentPauseMs);
        if (n === 1) await within(STEP_TIMEOUT_MS, 'child status', recordHostForkWork(engine, 'hostForkWork', kids, timings?.childRestoreMs ?? []));
        else await within(timeoutMs, 'children status', recordHostForkWork(engine, `fork${n}HostForkWork`, kids, timings?.childRestoreMs ?? []));
      } catch (err) {
        note(engine, `fork of ${n} children, run ${i + 1}: ${(err as Error).message}`);
        if (n > 10) {
          await killAll(kids);
          break; // the same will not fit on the next try either
        }
      } finally {
        await killAll(kids);
      }
    }
  }
}

async function depths(engine: EngineUnderTest, plan: VmmBenchPlan, parent: Sandbox): Promise<void> {
  const deepest = Math.max(...plan.depths);
  for (let i = 0; i < plan.depthRuns; i++) {
    progress(`${engine}: nested forks to depth ${deepest}, ${i + 1}/${plan.depthRuns}`);
    const chain: Sandbox[] = [];
    try {
      let current = parent;
      for (let d = 1; d <= deepest; d++) {
        const t0 = performance.now();
        const [kid] = await within(STEP_TIMEOUT_MS, `fork at depth ${d}`, current.fork(1).then((r) => forked(r)));
        chain.push(kid!);
        await within(STEP_TIMEOUT_MS, `result at depth ${d}`, probe(kid!));
        if (plan.depths.includes(d)) {
          sample(engine, `depth${d}Ms`, performance.now() - t0);
          const timings = current.lastForkTimings;
          if (timings) sample(engine, `depth${d}ParentPauseMs`, timings.parentPauseMs);
          if (engine === 'qemu' && timings) sample(engine, `depth${d}PromoteMs`, timings.promoteMs);
          await within(STEP_TIMEOUT_MS, 'child status', recordHostForkWork(engine, `depth${d}HostForkWork`, [kid!], timings?.childRestoreMs ?? []));
        }
        current = kid!;
      }
    } catch (err) {
      note(engine, `nested forks, run ${i + 1}, at depth ${chain.length}: ${(err as Error).message}`);
    } finally {
      await killAll(chain);
    }
  }
}

const MEMORY_FANOUT = 10;
/** Long enough for a fork's fixups and the interpreter's reseed (queued behind them) to land. */
const SETTLE_MS = 2000;

/** What one child costs: PSS (its share of everything it maps) and private memory (what it alone holds), in MiB. */
function sampleChildMemory(engine: EngineUnderTest, when: 'Idle' | '', kids: Sandbox[]): void {
  for (const k of kids) {
    const pid = defaultManager().get(k.sandboxId).vm.pid;
    sample(engine, `child${when}PssMiB`, pssBytes(pid) / 2 ** 20);
    sample(engine, `child${when}PrivateMiB`, privateBytes(pid) / 2 ** 20);
  }
}

/**
 * Memory per child in a fork of 10: once its fixups are done and it sits idle,
 * and after its first runCode. On vmm, also the guest pages a child wrote, by
 * owner inside its guest (guest-pages.ts): the idle ones in the first child,
 * the ones after a command in the second (sorting them runs a script in that
 * guest, which writes pages of its own, so each child is sorted once, last).
 */
async function childMemory(engine: EngineUnderTest, plan: VmmBenchPlan, parent: Sandbox): Promise<void> {
  progress(`${engine}: memory of ${MEMORY_FANOUT} children, idle and after one command`);
  let kids: Sandbox[] = [];
  try {
    if (engine === 'qemu') await within(STEP_TIMEOUT_MS, 'RAM copy of the parent', parent.prewarmForks(0));
    const pidOf = (k: Sandbox) => defaultManager().get(k.sandboxId).vm.pid;
    // What the children share: a child's PSS holds 1/(children + 1) of the parent's resident memory.
    sample(engine, 'parentRssBeforeForkMiB', rssBytes(pidOf(parent)) / 2 ** 20);
    kids = await within(STEP_TIMEOUT_MS, `fork of ${MEMORY_FANOUT}`, parent.fork(MEMORY_FANOUT).then((r) => forked(r)));
    await new Promise((r) => setTimeout(r, SETTLE_MS));
    const ramBytes = plan.guestMiB * 2 ** 20;
    sampleChildMemory(engine, 'Idle', kids);
    if (engine === 'vmm') await guestPagesByOrigin(engine, 'Idle', kids[0]!, privateGuestFrames(pidOf(kids[0]!), ramBytes));
    const measured = kids.slice(1);
    await within(STEP_TIMEOUT_MS, 'first results', Promise.all(measured.map(probe)));
    await new Promise((r) => setTimeout(r, SETTLE_MS));
    sampleChildMemory(engine, '', measured);
    if (engine === 'vmm') await guestPagesByOrigin(engine, 'AfterCommand', measured[0]!, privateGuestFrames(pidOf(measured[0]!), ramBytes));
  } catch (err) {
    note(engine, `child memory: ${(err as Error).message}`);
  } finally {
    await killAll(kids);
  }
}

async function guestPagesByOrigin(engine: EngineUnderTest, when: 'Idle' | 'AfterCommand', kid: Sandbox, frames: number[]): Promise<void> {
  sample(engine, `childGuestPages${when}MiB`, (frames.length * 4096) / 2 ** 20);
  const origins = await within(STEP_TIMEOUT_MS, 'guest page owners', framesByOrigin(kid, frames));
  for (const [origin, pages] of Object.entries(origins.counts)) sample(engine, `childGuestPages${when}_${origin}MiB`, (pages * 4096) / 2 ** 20);
  if (origins.kernelPages.length > 0) note(engine, `kernel image pages written, ${when}: ${origins.kernelPages.join('; ')}`);
}

/** The guest kernel's memory settings as the parent runs with them (the vmm engine's command line sets some). */
async function noteGuestKernelSettings(engine: EngineUnderTest, parent: Sandbox): Promise<void> {
  const files = ['/sys/kernel/mm/transparent_hugepage/enabled', '/proc/sys/kernel/watchdog', '/proc/sys/vm/stat_interval', '/proc/sys/vm/compaction_proactiveness'];
  const r = await within(STEP_TIMEOUT_MS, 'guest kernel settings', parent.commands.run(files.map((f) => `echo ${f}: $(cat ${f})`).join('; ')));
  note(engine, `guest kernel: ${r.stdout.trim().split('\n').join(', ')}`);
}

async function benchEngine(engine: EngineUnderTest, plan: VmmBenchPlan): Promise<void> {
  try {
    await coldBoots(engine, plan);
  } catch (err) {
    note(engine, `cold boot: ${(err as Error).message}`);
  }
  let parent: Sandbox | undefined;
  try {
    progress(`${engine}: booting the parent and warming its interpreter`);
    parent = await within(STEP_TIMEOUT_MS, 'parent boot', Sandbox.create({ engine, memoryMiB: plan.guestMiB }));
    started.add(parent);
    const warm = await within(STEP_TIMEOUT_MS, 'warm-up', parent.runCode('counter = 41\ncounter'));
    if (warm.value !== '41') throw new Error(`the parent's interpreter answered ${JSON.stringify(warm.value)}`);
    await noteGuestKernelSettings(engine, parent);
    // The largest forks last: one that does not fit may leave the parent unable to fork again.
    await fanouts(engine, plan, parent, plan.fanouts.filter((n) => n <= 10));
    await childMemory(engine, plan, parent);
    await depths(engine, plan, parent);
    await fanouts(engine, plan, parent, plan.fanouts.filter((n) => n > 10));
  } catch (err) {
    note(engine, `parent: ${(err as Error).message}`);
  } finally {
    if (parent) await killAll([parent]);
  }
}

export async function runVmmBenchPayload(plan: VmmBenchPlan): Promise<void> {
  try {
    for (const engine of plan.engines) await benchEngine(engine, plan);
  } finally {
    await killAll(started);
  }
  console.log('bench-done');
}

if (import.meta.url === `file://${process.argv[1]}`) {
  const plan = JSON.parse(process.argv[2] ?? '{}') as VmmBenchPlan;
  runVmmBenchPayload(plan).then(
    () => process.exit(0),
    (err: unknown) => {
      console.log(`bench-note all ${(err as Error).stack ?? String(err)}`.replace(/\n/g, ' | '));
      process.exit(1);
    },
  );
}
