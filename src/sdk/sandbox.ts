import type { EngineName } from '../engines/engine.js';
import { CladeError } from '../util/errors.js';
import { acquireSlots, ensureFreezable, forkSandbox, freezeAndContinue, MAX_FORK_COUNT, resumeChildren, startContinuation, type ForkTimings } from '../core/fork.js';
import { runCode, type CodeResult, type RunCodeOptions } from '../core/interpreter.js';
import { ensurePool } from '../core/pool.js';
import { checkEngine, getLive, type LiveSandbox, startSandbox } from '../core/sandboxes.js';
import { assertSnapshotEngine, assertTagFree, loadSnapshot, persistSnapshot, readSnapshotMeta, snapshotEngine, type SnapshotMeta } from '../core/snapshots.js';
import { snapshotVmmSandbox, startFromVmmSnapshot } from '../core/vmm-snapshots.js';
import type { VmmSnapshotTimings } from '../engines/vmm/vmm-engine.js';
import { AgentCommands, Commands } from './commands.js';
import { agentFileOps, Files } from './files.js';
import { daemonClient, RemoteSandbox, type DaemonOptions } from './remote.js';

export type SandboxCreateOptions = {
  /** Image name or digest (default: "default", made by `clade image build`). */
  image?: string;
  memoryMiB?: number;
  cpus?: number;
  /** Environment variables every command in the sandbox gets. */
  env?: Record<string, string>;
  /** Lifetime: the sandbox is killed this long after creation (0 or unset: until killed). */
  timeoutMs?: number;
  /** How long to wait for the guest to boot and its agent to answer. */
  bootTimeoutMs?: number;
  engine?: EngineName;
} & DaemonOptions;

export type SandboxInfo = {
  sandboxId: string;
  parentId?: string;
  image: string;
  engine: EngineName;
  accelerator: string;
  pid: number;
  startedAt: Date;
  /** Boot (or, for a fork, resume) time until the agent answered, ms. */
  bootMs: number;
  /** The persistent snapshot this sandbox descends from, if any. */
  snapshotTag?: string;
};

/** A child that could not be created; the other children of the same fork are unaffected. */
export type ForkFailure = CladeError;

/**
 * A running Linux microVM. Create one with `Sandbox.create()`, drive it with
 * `commands`, `files` and `runCode`, branch it with `fork`, and end it with
 * `kill()` or `await using`.
 */
export class Sandbox implements AsyncDisposable {
  readonly sandboxId: string;
  readonly commands: Commands;
  readonly files: Files;
  /** Timings of this sandbox's last fork. */
  lastForkTimings?: ForkTimings;
  /** vmm engine: timings of this sandbox's last snapshot to disk (pause, writer, request → files written). */
  lastSnapshotTimings?: VmmSnapshotTimings;
  private lifetimeTimer?: NodeJS.Timeout;
  private snapshotTag?: string;
  /** Exactly one of these: the sandbox runs in this process, or in a daemon. */
  private readonly live?: LiveSandbox;
  private readonly remote?: RemoteSandbox;

  private constructor(impl: LiveSandbox | RemoteSandbox, opts: { timeoutMs?: number; snapshotTag?: string } = {}) {
    this.sandboxId = impl.id;
    if (impl instanceof RemoteSandbox) {
      this.remote = impl;
      this.commands = new Commands(impl.commands);
      this.files = new Files(impl.files);
    } else {
      this.live = impl;
      this.commands = new Commands(new AgentCommands(impl));
      this.files = new Files(agentFileOps(impl.agent));
    }
    if (opts.snapshotTag) this.snapshotTag = opts.snapshotTag;
    if (opts.timeoutMs) this.armLifetime(opts.timeoutMs);
  }

  /** The sandbox in this process; what only exists there says so when the sandbox runs in a daemon. */
  private local(feature: string): LiveSandbox {
    if (!this.live) throw new CladeError('unavailable', `${feature} is not available for a sandbox that runs in a daemon`);
    return this.live;
  }

  static async create(opts: SandboxCreateOptions = {}): Promise<Sandbox> {
    if (opts.timeoutMs !== undefined && (!Number.isFinite(opts.timeoutMs) || opts.timeoutMs < 0)) {
      throw new CladeError('bad_request', `timeoutMs must be a non-negative number of milliseconds, got ${opts.timeoutMs}`);
    }
    const client = daemonClient(opts);
    if (client) {
      const { daemon: _d, token: _t, bootTimeoutMs: _b, ...body } = opts;
      checkEngine(opts.engine);
      return new Sandbox(await RemoteSandbox.create(client, body)); // the daemon keeps the lifetime
    }
    const live = await startSandbox(opts);
    return new Sandbox(live, opts.timeoutMs ? { timeoutMs: opts.timeoutMs } : {});
  }

