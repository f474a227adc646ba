import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync, readFileSync, readlinkSync, rmdirSync, rmSync, statSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { Type, type Static } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import { AgentClient } from '../agent-protocol/client.js';
import { Tag } from '../agent-protocol/constants.js';
import type { EngineName, MachineShape } from '../engines/engine.js';
import { isSandboxVm, QemuEngine, QemuVm, type AdoptableVm } from '../engines/qemu/qemu-engine.js';
import { isVmmProcess, VmmEngine, VmmVm, vmmUnavailableReason } from '../engines/vmm/vmm-engine.js';
import { resolveImage } from '../images/store.js';
import { CladeError, errorMessage } from '../util/errors.js';
import { ensureMemoryDir, ensurePrivateDir, homePaths, memoryDir } from '../util/home.js';
import { attachInterpreter, type InterpreterSession } from './interpreter.js';
import { killPidQuietly, processAlive } from '../util/process.js';

export { killPidQuietly } from '../util/process.js';
import type { Snapshot } from './snapshots.js';

export type StartOptions = {
  image?: string;
  memoryMiB?: number;
  cpus?: number;
  env?: Record<string, string>;
  /** How long to wait for the guest agent to answer (default 90 s; TCG boots take seconds). */
  bootTimeoutMs?: number;
  engine?: EngineName;
};

export const DEFAULTS = { memoryMiB: 1024, cpus: 1, bootTimeoutMs: 90_000 } as const;
const LIMITS = { memoryMiB: [256, 16384], cpus: [1, 64] } as const;

export const engine = new QemuEngine();
export const vmmEngine = new VmmEngine();

/**
 * The engine a new sandbox runs on: the one asked for (or CLADE_ENGINE), else
 * clade-vmm where this host's KVM runs Linux guests, else QEMU.
 */
export async function chooseEngine(asked: EngineName | undefined): Promise<EngineName> {
  const name = asked ?? (process.env.CLADE_ENGINE as EngineName | undefined);
  if (name !== undefined && name !== 'qemu' && name !== 'vmm') throw new CladeError('bad_request', `unknown engine ${JSON.stringify(name)}: use "qemu" or "vmm"`);
  if (name === 'qemu') return 'qemu';
  const whyNot = await vmmUnavailableReason();
  if (name === 'vmm' && whyNot) throw new CladeError('unavailable', `the vmm engine cannot run here: ${whyNot}`);
  return whyNot ? 'qemu' : 'vmm';
}

/**
 * A sandbox as the host sees it: its current VM process, the authenticated
 * channel to its agent, and what it was made from. A fork replaces the VM
 * process under a sandbox (the parent continues in a new one), so `vm` changes
 * while the sandbox's identity, token and agent channel stay.
 */
export class LiveSandbox {
  private killing?: Promise<void>;
  private generation = 0;
  /** The frozen snapshot this sandbox's RAM maps copy-on-write, if any. */
  base?: Snapshot;
  /** Exec id of the persistent Python interpreter, once started. */
  interpreterExecId?: number;
  interpreter?: InterpreterSession;
  /** A VM process pre-started for the parent's side of the next fork. */
  private warmContinuation?: Promise<QemuVm>;
  /** Pid of the pre-started continuation, for synchronous cleanup at exit. */
  warmPid?: number;
  private exclusiveTail: Promise<unknown> = Promise.resolve();
  /**
   * Called when the sandbox has moved to another VM process, before the old
   * one is killed: a daemon rewrites its record here, so a crash at any moment
   * leaves a record naming a VM that still runs the guest.
   */
  onVmChanged?: () => void;

  constructor(
    readonly id: string,
    public vm: QemuVm | VmmVm,
    readonly agent: AgentClient,
    public token: Buffer,
    readonly shape: MachineShape,
    readonly env: Record<string, string>,
    readonly createdAt: Date,
    readonly bootMs: number,
    readonly parentId?: string,
  ) {
    this.watch(vm);
  }

  get alive(): boolean {
    return this.vm.alive() && !this.killing;
  }

