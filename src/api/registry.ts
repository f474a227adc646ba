import { rmSync } from 'node:fs';
import { CladeError, errorMessage } from '../util/errors.js';
import { pooledSlots } from '../core/pool.js';
import { adoptSandbox, getLive, killPidQuietly, liveSandboxes, sandboxDir } from '../core/sandboxes.js';
import { isSandboxVm } from '../engines/qemu/qemu-engine.js';
import { isVmmProcess } from '../engines/vmm/vmm-engine.js';
import { resolveImage } from '../images/store.js';
import { Sandbox } from '../sdk/sandbox.js';
import { CommandTable } from './commands.js';
import { recordOf, type SandboxRecord, type StateStore } from './state.js';

const SWEEP_MS = 1000;
/** Forks or snapshots of one sandbox that may wait for the one running; more are refused. */
const MAX_WAITING_PER_SANDBOX = 32;

type Entry = { sandbox: Sandbox; expiresAt: number | null; snapshotTag?: string; fingerprint: string };

export type SandboxView = {
  sandboxId: string;
  parentId?: string;
  snapshotTag?: string;
  image: string;
  engine: 'qemu' | 'vmm';
  memoryMiB: number;
  cpus: number;
  accelerator: string;
  pid: number;
  startedAt: string;
  expiresAt: string | null;
};

export type Logger = { info: (obj: object, msg: string) => void; warn: (obj: object, msg: string) => void };

/**
 * The daemon's sandboxes: a cap on how many may exist (reserved before a boot
 * or fork starts, so concurrent requests cannot overshoot it), their
 * lifetimes, and their records on disk, kept in step with the VMs.
 */
export class SandboxRegistry {
  private readonly entries = new Map<string, Entry>();
  private reserved = 0;
  private sweeper?: NodeJS.Timeout;
  private readonly locks = new Map<string, { tail: Promise<unknown>; waiting: number }>();
  /** Background commands of these sandboxes, started through the API. */
  readonly commands = new CommandTable();

  constructor(
    private readonly store: StateStore,
    private readonly maxSandboxes: number,
    private readonly log: Logger,
  ) {}

  get size(): number {
    return this.entries.size;
  }

  /** Holds room for `n` new sandboxes; call the returned function when they are added or failed. */
  reserve(n: number): () => void {
    // VMs pre-started for forks (prewarm) are VMs too: they count against the same limit.
    const pooled = pooledSlots();
    if (this.entries.size + this.reserved + pooled + n > this.maxSandboxes) {
      throw new CladeError('unavailable', `this daemon runs at most ${this.maxSandboxes} sandboxes (${this.entries.size} running, ${this.reserved} starting, ${pooled} pre-started for forks); delete some or restart \`clade serve\` with a larger --max-sandboxes`);
    }
    this.reserved += n;
    let released = false;
    return () => {
      if (!released) this.reserved -= n;
      released = true;
    };
  }