  /**
   * Starts `count` sandboxes from a persistent snapshot (see `snapshot()`).
   * The snapshot's files are checked against their SHA-256 first. Each entry is
   * a running sandbox or the error that kept that one from starting.
   */
  static async fromSnapshot(tag: string, opts: { count?: number; env?: Record<string, string>; engine?: EngineName } & DaemonOptions = {}): Promise<(Sandbox | ForkFailure)[]> {
    checkEngine(opts.engine);
    const count = opts.count ?? 1;
    checkCount('count', count, 1);
    const client = daemonClient(opts);
    if (client) {
      const kids = await RemoteSandbox.start(client, tag, { count, ...(opts.env ? { env: opts.env } : {}) });
      return kids.map((k) => (k instanceof CladeError ? k : new Sandbox(k, { snapshotTag: tag })));
    }
    // A snapshot starts on the engine that took it; asking for the other one is an error, not a silent switch.
    const meta = readSnapshotMeta(tag);
    if (opts.engine) assertSnapshotEngine(meta, opts.engine);
    if (snapshotEngine(meta) === 'vmm') {
      const kids = await startFromVmmSnapshot(tag, count, opts.env ?? {});
      return kids.map((k) => (k instanceof CladeError ? k : new Sandbox(k, { snapshotTag: tag })));
    }
    const { snapshot: snap, opened } = await loadSnapshot(tag);
    snap.retain();
    try {
      const { slots, errors } = await acquireSlots(snap, snap.memoryFile, count, snap.memoryFd);
      const kids = await resumeChildren(snap, slots, opts.env ?? {}, undefined);
      return [...kids.map((k) => (k instanceof CladeError ? k : new Sandbox(k, { snapshotTag: tag }))), ...errors];
    } finally {
      snap.release();
      await opened.close(); // the VMs hold their own mappings of the checked file
    }
  }

  /** Keeps `size` VM processes pre-started for a persistent snapshot, so starts from it only load state. */
  static async warmPool(tag: string, size: number): Promise<void> {
    checkCount('pool size', size, 0);
    // vmm snapshots start a clade-vmm process that maps memory.raw: nothing to pre-start.
    if (snapshotEngine(readSnapshotMeta(tag)) === 'vmm') return;
    const { snapshot: snap, opened } = await loadSnapshot(tag);
    // The pool keeps the checked memory file open for the slots it starts later.
    await ensurePool(snap.memoryFile, snap.shape, size, true, { fd: snap.memoryFd!, close: () => opened.close() }).whenFull();
  }

  /**
   * Forks this running sandbox into `count` children that resume from its exact
   * state (processes, memory, files), each isolated and already warm. The
   * parent keeps running. Each entry is a running child or the error that kept
   * that child from starting.
   */
  async fork(count = 1): Promise<(Sandbox | ForkFailure)[]> {
    if (this.remote) return (await this.remote.fork(count)).map((c) => (c instanceof CladeError ? c : new Sandbox(c)));
    const outcome = await forkSandbox(this.local('fork'), count);
    this.lastForkTimings = outcome.timings;
    return outcome.children.map((c) => (c instanceof CladeError ? c : new Sandbox(c, this.snapshotTag ? { snapshotTag: this.snapshotTag } : {})));
  }

  /** Pre-starts `size` VM processes for this sandbox's next fork and waits until they are ready. */
  async prewarmForks(size: number): Promise<void> {
    checkCount('pool size', size, 0);
    if (this.remote) return this.remote.prewarmForks(size);
    const live = this.local('prewarmForks');
    if (live.engineName === 'vmm') return; // a vmm fork is fork(2) of the running VMM: there is nothing to pre-start
    // A fork's parent maps its RAM copy-on-write; the slots need a file of its own (a RAM copy, once).
    await ensureFreezable(live);
    const pool = ensurePool(live.vm.memory.file, live.shape, size, false);
    if (size > 0 && !live.hasWarmContinuation()) live.setWarmContinuation(startContinuation(live));
    await Promise.all([pool.whenFull(), live.warmContinuationReady()]);
  }

