import type { CodeResult, RunCodeOptions } from '../core/interpreter.js';
import { checkCount, checkEngineName, type StartOptions } from '../core/manager.js';
import type { SnapshotMeta } from '../core/snapshots.js';
import type { EngineName, ForkTimings, PortMapping } from '../core/manager.js';
import { CladeError } from '../util/errors.js';
import type { SandboxBackend, SandboxInfo, SnapshotInfo } from './backend.js';
import { Commands } from './commands.js';
import { Files } from './files.js';
import { LocalBackend } from './local.js';
import { daemonClient, RemoteBackend, type DaemonOptions } from './remote.js';

export type SandboxCreateOptions = StartOptions & {
  /** Lifetime: the sandbox is killed this long after creation (0 or unset: until killed). */
  timeoutMs?: number;
} & DaemonOptions;

/** A child that could not be created; the other children of the same fork are unaffected. */
export type ForkFailure = CladeError;

/**
 * A running Linux microVM. Create one with `Sandbox.create()`, drive it with
 * `commands`, `files` and `runCode`, branch it with `fork`, and end it with
 * `kill()` or `await using`. It runs in this process, or in a daemon when one
 * is named (`daemon` option or CLADE_DAEMON): the same API either way.
 */
export class Sandbox implements AsyncDisposable {
  readonly sandboxId: string;
  readonly commands: Commands;
  readonly files: Files;
  /** Timings of this sandbox's last fork (in this process; a daemon does not report them). */
  lastForkTimings?: ForkTimings;
  /** Timings of this sandbox's last snapshot to disk (in this process). */
  lastSnapshotTimings?: Record<string, number>;

  private constructor(private readonly backend: SandboxBackend) {
    this.sandboxId = backend.id;
    this.commands = new Commands(backend.commands);
    this.files = new Files(backend.files);
  }

  static async create(opts: SandboxCreateOptions = {}): Promise<Sandbox> {
    if (opts.timeoutMs !== undefined && (!Number.isFinite(opts.timeoutMs) || opts.timeoutMs < 0)) {
      throw new CladeError('bad_request', `timeoutMs must be a non-negative number of milliseconds, got ${opts.timeoutMs}`);
    }
    checkEngineName(opts.engine);
    const { daemon: _d, token: _t, ...local } = opts;
    const client = daemonClient(opts);
    if (client) {
      const { bootTimeoutMs: _b, ...body } = local;
      return new Sandbox(await RemoteBackend.create(client, body)); // the daemon keeps the lifetime
    }
    return new Sandbox(await LocalBackend.create(local));
  }

  /**
   * Starts `count` sandboxes from a persistent snapshot (see `snapshot()`),
   * on the engine that took it. The snapshot's signature and files are checked
   * first. Each entry is a running sandbox or the error that kept that one from starting.
   */
  static async fromSnapshot(tag: string, opts: { count?: number; env?: Record<string, string>; engine?: EngineName } & DaemonOptions = {}): Promise<(Sandbox | ForkFailure)[]> {
    checkEngineName(opts.engine);
    const count = opts.count ?? 1;
    checkCount('count', count, 1);
    const client = daemonClient(opts);
    const env = opts.env ? { env: opts.env } : {};
    const kids = client ? await RemoteBackend.start(client, tag, { count, ...env }) : await LocalBackend.fromSnapshot(tag, { count, ...env, ...(opts.engine ? { engine: opts.engine } : {}) });
    return kids.map((k) => (k instanceof CladeError ? k : new Sandbox(k)));
  }

  /** Keeps `size` starts of a persistent snapshot ready ahead of time (qemu: pre-started VM processes; vmm: nothing is needed). */
  static async warmPool(tag: string, size: number): Promise<void> {
    checkCount('pool size', size, 0);
    await LocalBackend.warmPool(tag, size);
  }

  /** A handle on a sandbox a daemon runs (the options, or CLADE_DAEMON, name the daemon). */
  static async connect(sandboxId: string, opts: DaemonOptions = {}): Promise<Sandbox> {
    const client = daemonClient(opts);
    if (!client) throw new CladeError('bad_request', 'Sandbox.connect needs a daemon: pass { daemon: "unix:///path/daemon.sock" } or set CLADE_DAEMON; in this process use the Sandbox you created');
    return new Sandbox(await RemoteBackend.connect(client, sandboxId));
  }

  /**
   * Forks this running sandbox into `count` children that resume from its exact
   * state (processes, memory, files), each isolated and already warm. The
   * parent keeps running. Each entry is a running child or the error that kept
   * that child from starting.
   */
  async fork(count = 1): Promise<(Sandbox | ForkFailure)[]> {
    checkCount('fork count', count, 1);
    const { children, timings } = await this.backend.fork(count);
    if (timings) this.lastForkTimings = timings;
    return children.map((c) => (c instanceof CladeError ? c : new Sandbox(c)));
  }

  /** Prepares this sandbox's next forks ahead of time (qemu: pre-started VM processes; vmm: nothing is needed). */
  async prewarmForks(size: number): Promise<void> {
    checkCount('pool size', size, 0);
    await this.backend.prewarmForks(size);
  }

  /**
   * Writes this sandbox's state to the clade home as snapshot `tag` (memory,
   * device state, signed JSON metadata with SHA-256 of each file and the
   * parent tag). The sandbox pauses only briefly and keeps running.
   */
  async snapshot(opts: { tag: string }): Promise<SnapshotInfo> {
    const { info, timings } = await this.backend.snapshot(opts.tag);
    if (timings) this.lastSnapshotTimings = timings;
    return info;
  }

  /**
   * Runs Python code in a persistent interpreter inside the sandbox: state is
   * kept between calls and forked with the sandbox. Returns the value of the
   * last expression (repr), the output, and the exception if one was raised.
   */
  runCode(code: string, opts: RunCodeOptions = {}): Promise<CodeResult> {
    return this.backend.runCode(code, opts);
  }

  /**
   * Kills the sandbox `timeoutMs` from now, replacing any earlier deadline
   * (0: no deadline). A daemon keeps the deadline across its restarts.
   */
  async setTimeout(timeoutMs: number): Promise<void> {
    if (!Number.isInteger(timeoutMs) || timeoutMs < 0) throw new CladeError('bad_request', `timeoutMs must be a non-negative integer of milliseconds, got ${timeoutMs}`);
    await this.backend.setTimeout(timeoutMs);
  }

  isRunning(): Promise<boolean> {
    return this.backend.isRunning();
  }

  getInfo(): SandboxInfo {
    return this.backend.info();
  }

  /** The guest's forwarded TCP ports (`network.ports`) and the host addresses that reach them; a fork's child has its own. */
  get ports(): PortMapping[] {
    return this.backend.info().ports;
  }

  /**
   * `host:port` on the host (the daemon's, for a sandbox a daemon runs) that
   * reaches TCP `port` in the guest, for a port listed in `network.ports`.
   */
  getHost(port: number): string {
    const mapping = this.ports.find((p) => p.port === port);
    if (!mapping) {
      const listed = this.ports.map((p) => p.port);
      throw new CladeError('bad_request', listed.length ? `guest port ${port} is not forwarded; this sandbox forwards ${listed.join(', ')} (network.ports at create)` : `this sandbox forwards no ports; create it with network: { ports: [${port}] }`);
    }
    return mapping.host;
  }

  /** Stops the VM and removes everything it left on the host. Safe to call twice. */
  async kill(): Promise<void> {
    await this.backend.kill();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
  }
}

export type { CodeResult, ForkTimings, PortMapping, RunCodeOptions, SandboxInfo, SnapshotInfo, SnapshotMeta };
