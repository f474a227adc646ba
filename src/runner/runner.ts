import { spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, mkdirSync, openSync, readSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { CladeError } from '../util/errors.js';
import { ensurePrivateDir, homePaths } from '../util/home.js';
import { noProgress, type ProgressFn } from '../util/progress.js';
import { probeKvm } from '../util/kvm-probe.js';
import { QEMU_BINARY } from '../engines/qemu/qemu-vm.js';
import { ensureRunnerBase } from './base.js';
import { STATUS_PREFIX } from './init-script.js';
import { packInitramfs, type Carry } from './payload.js';

export type { Carry } from './payload.js';

export type RunnerOptions = {
  /** A shell command, run by busybox `sh` inside the runner as root, from `/`. */
  command: string;
  /** Files and directories to put inside the runner. */
  carry?: Carry[];
  env?: Record<string, string>;
  /** Limit for the whole run, boot included; the runner is killed when it passes. Default 5 minutes. */
  timeoutMs?: number;
  /** Runner RAM. Carried files live in it too. Default 4096. */
  memoryMiB?: number;
  /** Runner vCPUs. Default 2. */
  cpus?: number;
  /** The guest image whose kernel the runner boots (the runner and its guests share one kernel). Default "default". */
  image?: string;
  /** Fail when /dev/kvm does not come up inside the runner. Default true. */
  requireKvm?: boolean;
  /** Called with the payload's output as it arrives. */
  onOutput?: (chunk: Buffer) => void;
  progress?: ProgressFn;
  signal?: AbortSignal;
  /** Output kept in the result; more is dropped (still passed to onOutput). Default 16 MiB. */
  maxOutputBytes?: number;
};

export type RunnerTimings = {
  /** From starting QEMU to the payload starting inside the runner (host wall clock). */
  bootMs: number;
  /** The payload's own run, as the host saw it. */
  payloadMs: number;
  /** From starting QEMU to its exit. */
  totalMs: number;
  /** The runner kernel's uptime when the payload started (its own clock). */
  guestUptimeAtPayloadS: number;
};

export type RunnerResult = {
  exitCode: number;
  /** The payload's stdout and stderr, interleaved as written. */
  output: string;
  outputTruncated: boolean;
  /** Whether /dev/kvm came up inside the runner. */
  kvm: boolean;
  timings: RunnerTimings;
  initramfsBytes: number;
};

const DEFAULT_TIMEOUT_MS = 300_000;
const SERIAL_POLL_MS = 50;
/** TCG's translation cache; a nested guest runs a lot of distinct code, so more than a sandbox's. */
const TCG_TB_MIB = 256;

/**
 * Boots a runner VM (QEMU TCG with AMD SVM + nested paging exposed) whose
 * kernel loads KVM, runs `command` with the carried files, and powers off.
 * Everything it creates (QEMU, its work directory) is gone when this returns
 * or throws, also on timeout, abort, Ctrl-C or process exit.
 */
export async function runInRunner(opts: RunnerOptions): Promise<RunnerResult> {
  const progress = opts.progress ?? noProgress;
  const base = await ensureRunnerBase(opts.image ?? 'default', progress);
  const id = randomBytes(4).toString('hex');
  const work = join(ensurePrivateDir(homePaths.tmp()), `runner-${id}`);
  const active: ActiveRun = { work };
  track(active);
  try {
    mkdirSync(work, { recursive: true, mode: 0o700 });
    progress({ phase: 'runner', message: 'packing the runner initramfs' });
    const initramfs = packInitramfs({ baseRoot: base.root, work, carry: opts.carry ?? [], command: opts.command, ...(opts.env ? { env: opts.env } : {}) });
    const tscKhz = (await probeKvm()).tscKhz;
    const args = qemuArgs({ id, kernel: base.kernel, initramfs: initramfs.file, serial: join(work, 'serial.log'), memoryMiB: opts.memoryMiB ?? 4096, cpus: opts.cpus ?? 1, ...(tscKhz ? { tscKhz } : {}) });
    const outcome = await boot(args, active, opts, progress);
    return finish(outcome, opts, initramfs.bytes);
  } finally {
    untrack(active);
    killRun(active);
  }
}

type Outcome = {
  status: Map<string, string>;
  statusOrder: string[];
  output: Buffer[];
  outputBytes: number;
  outputTruncated: boolean;
  started: number;
  payloadSeenAt?: number;
  exitSeenAt?: number;
  exitedAt: number;
  timedOut: boolean;
  aborted: boolean;
  stderr: string;
  serialTail: string;
};

function qemuArgs(o: { id: string; kernel: string; initramfs: string; serial: string; memoryMiB: number; cpus: number; tscKhz?: number }): string[] {
  const cmdline = ['console=ttyS0', 'quiet', 'panic=-1', 'mitigations=off', 'random.trust_cpu=on', 'i8042.noaux'];
  // The runner's own PIT calibration fails when the host is busy; hand it the TSC rate (as the qemu engine does).
  if (o.tscKhz) cmdline.push(`tsc_early_khz=${o.tscKhz}`, 'tsc=reliable');
  return [
    '-name', `clade-runner-${o.id}`,
    '-M', 'microvm,pcie=on,rtc=on',
    // TCG's "max" CPU includes AMD SVM with nested paging: kvm-amd inside gets hardware-style virtualization.
    '-accel', `tcg,tb-size=${TCG_TB_MIB},thread=multi`, '-cpu', 'max',
    '-smp', String(o.cpus),
    '-m', `${o.memoryMiB}M`,
    '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
    '-sandbox', 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny',
    '-chardev', `file,id=serial,path=${o.serial}`,
    '-serial', 'chardev:serial',
    '-kernel', o.kernel,
    '-initrd', o.initramfs,
    '-append', cmdline.join(' '),
    '-device', 'virtio-serial-pci,id=vs',
    '-chardev', 'stdio,id=out,signal=off',
    '-device', 'virtconsole,bus=vs.0,chardev=out',
  ];
}

/**
 * Runs QEMU to its end. It is started under coreutils `timeout`, which leads
 * its own process group: killing that group ends both, and should this process
 * itself be killed outright, `timeout` still ends QEMU shortly after the limit.
 */
function boot(args: string[], active: ActiveRun, opts: RunnerOptions, progress: ProgressFn): Promise<Outcome> {
  const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
  const maxOutput = opts.maxOutputBytes ?? 16 << 20;
  const serialFile = join(active.work, 'serial.log');
  const o: Outcome = { status: new Map(), statusOrder: [], output: [], outputBytes: 0, outputTruncated: false, started: Date.now(), exitedAt: 0, timedOut: false, aborted: false, stderr: '', serialTail: '' };
  const backstopS = Math.ceil(timeoutMs / 1000) + 15;
  const child = spawn('timeout', ['--signal=KILL', `${backstopS}s`, QEMU_BINARY, ...args], { stdio: ['ignore', 'pipe', 'pipe'] });
  active.pgid = child.pid;
  const serial = new SerialWatcher(serialFile, (line) => {
    const [key = '', ...rest] = line.split(' ');
    if (!o.status.has(key)) o.statusOrder.push(key);
    o.status.set(key, rest.join(' '));
    if (key === 'payload-start') {
      o.payloadSeenAt = Date.now();
      progress({ phase: 'runner', message: `payload started ${((o.payloadSeenAt - o.started) / 1000).toFixed(1)} s after launch` });
    } else if (key === 'payload-exit') o.exitSeenAt = Date.now();
    else if (key === 'kvm') progress({ phase: 'runner', message: `/dev/kvm ${rest.join(' ') === 'ok' ? 'is up' : 'is MISSING'}` });
  });
  child.stdout.on('data', (chunk: Buffer) => {
    opts.onOutput?.(chunk);
    const room = maxOutput - o.outputBytes;
    if (chunk.length > room) o.outputTruncated = true;
    if (room > 0) {
      o.output.push(chunk.subarray(0, room));
      o.outputBytes += Math.min(room, chunk.length);
    }
  });
  child.stderr.on('data', (d: Buffer) => {
    o.stderr = (o.stderr + d.toString('utf8')).slice(-4096);
  });
  return new Promise((resolve, reject) => {
    const poll = setInterval(() => serial.poll(), SERIAL_POLL_MS);
    const timer = setTimeout(() => {
      o.timedOut = true;
      killRun(active, false);
    }, timeoutMs);
    const onAbort = () => {
      o.aborted = true;
      killRun(active, false);
    };
    opts.signal?.addEventListener('abort', onAbort, { once: true });
    if (opts.signal?.aborted) onAbort();
    child.once('error', (err) => {
      clearInterval(poll);
      clearTimeout(timer);
      reject(new CladeError('unavailable', `cannot start ${QEMU_BINARY} under coreutils timeout: ${err.message}; run scripts/setup.sh`));
    });
    child.once('close', () => {
      clearInterval(poll);
      clearTimeout(timer);
      opts.signal?.removeEventListener('abort', onAbort);
      active.pgid = undefined;
      o.exitedAt = Date.now();
      serial.poll();
      o.serialTail = serial.tail();
      resolve(o);
    });
  });
}

function finish(o: Outcome, opts: RunnerOptions, initramfsBytes: number): RunnerResult {
  const exit = o.status.get('payload-exit');
  const stage = o.statusOrder.at(-1) ?? 'kernel boot';
  const details = diagnostics(o);
  if (o.aborted) throw new CladeError('killed', `the runner was stopped (abort) during ${stage}`);
  if (o.timedOut) throw new CladeError('timeout', `the runner did not finish within ${((opts.timeoutMs ?? DEFAULT_TIMEOUT_MS) / 1000).toFixed(0)} s (last stage: ${stage}); raise timeoutMs if the payload needs longer${details}`);
  if (o.statusOrder.length === 0) throw new CladeError('boot_failed', `the runner never reached its init (QEMU or the kernel failed first)${details}`);
  if (o.status.get('kvm') !== 'ok' && opts.requireKvm !== false) {
    throw new CladeError('unavailable', `/dev/kvm did not come up inside the runner (the runner CPU needs AMD SVM: QEMU's TCG "-cpu max" provides it)${details}`);
  }
  if (exit === undefined) throw new CladeError('boot_failed', `the runner stopped before its payload finished (last stage: ${stage})${details}`);
  const exitCode = Number(/status=(\d+)/.exec(exit)?.[1] ?? NaN);
  const uptime = Number(/uptime=([\d.]+)/.exec(o.status.get('payload-start') ?? '')?.[1] ?? NaN);
  const payloadSeen = o.payloadSeenAt ?? o.exitedAt;
  return {
    exitCode,
    output: Buffer.concat(o.output).toString('utf8'),
    outputTruncated: o.outputTruncated,
    kvm: o.status.get('kvm') === 'ok',
    timings: { bootMs: payloadSeen - o.started, payloadMs: (o.exitSeenAt ?? o.exitedAt) - payloadSeen, totalMs: o.exitedAt - o.started, guestUptimeAtPayloadS: uptime },
    initramfsBytes,
  };
}

function diagnostics(o: Outcome): string {
  const parts = [o.serialTail.trim() && `\nrunner console (tail):\n${o.serialTail.trim()}`, o.stderr.trim() && `\nqemu:\n${o.stderr.trim()}`];
  return parts.filter(Boolean).join('');
}

/** Follows the runner's serial log as QEMU writes it, reporting the init's status lines. */
class SerialWatcher {
  private offset = 0;
  private partial = '';
  private recent = '';

  constructor(
    private readonly file: string,
    private readonly onStatus: (line: string) => void,
  ) {}

  poll(): void {
    let fd: number;
    try {
      fd = openSync(this.file, 'r');
    } catch {
      return; // QEMU has not created it yet.
    }
    try {
      const buf = Buffer.allocUnsafe(1 << 16);
      for (;;) {
        const n = readSync(fd, buf, 0, buf.length, this.offset);
        if (n <= 0) break;
        this.offset += n;
        this.consume(buf.toString('utf8', 0, n));
      }
    } finally {
      closeSync(fd);
    }
  }

  tail(): string {
    return (this.recent + this.partial).split('\n').slice(-25).join('\n');
  }

  private consume(text: string): void {
    const lines = (this.partial + text).split('\n');
    this.partial = lines.pop() ?? '';
    for (const raw of lines) {
      const line = raw.replace(/\r$/, '');
      this.recent = (this.recent + line + '\n').slice(-8192);
      if (line.startsWith(STATUS_PREFIX)) this.onStatus(line.slice(STATUS_PREFIX.length));
    }
  }
}

/* Cleanup on every way out: runs still active when the process exits or is interrupted are killed and their files removed. */

type ActiveRun = { work: string; pgid?: number | undefined };
const activeRuns = new Set<ActiveRun>();
const SIGNALS = ['SIGINT', 'SIGTERM', 'SIGHUP'] as const;

function killRun(run: ActiveRun, removeFiles = true): void {
  if (run.pgid !== undefined) {
    try {
      process.kill(-run.pgid, 'SIGKILL');
    } catch {
      // Already gone.
    }
  }
  if (removeFiles) rmSync(run.work, { recursive: true, force: true });
}

function killAll(): void {
  for (const run of activeRuns) killRun(run);
  activeRuns.clear();
}

function onSignal(signal: NodeJS.Signals): void {
  killAll();
  for (const s of SIGNALS) process.removeListener(s, onSignal);
  // Nobody else handles it: behave as if we never had, and die of the signal.
  if (process.listenerCount(signal) === 0) process.kill(process.pid, signal);
}

function track(run: ActiveRun): void {
  if (activeRuns.size === 0) {
    for (const s of SIGNALS) process.on(s, onSignal);
    process.on('exit', killAll);
  }
  activeRuns.add(run);
}

function untrack(run: ActiveRun): void {
  activeRuns.delete(run);
  if (activeRuns.size === 0) {
    for (const s of SIGNALS) process.removeListener(s, onSignal);
    process.removeListener('exit', killAll);
  }
}