  /**
   * Writes this sandbox's state to the clade home as snapshot `tag` (memory,
   * device state, JSON metadata with SHA-256 of each file and the parent tag).
   * The sandbox pauses only briefly and keeps running.
   */
  async snapshot(opts: { tag: string }): Promise<SnapshotInfo> {
    if (this.remote) {
      const meta = await this.remote.snapshot(opts.tag);
      this.snapshotTag = opts.tag;
      return meta;
    }
    assertTagFree(opts.tag); // before pausing the sandbox for nothing
    const live = this.local('snapshot');
    if (live.engineName === 'vmm') {
      const { meta, timings } = await snapshotVmmSandbox(live, opts.tag, this.snapshotTag ?? null);
      this.snapshotTag = opts.tag;
      this.lastSnapshotTimings = timings;
      return meta;
    }
    const { snapshot } = await freezeAndContinue(this.local('snapshot'), async () => ({ slots: [], warm: 0 }));
    try {
      const meta = await persistSnapshot(snapshot, opts.tag, this.sandboxId, this.snapshotTag ?? null);
      this.snapshotTag = opts.tag;
      return meta;
    } finally {
      snapshot.release();
    }
  }

  /**
   * Runs Python code in a persistent interpreter inside the sandbox: state is
   * kept between calls and forked with the sandbox. Returns the value of the
   * last expression (repr), the output, and the exception if one was raised.
   */
  runCode(code: string, opts: RunCodeOptions = {}): Promise<CodeResult> {
    if (this.remote) return this.remote.runCode(code, opts);
    return runCode(this.local('runCode'), code, opts);
  }

  /**
   * Kills the sandbox `timeoutMs` from now, replacing any earlier deadline
   * (0: no deadline). A daemon keeps the deadline across its restarts.
   */
  async setTimeout(timeoutMs: number): Promise<void> {
    if (!Number.isInteger(timeoutMs) || timeoutMs < 0) throw new CladeError('bad_request', `timeoutMs must be a non-negative integer of milliseconds, got ${timeoutMs}`);
    if (this.remote) return this.remote.setTimeout(timeoutMs);
    this.armLifetime(timeoutMs);
  }

  private armLifetime(timeoutMs: number): void {
    clearTimeout(this.lifetimeTimer);
    if (timeoutMs === 0) return;
    this.lifetimeTimer = setTimeout(() => void this.kill(), timeoutMs);
    this.lifetimeTimer.unref();
  }

  async isRunning(): Promise<boolean> {
    return this.remote ? this.remote.isRunning() : this.local('isRunning').alive;
  }

  getInfo(): SandboxInfo {
    if (this.remote) return this.remoteInfo(this.remote);
    const live = this.local('getInfo');
    return {
      sandboxId: this.sandboxId,
      ...(live.parentId ? { parentId: live.parentId } : {}),
      image: live.shape.image.manifest.digest,
      engine: live.engineName,
      accelerator: live.vm.accelerator,
      pid: live.vm.pid,
      startedAt: live.createdAt,
      bootMs: live.bootMs,
      ...(this.snapshotTag ? { snapshotTag: this.snapshotTag } : {}),
    };
  }

  /** As the daemon described the sandbox when this handle was made (boot time is not reported: 0). */
  private remoteInfo(remote: RemoteSandbox): SandboxInfo {
    const v = remote.view;
    const snapshotTag = this.snapshotTag ?? v.snapshotTag;
    return {
      sandboxId: v.sandboxId,
      ...(v.parentId ? { parentId: v.parentId } : {}),
      image: v.image,
      engine: v.engine,
      accelerator: v.accelerator,
      pid: v.pid,
      startedAt: new Date(v.startedAt),
      bootMs: 0,
      ...(snapshotTag ? { snapshotTag } : {}),
    };
  }

  /** Stops the VM and removes everything it left on the host. Safe to call twice. */
  async kill(): Promise<void> {
    clearTimeout(this.lifetimeTimer);
    await (this.remote ?? this.local('kill')).kill();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
  }

  /** A handle on a sandbox a daemon runs (the options, or CLADE_DAEMON, name the daemon). */
  static async connect(sandboxId: string, opts: DaemonOptions = {}): Promise<Sandbox> {
    const client = daemonClient(opts);
    if (!client) throw new CladeError('bad_request', 'Sandbox.connect needs a daemon: pass { daemon: "unix:///path/daemon.sock" } or set CLADE_DAEMON; in this process use the Sandbox you created');
    return new Sandbox(await RemoteSandbox.connect(client, sandboxId));
  }

  /** The live sandbox behind an id, for tools that hold ids (the CLI, the daemon). */
  static connectLocal(id: string): Sandbox {
    return new Sandbox(getLive(id));
  }
}

/** A snapshot's metadata as callers see it (the agent token stays with the host). */
export type SnapshotInfo = Omit<SnapshotMeta, 'agent'>;
export type { CodeResult, RunCodeOptions, ForkTimings, SnapshotMeta };

/** Counts of children or slots share the fork limit. */
function checkCount(name: string, value: number, min: number): void {
  if (!Number.isInteger(value) || value < min || value > MAX_FORK_COUNT) throw new CladeError('bad_request', `${name} must be an integer from ${min} to ${MAX_FORK_COUNT}, got ${value}`);
}
