import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { AgentClient, type AgentDeadlines } from '../agent-protocol/client.js';
import { MessageType, Tag } from '../agent-protocol/constants.js';
import { FieldWriter } from '../agent-protocol/fields.js';
import type { Engine, EngineName, ForkTimings, MachineShape, PauseHooks, Vm, VmTarget } from '../engines/engine.js';
import { normalizeNetwork, type NetworkOptions, type NetworkSpec } from '../engines/network.js';
import { imageEnv, minimumMemoryMiB, resolveImage } from '../images/store.js';
import { mapLimited } from '../util/concurrency.js';
import { asCladeError, CladeError, errorMessage } from '../util/errors.js';
import { MAX_FORK_COUNT } from '../util/limits.js';
import { killPidQuietly } from '../util/process.js';
import { type CommandResult, runCommand } from './commands.js';
import { attachInterpreter, reseedInterpreter } from './interpreter.js';
import { reapOrphans, removeMemoryDirIfEmpty } from './reaper.js';
import { readTemplate } from './template-store.js';
import type { SandboxRecord } from './records.js';
import { LiveSandbox, type NamedInterpreterRecord, newRunDir, newSandboxId, sandboxDir } from './sandbox.js';
import { assertSnapshotEngine, assertTagFree, commitSnapshot, openSnapshot, readSnapshotMeta, type SnapshotMeta, stagingDir } from './snapshots.js';

export type { EngineName, ForkTimings } from '../engines/engine.js';
export type { NetworkOptions, PortMapping } from '../engines/network.js';

export type StartOptions = {
  /** Image name or digest (default: "default", made by `clade image build`). */
  image?: string;
  memoryMiB?: number;
  cpus?: number;
  /** Environment variables every command in the sandbox gets. */
  env?: Record<string, string>;
  /** How long to wait for the guest agent to answer (default 90 s; TCG boots take seconds). */
  bootTimeoutMs?: number;
  engine?: EngineName;
  /** A network of its own (docs/network.md): default-deny egress with an allow-list, DNS for allowed names only, forwarded ports. */
  network?: NetworkOptions;
  /**
   * Start from this template (`clade template create`): its snapshot, warm and
   * with its start command already running, instead of a boot. The template
   * fixes the image, memory and cpus.
   */
  template?: string;
};

export const DEFAULTS = { memoryMiB: 1024, cpus: 1, bootTimeoutMs: 90_000 } as const;
const LIMITS = { memoryMiB: [256, 16384], cpus: [1, 64] } as const;
/** Children turned into sandboxes at once after a fork: each is a connect and a fixup round trip. */
const FIXUP_CONCURRENCY = 16;
/**
 * How long a resumed guest (a fork's child, a start from a snapshot) has to
 * answer its agent connection and its fixup. On an emulated CPU with many VMs
 * sharing two cores this took several seconds in a full test run; a VM that
 * died is noticed at once (vm.alive()), so only a hung guest waits this long.
 */
const RESUME_TIMEOUT_MS = 30_000;

export type ForkOutcome = { children: (LiveSandbox | CladeError)[]; timings: ForkTimings };
export type SnapshotOutcome = { meta: SnapshotMeta; timings: Record<string, number> };

/** Where a resumed guest comes from: the token it still holds, where request ids go on, its forked interpreter. */
type GuestOrigin = {
  token: Buffer;
  nextId: number;
  interpreterExecId: number | undefined;
  /** Named interpreters running in the guest (not kept in persistent snapshots). */
  namedInterpreters?: NamedInterpreterRecord[];
  shape: MachineShape;
  env: Record<string, string>;
  parentId: string | undefined;
  snapshotTag: string | undefined;
};

type ForkWaiter = { count: number; resolve: (o: ForkOutcome) => void; reject: (e: unknown) => void };

/**
 * The sandboxes of one process, and the engines that run them. Everything a
 * sandbox goes through is here, the same for every engine: boot and readiness,
 * forks (concurrent requests for one parent merged into one pause), the
 * after-fork fixup that makes each child a new machine, snapshots to disk and
 * starts from them, takeover of VMs another process started, and cleanup.
 * Engines are injected: tests run all of it on a fake one.
 */
export class SandboxManager {
  private readonly live = new Map<string, LiveSandbox>();
  /** Fork requests for a parent that have not yet reached its pause: they are served by one fork. */
  private readonly openBatches = new WeakMap<LiveSandbox, ForkWaiter[]>();

