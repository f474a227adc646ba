import type { CodeResult, RunCodeOptions } from '../core/interpreter.js';
import type { SnapshotMeta } from '../core/snapshots.js';
import type { EngineName, ForkTimings, PortMapping } from '../core/manager.js';
import type { CladeError } from '../util/errors.js';
import type { CommandRunner } from './commands.js';
import type { FileOps } from './files.js';

export type SandboxInfo = {
  sandboxId: string;
  parentId?: string;
  image: string;
  engine: EngineName;
  accelerator: string;
  pid: number;
  startedAt: Date;
  /** Boot (or, for a fork, resume) time until the agent answered, ms; 0 when a daemon runs the sandbox. */
  bootMs: number;
  /** The persistent snapshot this sandbox descends from, if any. */
  snapshotTag?: string;
  /** Forwarded guest TCP ports and the host addresses that reach them (a network's `ports`; each fork has its own). */
  ports: PortMapping[];
};

/** A snapshot's metadata as callers see it (the agent token and the signature stay with the host). */
export type SnapshotInfo = Omit<SnapshotMeta, 'agent' | 'hmac'>;

export function snapshotInfo(meta: Omit<SnapshotMeta, 'agent' | 'hmac'> & { agent?: unknown; hmac?: unknown }): SnapshotInfo {
  const { agent: _secret, hmac: _mac, ...info } = meta;
  return info;
}

/**
 * Where a sandbox runs: in this process (LocalBackend, on the core) or in a
 * daemon (RemoteBackend, over HTTP). The public Sandbox class is the same
 * over both.
 */
export interface SandboxBackend {
  readonly id: string;
  readonly commands: CommandRunner;
  readonly files: FileOps;
  runCode(code: string, opts: RunCodeOptions): Promise<CodeResult>;
  fork(count: number): Promise<{ children: (SandboxBackend | CladeError)[]; timings?: ForkTimings }>;
  snapshot(tag: string): Promise<{ info: SnapshotInfo; timings?: Record<string, number> }>;
  prewarmForks(size: number): Promise<void>;
  setTimeout(timeoutMs: number): Promise<void>;
  isRunning(): Promise<boolean>;
  info(): SandboxInfo;
  kill(): Promise<void>;
}