  get engineName(): EngineName {
    return this.vm instanceof VmmVm ? 'vmm' : 'qemu';
  }

  /** The QEMU VM under this sandbox, for what only the qemu engine does (RAM-file snapshots, slots, promotion). */
  qemu(feature: string): QemuVm {
    if (this.vm instanceof QemuVm) return this.vm;
    throw new CladeError('unavailable', `${feature} is not available yet for sandboxes on the vmm engine; fork works, or create the sandbox with engine "qemu"`);
  }

  setWarmContinuation(vm: Promise<QemuVm>): void {
    void this.warmContinuation?.then((old) => old.kill()).catch(() => undefined);
    this.warmContinuation = vm;
    vm.then((v) => (this.warmPid = v.pid)).catch(() => undefined);
  }

  takeWarmContinuation(): Promise<QemuVm> | undefined {
    const vm = this.warmContinuation;
    this.warmContinuation = undefined;
    this.warmPid = undefined;
    return vm;
  }

  async warmContinuationReady(): Promise<void> {
    await this.warmContinuation?.catch(() => undefined);
  }

  hasWarmContinuation(): boolean {
    return this.warmContinuation !== undefined;
  }

  /**
   * Runs operations that replace this sandbox's VM process (fork, snapshot,
   * promotion) one at a time: two at once would freeze and rename the same RAM
   * file twice and lose the parent.
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.exclusiveTail.then(fn);
    this.exclusiveTail = run.catch(() => undefined);
    return run;
  }

  /** After adoption: the next VM process must not reuse the run directory of the current one. */
  continueRunDirsAfter(generation: number): void {
    this.generation = Math.max(this.generation, generation);
  }

  /** A fresh directory for the next VM process of this sandbox (one a crashed predecessor left is skipped). */
  nextRunDir(): string {
    let dir: string;
    do dir = join(sandboxDir(this.id), `vm-${++this.generation}`);
    while (existsSync(dir));
    return ensurePrivateDir(dir);
  }

  /** Puts the sandbox on another VM process (after a fork or promotion) and retires the old one. */
  async replaceVm(next: QemuVm, base: Snapshot | undefined): Promise<void> {
    const old = this.vm;
    const oldBase = this.base;
    this.vm = next;
    this.base = base;
    base?.retain();
    this.watch(next);
    this.onVmChanged?.();
    await this.agent.rebind(next.agentSocket, Date.now() + 10_000);
    void old.kill().then(() => oldBase?.release());
  }

  kill(): Promise<void> {
    this.killing ??= (async () => {
      this.agent.close();
      await this.takeWarmContinuation()?.then((vm) => vm.kill()).catch(() => undefined);
      await this.vm.kill();
      rmSync(sandboxDir(this.id), { recursive: true, force: true });
      live.delete(this.id);
      this.base?.release();
      this.base = undefined;
    })();
    return this.killing;
  }

  /** If the current VM dies on its own (crash, guest poweroff), the sandbox ends. */
  private watch(vm: QemuVm | VmmVm): void {
    void vm.exited.then(() => {
      if (this.vm === vm && !this.killing) void this.kill();
    });
  }
}

const live = new Map<string, LiveSandbox>();

export function liveSandboxes(): LiveSandbox[] {
  return [...live.values()];
}

export function getLive(id: string): LiveSandbox {
  const sb = live.get(id);
  if (!sb) throw new CladeError('not_found', `no running sandbox ${JSON.stringify(id)} in this process`);
  return sb;
}

export function registerLive(sb: LiveSandbox): void {
  live.set(sb.id, sb);
}

export function newSandboxId(): string {
  return 'sb-' + randomBytes(6).toString('hex');
}

export function sandboxDir(id: string): string {
  return join(homePaths.sandboxes(), id);
}

export function checkEngine(name: EngineName | undefined): void {
  if (name !== undefined && name !== 'qemu' && name !== 'vmm') throw new CladeError('bad_request', `unknown engine ${JSON.stringify(name)}: use "qemu" or "vmm"`);
}

