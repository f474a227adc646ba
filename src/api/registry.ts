import { rmSync } from 'node:fs';
import type { SandboxManager } from '../core/manager.js';
import type { SandboxRecord } from '../core/records.js';
import { type LiveSandbox, sandboxDir } from '../core/sandbox.js';
import { CladeError, errorMessage } from '../util/errors.js';
import type { SandboxView } from '../wire/schemas.js';
import { CommandTable } from './commands.js';
import type { StateStore } from './state.js';

const SWEEP_MS = 1000;
/** Forks or snapshots of one sandbox that may wait for the one running; more are refused. */
const MAX_WAITING_PER_SANDBOX = 32;

type Entry = { live: LiveSandbox; expiresAt: number | null; fingerprint: string };

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
    readonly manager: SandboxManager,
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
    const pooled = this.manager.preparedVms;
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
   * Runs forks and snapshots of one sandbox one after another, with a bounded
   * queue: each pauses the sandbox and may move it to a new VM process.
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

  add(live: LiveSandbox, timeoutMs: number): SandboxView {
    this.entries.set(live.id, { live, expiresAt: timeoutMs > 0 ? Date.now() + timeoutMs : null, fingerprint: '' });
    this.follow(live);
    this.persist(live.id);
    return this.view(live.id);
  }

  get(id: string): LiveSandbox {
    const entry = this.entries.get(id);
    if (!entry) throw new CladeError('not_found', `no sandbox ${JSON.stringify(id)} in this daemon; list them with GET /v1/sandboxes (or \`clade ps\`)`);
    return entry.live;
  }

  view(id: string): SandboxView {
    const entry = this.entries.get(id);
    if (!entry) throw new CladeError('not_found', `no sandbox ${JSON.stringify(id)} in this daemon`);
    const live = entry.live;
    return {
      sandboxId: id,
      ...(live.parentId ? { parentId: live.parentId } : {}),
      ...(live.snapshotTag ? { snapshotTag: live.snapshotTag } : {}),
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
    return [...this.entries.values()]
      .filter((e) => e.live.alive)
      .map((e) => this.view(e.live.id))
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

  /** The record goes last: a daemon that dies mid-way still knows the VM, or the VM is already gone. */
  async remove(id: string): Promise<void> {
    const live = this.get(id);
    this.entries.delete(id);
    this.commands.dropSandbox(id);
    try {
      await live.kill();
    } finally {
      this.store.remove(id);
    }
  }

  /** Writes the record again if what a restarted daemon needs has changed (a fork may move the VM). */
  persist(id: string): void {
    const entry = this.entries.get(id);
    if (!entry || !entry.live.alive) return;
    const rec = this.manager.record(entry.live, entry.expiresAt);
    const fingerprint = JSON.stringify([rec.vm, rec.interpreterExecId, rec.namedInterpreters, rec.expiresAt, rec.snapshotTag]);
    if (fingerprint === entry.fingerprint) return;
    this.store.save(rec);
    entry.fingerprint = fingerprint;
  }

  /** The record follows the sandbox to each new VM process at once, before the old process is gone. */
  private follow(live: LiveSandbox): void {
    live.onVmChanged = () => {
      try {
        this.persist(live.id);
      } catch (err) {
        this.log.warn({ sandboxId: live.id, err: errorMessage(err) }, 'could not rewrite the sandbox record; the sweep will retry');
      }
    };
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
        if (!entry.live.alive) {
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
    for (const [id, entry] of this.entries) {
      entry.fingerprint = '';
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
        if (rec.expiresAt !== null && rec.expiresAt <= Date.now()) throw new CladeError('timeout', 'its lifetime ended while no daemon ran');
        const live = await this.manager.adopt(rec);
        this.entries.set(live.id, { live, expiresAt: rec.expiresAt, fingerprint: '' });
        this.follow(live);
        this.persist(live.id);
        adopted.push(rec.id);
      } catch (err) {
        this.log.warn({ sandboxId: rec.id, err: errorMessage(err) }, 'could not adopt sandbox; removing it');
        this.discard(rec);
        dropped.push(rec.id);
      }
    }
    return { adopted, dropped };
  }

  private discard(rec: SandboxRecord): void {
    this.manager.engine(rec.vm.engine).killRecorded(rec.vm);
    this.manager.find(rec.id)?.kill().catch(() => undefined);
    rmSync(sandboxDir(rec.id), { recursive: true, force: true });
    if (rec.vm.memory.shared) rmSync(rec.vm.memory.file, { force: true });
    this.store.remove(rec.id);
  }
}
