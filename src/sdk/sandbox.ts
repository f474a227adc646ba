import type { EngineName } from '../engines/engine.js';
import { CladeError } from '../core/errors.js';
import { type LiveSandbox, startSandbox } from '../core/sandboxes.js';
import { Commands } from './commands.js';
import { Files } from './files.js';

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
};

export type SandboxInfo = {
  sandboxId: string;
  image: string;
  engine: EngineName;
  accelerator: string;
  pid: number;
  startedAt: Date;
  bootMs: number;
};

/**
 * A running Linux microVM. Create one with `Sandbox.create()`, drive it with
 * `commands` and `files`, and end it with `kill()` or `await using`.
 */
export class Sandbox implements AsyncDisposable {
  readonly sandboxId: string;
  readonly commands: Commands;
  readonly files: Files;
  private lifetimeTimer?: NodeJS.Timeout;

  private constructor(private readonly live: LiveSandbox, timeoutMs?: number) {
    this.sandboxId = live.id;
    this.commands = new Commands(live);
    this.files = new Files(live);
    if (timeoutMs) this.setTimeout(timeoutMs);
  }

  static async create(opts: SandboxCreateOptions = {}): Promise<Sandbox> {
    if (opts.timeoutMs !== undefined && (!Number.isFinite(opts.timeoutMs) || opts.timeoutMs < 0)) {
      throw new CladeError('bad_request', `timeoutMs must be a non-negative number of milliseconds, got ${opts.timeoutMs}`);
    }
    const live = await startSandbox(opts);
    return new Sandbox(live, opts.timeoutMs);
  }

  /** Kills the sandbox `timeoutMs` from now (replacing any earlier deadline). */
  setTimeout(timeoutMs: number): void {
    clearTimeout(this.lifetimeTimer);
    this.lifetimeTimer = setTimeout(() => void this.kill(), timeoutMs);
    this.lifetimeTimer.unref();
  }

  async isRunning(): Promise<boolean> {
    return this.live.alive;
  }

  getInfo(): SandboxInfo {
    return {
      sandboxId: this.sandboxId,
      image: this.live.shape.image.manifest.digest,
      engine: 'qemu',
      accelerator: this.live.vm.accelerator,
      pid: this.live.vm.pid,
      startedAt: this.live.createdAt,
      bootMs: this.live.bootMs,
    };
  }

  /** Stops the VM and removes everything it left on the host. Safe to call twice. */
  async kill(): Promise<void> {
    clearTimeout(this.lifetimeTimer);
    await this.live.kill();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.kill();
  }
}