export function resolveShape(opts: StartOptions): MachineShape {
  return {
    image: resolveImage(opts.image ?? 'default'),
    memoryMiB: checkRange('memoryMiB', opts.memoryMiB ?? DEFAULTS.memoryMiB, LIMITS.memoryMiB),
    cpus: checkRange('cpus', opts.cpus ?? DEFAULTS.cpus, LIMITS.cpus),
  };
}

/** Boots a sandbox and returns once its agent has answered over the authenticated channel. */
export async function startSandbox(opts: StartOptions = {}): Promise<LiveSandbox> {
  checkEngine(opts.engine);
  const shape = resolveShape(opts);
  const bootTimeoutMs = opts.bootTimeoutMs ?? DEFAULTS.bootTimeoutMs;
  installExitCleanup();
  reapOrphans();

  const id = newSandboxId();
  const runDir = ensurePrivateDir(join(sandboxDir(id), 'vm-0'));
  const token = randomBytes(32);
  const started = Date.now();
  let vm: QemuVm | VmmVm | undefined;
  const agent = new AgentClient(token);
  try {
    const engineName = await chooseEngine(opts.engine);
    const memoryFile = join(ensureMemoryDir(), `${id}.mem`);
    vm = await (engineName === 'vmm' ? vmmEngine : engine).boot({ id, ...shape, token, hostname: id, runDir, memoryFile });
    const deadline = started + bootTimeoutMs;
    const isAlive = () => vm!.alive();
    await agent.connect(vm.agentSocket, deadline, isAlive);
    const hello = await agent.waitReady(deadline, isAlive);
    if (hello.u64(Tag.PROTO_VERSION) !== 1) throw new CladeError('protocol_error', `the guest agent speaks protocol ${hello.u64(Tag.PROTO_VERSION)}, expected 1; rebuild the image`);
  } catch (err) {
    const detail = vm?.diagnostics();
    agent.close();
    if (vm) await vm.kill();
    rmSync(sandboxDir(id), { recursive: true, force: true });
    const base = err instanceof CladeError ? err : new CladeError('boot_failed', errorMessage(err), { cause: err });
    throw new CladeError(base.code, `sandbox ${id} did not start: ${base.message}${detail ? `\n${detail}` : ''}`, { cause: err });
  }
  const sandbox = new LiveSandbox(id, vm, agent, token, shape, { ...(opts.env ?? {}) }, new Date(started), Date.now() - started);
  live.set(id, sandbox);
  return sandbox;
}

export type AdoptSpec = {
  vm: AdoptableVm & { engine?: EngineName; startTicks?: string };
  token: Buffer;
  env: Record<string, string>;
  createdAt: Date;
  parentId?: string;
  interpreterExecId?: number;
  /** Request ids at or above this are unused by the guest's agent. */
  agentIdCursor: number;
  /** The number in the current run directory's name (vm-<n>). */
  runGeneration: number;
};

/**
 * Takes over a sandbox whose VM another clade process started and left running
 * (a daemon that was killed): reconnects to its agent, which must answer HELLO
 * with the sandbox's token. Throws if it does not; the caller decides what to remove.
 */
export async function adoptSandbox(spec: AdoptSpec): Promise<LiveSandbox> {
  const vm = spec.vm.engine === 'vmm' ? await VmmVm.adopt(spec.vm) : QemuVm.adopt(spec.vm);
  const agent = new AgentClient(spec.token);
  agent.idCursor = spec.agentIdCursor;
  const deadline = Date.now() + 10_000;
  try {
    if (vm instanceof QemuVm) await vm.resumeIfPaused(); // QEMU accepts a new control client once the old owner's is gone
    await agent.connect(vm.agentSocket, deadline, () => vm.alive());
    await agent.waitReady(deadline, () => vm.alive());
  } catch (err) {
    agent.close();
    throw err;
  }
  const sb = new LiveSandbox(spec.vm.id, vm, agent, spec.token, spec.vm.shape, spec.env, spec.createdAt, 0, spec.parentId);
  sb.continueRunDirsAfter(spec.runGeneration);
  live.set(sb.id, sb);
  if (spec.interpreterExecId) attachInterpreter(sb, spec.interpreterExecId);
  return sb;
}