  constructor(
    private readonly engines: Partial<Record<EngineName, Engine>>,
    /** Deadlines of the agent channels (tests shorten them). */
    private readonly deadlines: Partial<AgentDeadlines> = {},
  ) {}

  engine(name: EngineName): Engine {
    const engine = this.engines[name];
    if (!engine) throw new CladeError('unavailable', `the ${name} engine is not available in this process`);
    return engine;
  }

  /**
   * The engine a new sandbox runs on: the one asked for (or CLADE_ENGINE), else
   * vmm where it can run here, else qemu. An engine that refuses the shape (an engine
   * without a device the shape needs) is passed over, or refuses when asked by name.
   */
  async chooseEngine(asked: EngineName | undefined, shape?: MachineShape): Promise<EngineName> {
    const name = asked ?? (process.env.CLADE_ENGINE as EngineName | undefined);
    checkEngineName(name);
    if (name) {
      const whyNot = await this.engine(name).unavailableReason();
      if (whyNot) throw new CladeError('unavailable', `the ${name} engine cannot run here: ${whyNot}`);
      const refused = shape && this.engine(name).refusesShape?.(shape);
      if (refused) throw new CladeError('unavailable', refused);
      return name;
    }
    // Unasked, an engine that cannot run this shape is passed over for the next.
    for (const candidate of ['vmm', 'qemu'] as const) {
      const engine = this.engines[candidate];
      if (engine && !(shape && engine.refusesShape?.(shape)) && !(await engine.unavailableReason())) return candidate;
    }
    throw new CladeError('unavailable', 'no engine can run VMs here; see `clade doctor`');
  }

  get(id: string): LiveSandbox {
    const sb = this.live.get(id);
    if (!sb) throw new CladeError('not_found', `no running sandbox ${JSON.stringify(id)} in this process`);
    return sb;
  }

  find(id: string): LiveSandbox | undefined {
    const sb = this.live.get(id);
    return sb?.alive ? sb : undefined;
  }

  list(): LiveSandbox[] {
    return [...this.live.values()];
  }

  /** VM processes the engines started ahead of time and keep waiting. */
  get preparedVms(): number {
    return Object.values(this.engines).reduce((n, e) => n + (e?.preparedVms ?? 0), 0);
  }

  resolveShape(opts: StartOptions): MachineShape {
    const image = resolveImage(opts.image ?? 'default');
    const memoryMiB = checkRange('memoryMiB', opts.memoryMiB ?? DEFAULTS.memoryMiB, LIMITS.memoryMiB);
    const needed = minimumMemoryMiB(image);
    if (memoryMiB < needed) {
      throw new CladeError('bad_request', `image ${image.manifest.name} is a ${Math.round(image.manifest.initramfsBytes / 2 ** 20)} MiB initramfs, which needs about ${needed} MiB of guest memory to unpack; give memoryMiB ${needed} or more, or rebuild it with --rootfs disk (a read-only disk that costs no RAM up front)`);
    }
    return { image, memoryMiB, cpus: checkRange('cpus', opts.cpus ?? DEFAULTS.cpus, LIMITS.cpus), ...withNetwork(normalizeNetwork(opts.network)) };
  }

