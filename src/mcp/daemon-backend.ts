import type { DaemonContext } from '../api/context.js';
import { runCommand, type CommandResult } from '../core/commands.js';
import { agentFileOps, Files } from '../core/files.js';
import { runCode } from '../core/interpreter.js';
import type { LiveSandbox } from '../core/sandbox.js';
import { readSnapshotMeta } from '../core/snapshots.js';
import { CladeError } from '../util/errors.js';
import type { ChildOutcome, CreateOptions, McpBackend, SandboxSummary } from './backend.js';

/**
 * The MCP tools on the daemon's own registry, as its routes use it: the same
 * limits (sandboxes, concurrent forks), lifetimes and records.
 */
export class DaemonBackend implements McpBackend {
  readonly where = 'in the clade daemon';

  constructor(private readonly ctx: DaemonContext) {}

  private summary(id: string): SandboxSummary {
    const v = this.ctx.registry.view(id);
    const ports = this.ctx.registry.get(id).ports;
    return { sandboxId: v.sandboxId, ...(v.parentId ? { parentId: v.parentId } : {}), ...(v.snapshotTag ? { snapshotTag: v.snapshotTag } : {}), startedAt: v.startedAt, expiresAt: v.expiresAt, ...(ports.length ? { ports: [...ports] } : {}) };
  }

  private sandbox(id: string): LiveSandbox {
    return this.ctx.registry.get(id);
  }

  private files(id: string): Files {
    return new Files(agentFileOps(this.sandbox(id).agent));
  }

  private lifetime(timeoutMs: number | undefined): number {
    return timeoutMs ?? this.ctx.defaultTimeoutMs;
  }

  async create({ timeoutMs, ...opts }: CreateOptions): Promise<SandboxSummary> {
    const release = this.ctx.registry.reserve(1);
    try {
      const live = await this.ctx.metrics.time('create', () => this.ctx.registry.manager.create(opts));
      return this.summary(this.ctx.registry.add(live, this.lifetime(timeoutMs)).sandboxId);
    } finally {
      release();
    }
  }

  async run(id: string, command: string, opts: { timeoutMs?: number; cwd?: string; env?: Record<string, string> }): Promise<CommandResult> {
    const sb = this.sandbox(id);
    return this.ctx.metrics.time('exec', () => runCommand(sb, command, { ...opts, ...(opts.env ? { envs: opts.env } : {}) }) as Promise<CommandResult>);
  }

  async runCode(id: string, code: string, opts: { timeoutMs?: number }) {
    const sb = this.sandbox(id);
    return this.ctx.metrics.time('code', () => runCode(sb, code, opts)).finally(() => this.ctx.registry.persist(sb.id));
  }

  readFile(id: string, path: string, maxBytes: number): Promise<Uint8Array> {
    return this.files(id).read(path, { format: 'bytes', maxBytes });
  }

  async writeFile(id: string, path: string, data: Uint8Array): Promise<void> {
    await this.files(id).write(path, data);
  }

  listFiles(id: string, path: string) {
    return this.files(id).list(path);
  }

  private children(kids: (LiveSandbox | CladeError)[], timeoutMs: number | undefined): ChildOutcome[] {
    return kids.map((k) => (k instanceof CladeError ? { error: `${k.code}: ${k.message}` } : { sandboxId: this.ctx.registry.add(k, this.lifetime(timeoutMs)).sandboxId }));
  }

  async fork(id: string, count: number, timeoutMs?: number): Promise<ChildOutcome[]> {
    const parent = this.sandbox(id);
    const release = this.ctx.registry.reserve(count);
    try {
      const { children } = await this.ctx.forkGate.runKeyed(parent.id, () => this.ctx.metrics.time('fork', () => this.ctx.registry.manager.fork(parent, count)));
      this.ctx.registry.persist(parent.id);
      return this.children(children, timeoutMs);
    } finally {
      release();
    }
  }

  async snapshot(id: string, tag: string): Promise<{ tag: string; createdAt?: string }> {
    const sb = this.sandbox(id);
    const { meta } = await this.ctx.registry.exclusive(sb.id, () => this.ctx.forkGate.run(() => this.ctx.metrics.time('snapshot', () => this.ctx.registry.manager.snapshot(sb, tag))));
    this.ctx.registry.persist(sb.id);
    return { tag: meta.tag, createdAt: meta.createdAt };
  }

  async fromSnapshot(tag: string, count: number, timeoutMs?: number): Promise<ChildOutcome[]> {
    readSnapshotMeta(tag);
    const release = this.ctx.registry.reserve(count);
    try {
      const kids = await this.ctx.forkGate.run(() => this.ctx.metrics.time('start', () => this.ctx.registry.manager.fromSnapshot(tag, { count })));
      return this.children(kids, timeoutMs);
    } finally {
      release();
    }
  }

  async list(): Promise<SandboxSummary[]> {
    return this.ctx.registry.list({}).map((v) => this.summary(v.sandboxId));
  }

  async kill(id: string): Promise<void> {
    await this.ctx.registry.remove(id);
  }
}