function checkRange(name: string, value: number, [min, max]: readonly [number, number]): number {
  if (!Number.isInteger(value) || value < min || value > max) throw new CladeError('bad_request', `${name} must be an integer from ${min} to ${max}, got ${value}`);
  return value;
}

let cleanupInstalled = false;
const exitHooks: (() => void)[] = [];

/** Registers synchronous cleanup to run when the process exits (pools, snapshots). */
export function onProcessExit(hook: () => void): void {
  exitHooks.push(hook);
}

/**
 * Embedded sandboxes belong to this process: when it exits, or is interrupted
 * by Ctrl-C or SIGTERM, their VMs are killed and their files removed.
 */
export function installExitCleanup(): void {
  if (cleanupInstalled) return;
  cleanupInstalled = true;
  process.on('exit', killAllSync);
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    if (process.listenerCount(sig) > 0) continue;
    process.once(sig, () => {
      killAllSync();
      process.kill(process.pid, sig);
    });
  }
}

/**
 * For a daemon: its sandboxes outlive it (the next daemon adopts them), so at
 * exit only VMs that no sandbox runs in (warm slots) are killed.
 */
export function keepSandboxesOnExit(): void {
  cleanupInstalled = true;
  process.on('exit', () => {
    for (const sb of live.values()) if (sb.warmPid) killPidQuietly(sb.warmPid);
    for (const hook of exitHooks.splice(0)) hook();
    removeMemoryDirIfEmpty();
  });
}

export function killAllSync(): void {
  for (const sb of live.values()) {
    killPidQuietly(sb.vm.pid);
    if (sb.warmPid) killPidQuietly(sb.warmPid);
    rmSync(sandboxDir(sb.id), { recursive: true, force: true });
    if (sb.vm.memory.shared) rmSync(sb.vm.memory.file, { force: true });
  }
  live.clear();
  for (const hook of exitHooks.splice(0)) hook();
  removeMemoryDirIfEmpty();
}

/** The tmpfs directory for RAM files goes away with the last file in it. */
function removeMemoryDirIfEmpty(): void {
  try {
    rmdirSync(memoryDir());
  } catch {
    // Still in use by another clade process, or already gone.
  }
}


/** A run directory or RAM file this young, with no owner recorded yet, may belong to a VM still starting. */
const STARTING_GRACE_MS = 120_000;

/**
 * Removes what a process that died without cleaning up (SIGKILL, power loss)
 * left behind: VM processes whose owner is gone, their directories and RAM
 * files, and VM processes of this clade home that no record names at all
 * (a fork's child whose owner died before it wrote the child's record).
 */
export function reapOrphans(): { killed: number; removed: number } {
  const dir = homePaths.sandboxes();
  let killed = 0;
  let removed = 0;
  if (!existsSync(dir)) return { killed, removed };
  const recorded = new Set<number>(liveSandboxes().flatMap((s) => [s.vm.pid, ...(s.warmPid ? [s.warmPid] : [])]));
  for (const id of readdirSync(dir)) {
    if (live.has(id) || !/^sb-[0-9a-f]{12}$/.test(id)) continue;
    const sbDir = join(dir, id);
    const vms = readdirSync(sbDir).filter((d) => /^vm-\d+$/.test(d));
    const metas = vms.map((v) => readVmMeta(join(sbDir, v, 'vm.json'))).filter((m): m is VmMeta => m !== undefined);
    if (metas.length === 0) {
      if (Date.now() - statSync(sbDir).mtimeMs > STARTING_GRACE_MS) (rmSync(sbDir, { recursive: true, force: true }), removed++);
      continue;
    }
    if (metas.some((m) => processAlive(m.ownerPid))) {
      for (const m of metas) recorded.add(m.pid);
      continue;
    }
    for (const m of metas) {
      const ours = m.engine === 'vmm' ? m.startTicks !== undefined && isVmmProcess(m.pid, m.startTicks) : isSandboxVm(m.pid, id);
      if (ours) (killPidQuietly(m.pid), killed++);
      if (m.memory?.shared) rmSync(m.memory.file, { force: true });
    }
    rmSync(sbDir, { recursive: true, force: true });
    removed++;
  }
  killed += reapUnrecordedVms(recorded);
  reapMemoryFiles();
  return { killed, removed };
}

