import { runCommand } from '../core/commands.js';
import { killSandboxesOnExit, defaultManager } from '../core/default.js';
import { agentFileOps, type FileOps } from '../core/files.js';
import { runCode, type CodeResult, type RunCodeOptions } from '../core/interpreter.js';
import type { StartOptions } from '../core/manager.js';
import type { LiveSandbox } from '../core/sandbox.js';
import type { EngineName, ForkTimings } from '../core/manager.js';
import { CladeError } from '../util/errors.js';
import { snapshotInfo, type SandboxBackend, type SandboxInfo, type SnapshotInfo } from './backend.js';
import type { CommandRunner } from './commands.js';

/** A sandbox in this process: the core's LiveSandbox, on this process's SandboxManager. */
export class LocalBackend implements SandboxBackend {
  readonly commands: CommandRunner;
  readonly files: FileOps;
  private lifetimeTimer?: NodeJS.Timeout;

  constructor(readonly live: LiveSandbox) {
    this.commands = { run: (cmd, opts) => runCommand(live, cmd, opts) };
    this.files = agentFileOps(live.agent);
  }

  get id(): string {
    return this.live.id;
  }

  static async create(opts: StartOptions & { timeoutMs?: number }): Promise<LocalBackend> {
    killSandboxesOnExit();
    const manager = defaultManager();
    manager.reapOrphans();
    const backend = new LocalBackend(await manager.create(opts));
    if (opts.timeoutMs) await backend.setTimeout(opts.timeoutMs);
    return backend;
  }

  static async fromSnapshot(tag: string, opts: { count: number; env?: Record<string, string>; engine?: EngineName }): Promise<(LocalBackend | CladeError)[]> {
    killSandboxesOnExit();
    const kids = await defaultManager().fromSnapshot(tag, opts);
    return kids.map((k) => (k instanceof CladeError ? k : new LocalBackend(k)));
  }

  static async warmPool(tag: string, size: number): Promise<void> {
    killSandboxesOnExit();
    await defaultManager().warmPool(tag, size);
  }

  runCode(code: string, opts: RunCodeOptions): Promise<CodeResult> {
    return runCode(this.live, code, opts);
  }

  async fork(count: number): Promise<{ children: (LocalBackend | CladeError)[]; timings: ForkTimings }> {
    const outcome = await defaultManager().fork(this.live, count);
    return { children: outcome.children.map((c) => (c instanceof CladeError ? c : new LocalBackend(c))), timings: outcome.timings };
  }

  async snapshot(tag: string): Promise<{ info: SnapshotInfo; timings: Record<string, number> }> {
    const { meta, timings } = await defaultManager().snapshot(this.live, tag);
    return { info: snapshotInfo(meta), timings };
  }

  prewarmForks(size: number): Promise<void> {
    return defaultManager().prewarm(this.live, size);
  }

  /** Kills the sandbox `timeoutMs` from now (0: never); the timer does not keep the process alive. */
  async setTimeout(timeoutMs: number): Promise<void> {
    clearTimeout(this.lifetimeTimer);
    if (timeoutMs === 0) return;
    this.lifetimeTimer = setTimeout(() => void this.kill(), timeoutMs);
    this.lifetimeTimer.unref();
  }

  async isRunning(): Promise<boolean> {
    return this.live.alive;
  }

  info(): SandboxInfo {
    const live = this.live;
    return {
      sandboxId: live.id,
      ...(live.parentId ? { parentId: live.parentId } : {}),
      image: live.shape.image.manifest.digest,
      engine: live.engineName,
      accelerator: live.vm.accelerator,
      pid: live.vm.pid,
      startedAt: live.createdAt,
      bootMs: live.bootMs,
      ...(live.snapshotTag ? { snapshotTag: live.snapshotTag } : {}),
      ports: live.ports.map((p) => ({ ...p })),
    };
  }

  async kill(): Promise<void> {
    clearTimeout(this.lifetimeTimer);
    await this.live.kill();
  }
}