  /** Boots a sandbox and returns once its agent has answered over the authenticated channel. */
  async create(opts: StartOptions = {}): Promise<LiveSandbox> {
    checkEngineName(opts.engine);
    if (opts.template !== undefined) return this.createFromTemplate(opts.template, opts);
    const shape = this.resolveShape(opts);
    const bootTimeoutMs = opts.bootTimeoutMs ?? DEFAULTS.bootTimeoutMs;
    const id = newSandboxId();
    const runDir = newRunDir(id);
    const token = randomBytes(32);
    const started = Date.now();
    let vm: Vm | undefined;
    const agent = new AgentClient(token, this.deadlines);
    try {
      const engine = this.engine(await this.chooseEngine(opts.engine, shape));
      vm = await engine.boot({ id, ...shape, token, hostname: id, runDir });
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
    const sb = this.register(new LiveSandbox(id, vm, agent, token, shape, { ...imageEnv(shape.image), ...(opts.env ?? {}) }, new Date(started), Date.now() - started, undefined, this.forget));
    if (shape.network) await assertGuestNetwork(sb);
    return sb;
  }

  /**
   * Forks a running sandbox into `count` children; failures are reported per
   * child. Forks of one parent run one after another, and requests that arrive
   * while one is under way are merged into the next: one pause serves them all.
   */
  fork(parent: LiveSandbox, count: number): Promise<ForkOutcome> {
    return new Promise<ForkOutcome>((resolve, reject) => {
      checkCount('fork count', count, 1); // a throw here rejects
      const open = this.openBatches.get(parent);
      if (open && total(open) + count <= MAX_FORK_COUNT) {
        open.push({ count, resolve, reject });
        return;
      }
      const batch = [{ count, resolve, reject }];
      this.openBatches.set(parent, batch);
      this.forkBatch(parent, batch).then(
        (outcome) => splitOutcome(outcome, batch),
        (err: unknown) => batch.forEach((w) => w.reject(err)),
      );
    });
  }

  private forkBatch(parent: LiveSandbox, batch: ForkWaiter[]): Promise<ForkOutcome> {
    return parent.exclusive(async () => {
      // From here on the batch's count is fixed: later requests wait for the next fork.
      if (this.openBatches.get(parent) === batch) this.openBatches.delete(parent);
      if (!parent.alive) throw new CladeError('killed', `sandbox ${parent.id} is not running`);
      const targets = this.targets();
      let result;
      try {
        result = await this.engine(parent.engineName).fork(parent.vm, total(batch), targets.next, this.hooks(parent));
      } catch (err) {
        targets.removeUnused([]);
        throw asCladeError(err, `fork of ${parent.id} failed`);
      }
      await parent.replaceVm(result.parent);
      // Read after the pause: every request id the frozen guest can have seen is below it.
      const origin = this.originOf(parent, parent.snapshotTag);
      const made = result.children.filter((c): c is Vm => !(c instanceof CladeError));
      targets.removeUnused(made);
      const t0 = performance.now();
      const resumed = await mapInOrder(result.children, (c) => (c instanceof CladeError ? Promise.reject(c) : this.resumeAsNewSandbox(c, origin, t0)));
      return { children: resumed.map((r) => (r.status === 'fulfilled' ? r.value : asCladeError(r.reason, 'child did not resume'))), timings: result.timings };
    });
  }

  private async createFromTemplate(name: string, opts: StartOptions): Promise<LiveSandbox> {
    const fixed = (['image', 'memoryMiB', 'cpus', 'network'] as const).filter((k) => opts[k] !== undefined);
    if (fixed.length) throw new CladeError('bad_request', `template ${name} fixes the sandbox's ${fixed.join(', ')}; leave ${fixed.length > 1 ? 'them' : 'it'} out, or make a template with other values`);
    const info = readTemplate(name);
    // The template's env (given at its setup) comes first; the caller's adds to it.
    const env = { ...(info.env ?? {}), ...(opts.env ?? {}) };
    const [sb] = await this.fromSnapshot(info.snapshot, { count: 1, env, ...(opts.engine ? { engine: opts.engine } : {}) });
    if (sb instanceof CladeError) throw new CladeError(sb.code, `could not start a sandbox from template ${name}: ${sb.message}`, { cause: sb });
    return sb!;
  }

  /**
   * Writes a running sandbox to the clade home as snapshot `tag`; it pauses as
   * for a fork and keeps running. The metadata is signed (docs/snapshots.md).
   */
  snapshot(sb: LiveSandbox, tag: string): Promise<SnapshotOutcome> {
    assertTagFree(tag); // before pausing the sandbox for nothing
    return sb.exclusive(async () => {
      if (!sb.alive) throw new CladeError('killed', `sandbox ${sb.id} is not running`);
      const staging = stagingDir(tag);
      try {
        const taken = await this.engine(sb.engineName).snapshot(sb.vm, staging, this.hooks(sb));
        await sb.replaceVm(taken.parent);
        const origin = this.originOf(sb, undefined);
        const meta = await commitSnapshot(
          staging,
          {
            tag,
            parent: sb.snapshotTag ?? null,
            sandboxId: sb.id,
            engine: sb.engineName,
            image: sb.shape.image.manifest.digest,
            memoryMiB: sb.shape.memoryMiB,
            cpus: sb.shape.cpus,
            ...withNetwork(sb.shape.network),
            agent: { token: origin.token.toString('hex'), nextId: origin.nextId, ...(origin.interpreterExecId ? { interpreterExecId: origin.interpreterExecId } : {}) },
          },
          taken.hashed,
        );
        sb.snapshotTag = tag;
        return { meta, timings: taken.timings };
      } catch (err) {
        rmSync(staging, { recursive: true, force: true });
        throw asCladeError(err, `snapshot of ${sb.id} failed`);
      }
    });
  }

  /**
   * Starts `count` sandboxes from a persistent snapshot, on the engine that
   * took it. Its files are opened once, checked through those descriptors,
   * and handed to the engine; each entry is a sandbox or why that one failed.
   */
  async fromSnapshot(tag: string, opts: { count?: number; env?: Record<string, string>; engine?: EngineName } = {}): Promise<(LiveSandbox | CladeError)[]> {
    const count = opts.count ?? 1;
    checkCount('count', count, 1);
    checkEngineName(opts.engine);
    // A snapshot starts on the engine that took it; asking for the other one is an error, not a silent switch.
    const meta = readSnapshotMeta(tag);
    if (opts.engine) assertSnapshotEngine(meta, opts.engine);
    const engine = this.engine(await this.chooseEngine(meta.engine));
    const opened = await openSnapshot(tag);
    const targets = this.targets();
    try {
      const shape: MachineShape = { image: resolveImage(meta.image), memoryMiB: meta.memoryMiB, cpus: meta.cpus, ...withNetwork(meta.network) };
      const t0 = performance.now();
      const vms = await engine.restore(opened.source(shape), count, targets.next).catch((err: unknown) => {
        targets.removeUnused([]);
        throw err;
      });
      targets.removeUnused(vms.filter((v): v is Vm => !(v instanceof CladeError)));
      const origin: GuestOrigin = { token: Buffer.from(meta.agent.token, 'hex'), nextId: meta.agent.nextId, interpreterExecId: meta.agent.interpreterExecId, shape, env: { ...imageEnv(shape.image), ...(opts.env ?? {}) }, parentId: undefined, snapshotTag: tag };
      const resumed = await mapInOrder(vms, (v) => (v instanceof CladeError ? Promise.reject(v) : this.resumeAsNewSandbox(v, origin, t0)));
      return resumed.map((r) => (r.status === 'fulfilled' ? r.value : asCladeError(r.reason, `could not start a sandbox from snapshot ${tag}`)));
    } finally {
      await opened.close(); // the VMs hold their own descriptors and mappings by now
    }
  }

  /** Prepares `size` forks of `sb` ahead of time (qemu: pre-started VM processes; vmm: nothing to do). */
  prewarm(sb: LiveSandbox, size: number): Promise<void> {
    checkCount('pool size', size, 0);
    return sb.exclusive(() => this.engine(sb.engineName).prewarm(sb.vm, size, this.targets().next, this.hooks(sb)));
  }

  /** Keeps `size` starts of snapshot `tag` ready ahead of time. */
  async warmPool(tag: string, size: number): Promise<void> {
    checkCount('pool size', size, 0);
    const meta = readSnapshotMeta(tag);
    const engine = this.engine(meta.engine);
    const opened = await openSnapshot(tag);
    const shape: MachineShape = { image: resolveImage(meta.image), memoryMiB: meta.memoryMiB, cpus: meta.cpus, ...withNetwork(meta.network) };
    await engine.warmPool({ ...opened.source(shape), close: () => opened.close() }, size, this.targets().next);
  }

  /**
   * Takes over a sandbox whose VM another clade process started and left
   * running (a daemon that was killed): the engine takes the VM over, and its
   * agent must answer HELLO with the recorded token. Throws if it does not;
   * the caller decides what to remove.
   */
  async adopt(rec: SandboxRecord): Promise<LiveSandbox> {
    const engine = this.engine(rec.vm.engine);
    if (!engine.recordedAlive(rec.vm)) throw new CladeError('killed', 'its VM process is gone');
    const shape: MachineShape = { image: resolveImage(rec.vm.shape.imageDigest), memoryMiB: rec.vm.shape.memoryMiB, cpus: rec.vm.shape.cpus, ...withNetwork(rec.vm.shape.network) };
    const vm = await engine.adopt(rec.vm, shape);
    const token = Buffer.from(rec.tokenHex, 'hex');
    const agent = new AgentClient(token, this.deadlines);
    agent.idCursor = rec.agentIdCursor; // the agent's HELLO then moves it past every id the dead owner used
    const deadline = Date.now() + 10_000;
    try {
      await agent.connect(vm.agentSocket, deadline, () => vm.alive());
      await agent.waitReady(deadline, () => vm.alive());
    } catch (err) {
      agent.close();
      throw err;
    }
    const sb = new LiveSandbox(rec.id, vm, agent, token, shape, rec.env, new Date(rec.createdAt), 0, rec.parentId, this.forget);
    if (rec.snapshotTag) sb.snapshotTag = rec.snapshotTag;
    this.register(sb);
    if (rec.interpreterExecId) attachInterpreter(sb, rec.interpreterExecId);
    for (const n of rec.namedInterpreters ?? []) attachInterpreter(sb.namedInterpreter(n.name, n.cwd), n.execId);
    return sb;
  }

  /** What a daemon keeps on disk about a sandbox: enough to adopt it after a crash. */
  record(sb: LiveSandbox, expiresAt: number | null): SandboxRecord {
    return {
      id: sb.id,
      vm: sb.vm.toRecord(),
      tokenHex: sb.token.toString('hex'),
      env: sb.env,
      ...(sb.parentId ? { parentId: sb.parentId } : {}),
      ...(sb.snapshotTag ? { snapshotTag: sb.snapshotTag } : {}),
      ...(sb.interpreterExecId ? { interpreterExecId: sb.interpreterExecId } : {}),
      ...(sb.startedInterpreters().length ? { namedInterpreters: sb.startedInterpreters() } : {}),
      agentIdCursor: sb.agent.idCursor,
      createdAt: sb.createdAt.toISOString(),
      expiresAt,
    };
  }

  /** Removes what processes that died without cleaning up left behind (docs/architecture.md, "Sandboxes and cleanup"). */
  reapOrphans(): { killed: number; removed: number } {
    return reapOrphans(this.list(), Object.values(this.engines).filter((e): e is Engine => e !== undefined));
  }

  /** At process exit: every VM of this manager and everything pre-started is killed, synchronously. */
  killAllSync(): void {
    for (const sb of this.live.values()) {
      for (const pid of sb.vm.pids()) killPidQuietly(pid);
      rmSync(sandboxDir(sb.id), { recursive: true, force: true });
      const rec = sb.vm.toRecord();
      if (rec.memory.shared) rmSync(rec.memory.file, { force: true });
    }
    this.live.clear();
    this.releasePreparedSync();
  }

  /** At process exit, for a daemon whose sandboxes outlive it: only what was started ahead of time goes. */
  releasePreparedSync(): void {
    for (const engine of Object.values(this.engines)) engine?.releaseAllSync();
    removeMemoryDirIfEmpty();
  }

  private register(sb: LiveSandbox): LiveSandbox {
    this.live.set(sb.id, sb);
    return sb;
  }

  private readonly forget = (sb: LiveSandbox): void => {
    if (this.live.get(sb.id) === sb) this.live.delete(sb.id);
  };

  /** The agent channel drains before a pause, and follows the sandbox to any new VM process. */
  private hooks(sb: LiveSandbox): PauseHooks {
    return { beforePause: () => sb.agent.drained(), moved: (vm) => sb.replaceVm(vm) };
  }

  private originOf(sb: LiveSandbox, snapshotTag: string | undefined): GuestOrigin {
    return { token: sb.token, nextId: sb.agent.idCursor, interpreterExecId: sb.interpreterExecId, namedInterpreters: sb.startedInterpreters(), shape: sb.shape, env: sb.env, parentId: sb.id, snapshotTag };
  }

  /** Ids and run directories for new VMs, and cleanup of those an engine did not use. */
  private targets(): { next: () => VmTarget; removeUnused(used: Vm[]): void } {
    const made: VmTarget[] = [];
    return {
      next: () => {
        const id = newSandboxId();
        const target = { id, runDir: newRunDir(id) };
        made.push(target);
        return target;
      },
      removeUnused: (used) => {
        const ids = new Set(used.map((v) => v.id));
        for (const t of made) if (!ids.has(t.id) && !this.live.has(t.id)) rmSync(sandboxDir(t.id), { recursive: true, force: true });
      },
    };
  }

  /**
   * Turns a VM that resumed someone else's state (a fork's child, a start from
   * a snapshot) into a sandbox of its own: connects to its agent with the
   * origin's token, sends the after-fork fixup, registers it and reseeds the
   * interpreter it inherited. On failure the VM and its files are removed.
   */
  private async resumeAsNewSandbox(vm: Vm, origin: GuestOrigin, t0: number): Promise<LiveSandbox> {
    const agent = new AgentClient(origin.token, this.deadlines);
    agent.idCursor = origin.nextId;
    try {
      await agent.connect(vm.agentSocket, Date.now() + RESUME_TIMEOUT_MS, () => vm.alive());
      const token = await becomeNewMachine(agent, vm.id);
      const sb = new LiveSandbox(vm.id, vm, agent, token, origin.shape, { ...origin.env }, new Date(), performance.now() - t0, origin.parentId, this.forget);
      if (origin.snapshotTag) sb.snapshotTag = origin.snapshotTag;
      this.register(sb);
      // Queued ahead of any runCode the caller sends next; no need to wait for it here.
      if (origin.interpreterExecId) void reseedInterpreter(sb, origin.interpreterExecId).catch(() => undefined);
      for (const n of origin.namedInterpreters ?? []) void reseedInterpreter(sb.namedInterpreter(n.name, n.cwd), n.execId).catch(() => undefined);
      return sb;
    } catch (err) {
      agent.close();
      await vm.kill();
      rmSync(sandboxDir(vm.id), { recursive: true, force: true });
      throw err;
    }
  }
}

/**
 * The after-fork fixup, before any user command: fresh kernel entropy, the
 * host's wall clock, its own hostname and sandbox id, and a new token (the
 * request itself is authenticated with the parent's, which then stops working).
 */
async function becomeNewMachine(agent: AgentClient, id: string): Promise<Buffer> {
  const token = randomBytes(32);
  const body = new FieldWriter()
    .bytes(Tag.SEED, randomBytes(64))
    .u64(Tag.TIME_NS, BigInt(Date.now()) * 1_000_000n + BigInt(Math.floor((performance.now() % 1) * 1e6)))
    .str(Tag.HOSTNAME, id)
    .str(Tag.SANDBOX_ID, id)
    .bytes(Tag.NEW_TOKEN, token);
  await agent.request(MessageType.FORK_FIXUP, body, RESUME_TIMEOUT_MS);
  agent.setToken(token);
  return token;
}

function mapInOrder<T, R>(items: T[], fn: (item: T) => Promise<R>): Promise<PromiseSettledResult<R>[]> {
  return mapLimited(items, FIXUP_CONCURRENCY, fn);
}

/** Gives each merged request its own share of the children, in request order. */
function splitOutcome(outcome: ForkOutcome, batch: ForkWaiter[]): void {
  let next = 0;
  for (const w of batch) {
    w.resolve({ ...outcome, children: outcome.children.slice(next, next + w.count) });
    next += w.count;
  }
}

/**
 * A sandbox that asked for a network must have one: an image built before
 * clade had networks has no virtio-net driver, and its guest would come up
 * without an interface and say nothing.
 */
async function assertGuestNetwork(sb: LiveSandbox): Promise<void> {
  const r = (await runCommand(sb, 'for i in /sys/class/net/*; do [ "${i##*/}" = lo ] || exit 0; done; exit 1')) as CommandResult;
  if (r.exitCode === 0) return;
  await sb.kill();
  throw new CladeError('unavailable', `sandbox ${sb.id} has no network interface: its image ${sb.shape.image.manifest.digest.slice(0, 12)} was built without the virtio-net driver; rebuild it with \`clade image build\``);
}

/** The shape's network field, present only when there is a network (records and hashes stay as they were without one). */
function withNetwork(network: NetworkSpec | undefined): { network?: NetworkSpec } {
  return network ? { network } : {};
}

function total(batch: ForkWaiter[]): number {
  return batch.reduce((n, w) => n + w.count, 0);
}

export function checkEngineName(name: string | undefined): asserts name is EngineName | undefined {
  if (name !== undefined && name !== 'qemu' && name !== 'vmm') throw new CladeError('bad_request', `unknown engine ${JSON.stringify(name)}: use "qemu" or "vmm"`);
}

/** Counts of children or slots share the fork limit. */
export function checkCount(name: string, value: number, min: number): void {
  if (!Number.isInteger(value) || value < min || value > MAX_FORK_COUNT) throw new CladeError('bad_request', `${name} must be an integer from ${min} to ${MAX_FORK_COUNT}, got ${value}`);
}

function checkRange(name: string, value: number, [min, max]: readonly [number, number]): number {
  if (!Number.isInteger(value) || value < min || value > max) throw new CladeError('bad_request', `${name} must be an integer from ${min} to ${max}, got ${value}`);
  return value;
}