  /**
   * Runs forks and snapshots of one sandbox one after another: each freezes the
   * sandbox and moves it to a new VM process, which two at once would tear apart.
   */
  async exclusive<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const lock = this.locks.get(id) ?? { tail: Promise.resolve(), waiting: 0 };
    if (lock.waiting >= MAX_WAITING_PER_SANDBOX) throw new CladeError('unavailable', `${lock.waiting} forks or snapshots of ${id} are already queued; retry when some have finished`);
    lock.waiting++;
    this.locks.set(id, lock);
    const run = lock.tail.then(fn);
    lock.tail = run.catch(() => undefined);
    try {
      return await run;
    } finally {
      if (--lock.waiting === 0) this.locks.delete(id);
    }
  }

  add(sandbox: Sandbox, timeoutMs: number, snapshotTag?: string): SandboxView {
    const entry: Entry = { sandbox, expiresAt: timeoutMs > 0 ? Date.now() + timeoutMs : null, fingerprint: '', ...(snapshotTag ? { snapshotTag } : {}) };
    this.entries.set(sandbox.sandboxId, entry);
    this.follow(sandbox.sandboxId);
    this.persist(sandbox.sandboxId);
    return this.view(sandbox.sandboxId);
  }

  get(id: string): Sandbox {
    const entry = this.entries.get(id);
    if (!entry) throw new CladeError('not_found', `no sandbox ${JSON.stringify(id)} in this daemon; list them with GET /v1/sandboxes (or \`clade ps\`)`);
    return entry.sandbox;
  }

  view(id: string): SandboxView {
    const entry = this.entries.get(id);
    if (!entry) throw new CladeError('not_found', `no sandbox ${JSON.stringify(id)} in this daemon`);
    const live = getLive(id);
    return {
      sandboxId: id,
      ...(live.parentId ? { parentId: live.parentId } : {}),
      ...(entry.snapshotTag ? { snapshotTag: entry.snapshotTag } : {}),
      image: live.shape.image.manifest.digest,
      engine: live.engineName,
      memoryMiB: live.shape.memoryMiB,
      cpus: live.shape.cpus,
      accelerator: live.vm.accelerator,
      pid: live.vm.pid,
      startedAt: live.createdAt.toISOString(),
      expiresAt: entry.expiresAt === null ? null : new Date(entry.expiresAt).toISOString(),
    };
  }

  list(filter: { parentId?: string; snapshotTag?: string }): SandboxView[] {
    return [...this.entries.keys()]
      .filter((id) => getLiveOrUndefined(id) !== undefined)
      .map((id) => this.view(id))
      .filter((v) => (filter.parentId === undefined || v.parentId === filter.parentId) && (filter.snapshotTag === undefined || v.snapshotTag === filter.snapshotTag));
  }

  /** Sets a new lifetime, from now (0: until deleted); kept across daemon restarts like the first. */
  setLifetime(id: string, timeoutMs: number): SandboxView {
    const entry = this.entries.get(id);
    if (!entry) throw new CladeError('not_found', `no sandbox ${JSON.stringify(id)} in this daemon`);
    entry.expiresAt = timeoutMs > 0 ? Date.now() + timeoutMs : null;
    this.persist(id);
    return this.view(id);
  }

  setSnapshotTag(id: string, tag: string): void {
    const entry = this.entries.get(id);
    if (entry) entry.snapshotTag = tag;
    this.persist(id);
  }

  /** The record goes last: a daemon that dies mid-way still knows the VM, or the VM is already gone. */
  async remove(id: string): Promise<void> {
    const sandbox = this.get(id);
    this.entries.delete(id);
    this.commands.dropSandbox(id);
    try {
      await sandbox.kill();
    } finally {
      this.store.remove(id);
    }
  }

  /** Writes the record again if what a restarted daemon needs has changed (a fork moves the VM). */
  persist(id: string): void {
    const entry = this.entries.get(id);
    const live = getLiveOrUndefined(id);
    if (!entry || !live) return;
    const rec = recordOf(live, { expiresAt: entry.expiresAt, ...(entry.snapshotTag ? { snapshotTag: entry.snapshotTag } : {}) });
    const fingerprint = `${rec.pid}:${rec.runDir}:${rec.interpreterExecId ?? 0}:${rec.memory.file}:${rec.expiresAt}:${rec.snapshotTag ?? ''}`;
    if (fingerprint === entry.fingerprint) return;
    this.store.save(rec);
    entry.fingerprint = fingerprint;
  }

  /** Kills expired sandboxes, forgets those whose VM ended on its own, and keeps records current. */
  startSweeping(): void {
    let running = false;
    this.sweeper = setInterval(() => {
      if (running) return; // a slow sweep (a kill waiting on a VM) is not stacked on
      running = true;
      void this.sweep()
        .catch((err: unknown) => this.log.warn({ err: errorMessage(err) }, 'sandbox sweep failed; will retry'))
        .finally(() => (running = false));
    }, SWEEP_MS);
    this.sweeper.unref();
  }

  /** One failing sandbox (a full disk while saving its record, say) does not stop the others being swept. */
  private async sweep(): Promise<void> {
    const now = Date.now();
    for (const [id, entry] of [...this.entries]) {
      try {
        if (!getLiveOrUndefined(id)) {
          this.entries.delete(id);
          this.commands.dropSandbox(id);
          this.store.remove(id);
          this.log.info({ sandboxId: id }, 'sandbox ended on its own; record removed');
        } else if (entry.expiresAt !== null && entry.expiresAt <= now) {
          this.log.info({ sandboxId: id }, 'sandbox lifetime is over; killing it');
          await this.remove(id);
        } else {
          this.persist(id);
        }
      } catch (err) {
        this.log.warn({ sandboxId: id, err: errorMessage(err) }, 'could not sweep sandbox; will retry');
      }
    }
  }

  /** Saves every record one last time; the VMs keep running for the next daemon. */
  detachAll(): void {
    clearInterval(this.sweeper);
    for (const id of this.entries.keys()) {
      this.entries.get(id)!.fingerprint = '';
      this.persist(id);
    }
  }

  async killAll(): Promise<void> {
    clearInterval(this.sweeper);
    await Promise.all([...this.entries.keys()].map((id) => this.remove(id).catch(() => undefined)));
  }

  /**
   * Takes over the sandboxes a previous daemon left running; drops the records
   * of those whose VM is gone or does not answer with its token.
   */
  async adoptAll(): Promise<{ adopted: string[]; dropped: string[] }> {
    const adopted: string[] = [];
    const dropped: string[] = [];
    const invalid = (file: string) => this.log.warn({ file }, 'sandbox record is invalid; removed without using it');
    for (const rec of this.store.loadAll(invalid)) {
      try {
        await this.adoptOne(rec);
        adopted.push(rec.id);
      } catch (err) {
        this.log.warn({ sandboxId: rec.id, err: errorMessage(err) }, 'could not adopt sandbox; removing it');
        this.discard(rec);
        dropped.push(rec.id);
      }
    }
    return { adopted, dropped };
  }

  private async adoptOne(rec: SandboxRecord): Promise<void> {
    if (rec.expiresAt !== null && rec.expiresAt <= Date.now()) throw new CladeError('timeout', 'its lifetime ended while no daemon ran');
    if (!recordedVmAlive(rec)) throw new CladeError('killed', 'its VM process is gone');
    const image = resolveImage(rec.shape.imageDigest);
    const live = await adoptSandbox({
      vm: { engine: rec.engine ?? 'qemu', ...(rec.startTicks ? { startTicks: rec.startTicks } : {}), id: rec.id, pid: rec.pid, runDir: rec.runDir, memory: rec.memory, accelerator: rec.accelerator, shape: { image, memoryMiB: rec.shape.memoryMiB, cpus: rec.shape.cpus } },
      token: Buffer.from(rec.tokenHex, 'hex'),
      env: rec.env,
      createdAt: new Date(rec.createdAt),
      ...(rec.parentId ? { parentId: rec.parentId } : {}),
      ...(rec.interpreterExecId ? { interpreterExecId: rec.interpreterExecId } : {}),
      agentIdCursor: rec.agentIdCursor, // the agent's HELLO then moves it past every id the dead daemon used
      runGeneration: Number(/vm-(\d+)$/.exec(rec.runDir)?.[1] ?? 0),
    });
    const entry: Entry = { sandbox: Sandbox.connectLocal(live.id), expiresAt: rec.expiresAt, fingerprint: '', ...(rec.snapshotTag ? { snapshotTag: rec.snapshotTag } : {}) };
    this.entries.set(rec.id, entry);
    this.follow(rec.id);
    this.persist(rec.id);
  }

  /** The record follows the sandbox to each new VM process at once, before the old process is gone. */
  private follow(id: string): void {
    const live = getLiveOrUndefined(id);
    if (!live) return;
    live.onVmChanged = () => {
      try {
        this.persist(id);
      } catch (err) {
        this.log.warn({ sandboxId: id, err: errorMessage(err) }, 'could not rewrite the sandbox record; the sweep will retry');
      }
    };
  }

  private discard(rec: SandboxRecord): void {
    if (recordedVmAlive(rec)) killPidQuietly(rec.pid);
    getLiveOrUndefined(rec.id)?.kill().catch(() => undefined);
    rmSync(sandboxDir(rec.id), { recursive: true, force: true });
    if (rec.memory.shared) rmSync(rec.memory.file, { force: true });
    this.store.remove(rec.id);
  }
}

/** The record's VM process still runs (a pid alone proves nothing: pids are reused). */
function recordedVmAlive(rec: SandboxRecord): boolean {
  if (rec.engine === 'vmm') return rec.startTicks !== undefined && isVmmProcess(rec.pid, rec.startTicks);
  return isSandboxVm(rec.pid, rec.id);
}

function getLiveOrUndefined(id: string) {
  return liveSandboxes().find((s) => s.id === id && s.alive);
}