/**
 * VM processes of this clade home (their command line names a path under its
 * sandboxes directory) that no live owner records. A process whose parent is
 * still alive (other than init) is being started or forked right now and is
 * left alone; one whose parent is gone can never be recorded any more.
 */
function reapUnrecordedVms(recorded: Set<number>): number {
  const marker = `${homePaths.sandboxes()}/`;
  let killed = 0;
  for (const p of vmProcesses()) {
    if (recorded.has(p.pid) || !p.cmdline.includes(marker)) continue;
    if (p.ppid > 1 && processAlive(p.ppid)) continue;
    killPidQuietly(p.pid);
    killed++;
  }
  return killed;
}

type VmProcessInfo = { pid: number; ppid: number; cmdline: string };

/** This user's QEMU and clade-vmm processes, from /proc. */
function vmProcesses(): VmProcessInfo[] {
  const out: VmProcessInfo[] = [];
  const uid = process.getuid?.();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (uid !== undefined && statSync(`/proc/${entry}`).uid !== uid) continue;
      const exe = readlinkSync(`/proc/${entry}/exe`);
      if (!/(qemu-system-[a-z0-9_]+|clade-vmm)( \(deleted\))?$/.test(exe)) continue;
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      if (fields[0] === 'Z') continue;
      // The exe link names the VM binary only once exec has replaced the starting process, cmdline included.
      out.push({ pid: Number(entry), ppid: Number(fields[1]), cmdline: readFileSync(`/proc/${entry}/cmdline`, 'utf8').replaceAll('\0', ' ') });
    } catch {
      // Gone meanwhile, or not readable: not ours to judge.
    }
  }
  return out;
}

const VmMetaSchema = Type.Object({
  engine: Type.Optional(Type.Union([Type.Literal('qemu'), Type.Literal('vmm')])),
  pid: Type.Integer({ minimum: 2, maximum: 2 ** 22 }),
  startTicks: Type.Optional(Type.String({ pattern: '^[0-9]{1,20}$' })),
  ownerPid: Type.Integer({ minimum: 1, maximum: 2 ** 22 }),
  memory: Type.Optional(Type.Object({ file: Type.String({ maxLength: 4096 }), shared: Type.Boolean() })),
});
type VmMeta = Static<typeof VmMetaSchema>;

/** vm.json, checked: a RAM file it names must be in this home's RAM directory, or the record is ignored. */
function readVmMeta(path: string): VmMeta | undefined {
  try {
    const raw: unknown = JSON.parse(readFileSync(path, 'utf8'));
    if (!Value.Check(VmMetaSchema, raw)) return undefined;
    const file = raw.memory?.file;
    if (file && (dirname(file) !== memoryDir() || !/^[A-Za-z0-9._-]+\.mem$/.test(basename(file)))) return undefined;
    return raw;
  } catch {
    return undefined;
  }
}

/** RAM files are named <owner pid>-… or <sandbox id>.mem; remove those whose owner is gone. */
function reapMemoryFiles(): void {
  const dir = memoryDir();
  if (!existsSync(dir)) return;
  const inUse = new Set(liveSandboxes().map((s) => s.vm.memory.file));
  for (const f of readdirSync(dir)) {
    const path = join(dir, f);
    if (inUse.has(path)) continue;
    const owner = /^snap-(\d+)-/.exec(f);
    if (owner && processAlive(Number(owner[1]))) continue;
    const sb = /^(sb-[0-9a-f]+)\.mem$/.exec(f);
    if (sb && existsSync(sandboxDir(sb[1]!))) continue;
    if (Date.now() - statSync(path).mtimeMs < STARTING_GRACE_MS && !owner) continue;
    rmSync(path, { force: true });
  }
}
