import type { CommandResult } from '../core/commands.js';
import { Sandbox } from '../sdk/sandbox.js';
import type { DaemonOptions } from '../sdk/remote.js';
import { DaemonClient, parseDaemonAddress } from '../sdk/daemon-client.js';
import type { SandboxView } from '../wire/schemas.js';
import { CladeError } from '../util/errors.js';
import type { ChildOutcome, CreateOptions, McpBackend, SandboxSummary } from './backend.js';

/**
 * The MCP tools on the public SDK: against a daemon (sandboxes outlive this
 * process and are shared with every other client of the daemon), or in this
 * process (sandboxes end when the MCP server ends).
 */
export class SdkBackend implements McpBackend {
  readonly where: string;
  private readonly mine = new Map<string, Sandbox>();
  private readonly client?: DaemonClient;

  constructor(private readonly daemon?: DaemonOptions & { daemon: string }) {
    this.where = daemon ? `in the clade daemon at ${daemon.daemon}` : 'in this MCP server\'s process; they end when it ends';
    if (daemon) this.client = new DaemonClient(parseDaemonAddress(daemon.daemon), daemon.token);
  }

  private opts(): DaemonOptions {
    return this.daemon ?? {};
  }

  private async sandbox(id: string): Promise<Sandbox> {
    const known = this.mine.get(id);
    if (known) return known;
    if (!this.daemon) throw new CladeError('not_found', `no sandbox ${JSON.stringify(id)} in this MCP server; list them with list_sandboxes`);
    const sb = await Sandbox.connect(id, this.opts());
    this.mine.set(id, sb);
    return sb;
  }

  private keep(sb: Sandbox): SandboxSummary {
    this.mine.set(sb.sandboxId, sb);
    const info = sb.getInfo();
    return { sandboxId: sb.sandboxId, ...(info.parentId ? { parentId: info.parentId } : {}), ...(info.snapshotTag ? { snapshotTag: info.snapshotTag } : {}), ...(sb.ports.length ? { ports: sb.ports } : {}) };
  }

  async create(opts: CreateOptions): Promise<SandboxSummary> {
    return this.keep(await Sandbox.create({ ...opts, ...this.opts() }));
  }

  async run(id: string, command: string, opts: { timeoutMs?: number; cwd?: string; env?: Record<string, string> }): Promise<CommandResult> {
    const sb = await this.sandbox(id);
    return sb.commands.run(command, { ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}), ...(opts.cwd ? { cwd: opts.cwd } : {}), ...(opts.env ? { envs: opts.env } : {}) });
  }

  async runCode(id: string, code: string, opts: { timeoutMs?: number }) {
    return (await this.sandbox(id)).runCode(code, opts);
  }

  async readFile(id: string, path: string, maxBytes: number): Promise<Uint8Array> {
    return (await this.sandbox(id)).files.read(path, { format: 'bytes', maxBytes });
  }

  async writeFile(id: string, path: string, data: Uint8Array): Promise<void> {
    await (await this.sandbox(id)).files.write(path, data);
  }

  async listFiles(id: string, path: string) {
    return (await this.sandbox(id)).files.list(path);
  }

  private outcomes(kids: (Sandbox | CladeError)[], timeoutMs: number | undefined): Promise<ChildOutcome[]> {
    return Promise.all(
      kids.map(async (k) => {
        if (k instanceof CladeError) return { error: `${k.code}: ${k.message}` };
        this.mine.set(k.sandboxId, k);
        if (timeoutMs !== undefined) await k.setTimeout(timeoutMs);
        return { sandboxId: k.sandboxId };
      }),
    );
  }

  async fork(id: string, count: number, timeoutMs?: number): Promise<ChildOutcome[]> {
    return this.outcomes(await (await this.sandbox(id)).fork(count), timeoutMs);
  }

  async snapshot(id: string, tag: string): Promise<{ tag: string; createdAt?: string }> {
    const info = await (await this.sandbox(id)).snapshot({ tag });
    return { tag: info.tag, createdAt: info.createdAt };
  }

  async fromSnapshot(tag: string, count: number, timeoutMs?: number): Promise<ChildOutcome[]> {
    return this.outcomes(await Sandbox.fromSnapshot(tag, { count, ...this.opts() }), timeoutMs);
  }

  async list(): Promise<SandboxSummary[]> {
    if (this.client) {
      const views = await this.client.json<SandboxView[]>('GET', '/v1/sandboxes');
      return views.map((v) => ({ sandboxId: v.sandboxId, ...(v.parentId ? { parentId: v.parentId } : {}), ...(v.snapshotTag ? { snapshotTag: v.snapshotTag } : {}), startedAt: v.startedAt, expiresAt: v.expiresAt }));
    }
    const alive: SandboxSummary[] = [];
    for (const sb of this.mine.values()) if (await sb.isRunning()) alive.push(this.keep(sb));
    return alive;
  }

  async kill(id: string): Promise<void> {
    const sb = await this.sandbox(id);
    await sb.kill();
    this.mine.delete(id);
  }

  /** In-process sandboxes end with the server; a daemon's are left to it. */
  async close(): Promise<void> {
    if (this.daemon) return;
    await Promise.all([...this.mine.values()].map((sb) => sb.kill().catch(() => undefined)));
    this.mine.clear();
  }
}
