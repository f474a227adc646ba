import { DaemonClient, parseDaemonAddress } from '../api/client.js';
import type { SandboxView } from '../api/registry.js';
import type { FileEntry } from '../agent-protocol/client.js';
import { CladeError, type CladeErrorCode } from '../core/errors.js';
import type { CodeResult, RunCodeOptions } from '../core/interpreter.js';
import type { SnapshotMeta } from '../core/snapshots.js';
import type { CommandOptions, CommandResult, CommandRunner } from './commands.js';
import type { FileOps } from './files.js';

export type DaemonOptions = {
  /** A clade daemon to run the sandbox in: `unix:///path/daemon.sock` or `http://host:port` (default: CLADE_DAEMON). */
  daemon?: string;
  /** Bearer token for a TCP daemon (default: CLADE_TOKEN). */
  token?: string;
};

/** The daemon the options or CLADE_DAEMON name; undefined means sandboxes run in this process. */
export function daemonClient(opts: DaemonOptions): DaemonClient | undefined {
  const address = opts.daemon ?? process.env.CLADE_DAEMON;
  if (!address) return undefined;
  const token = opts.token ?? process.env.CLADE_TOKEN;
  return new DaemonClient(parseDaemonAddress(address), token);
}

type ChildResult = { sandboxId: string } | { error: { code: CladeErrorCode; message: string } };
type WireEntry = { name: string; type: FileEntry['type']; size: number; mode: number; modifiedTime: string };

/** A sandbox that a daemon runs, driven over its HTTP API. */
export class RemoteSandbox {
  readonly commands: CommandRunner = { run: (cmd, opts) => this.run(cmd, opts) };
  readonly files: FileOps;

  constructor(
    private readonly client: DaemonClient,
    readonly view: SandboxView,
  ) {
    const at = (path: string) => `${this.path('/files')}?path=${encodeURIComponent(path)}`;
    this.files = {
      readFile: (path) => client.bytes('GET', at(path)),
      writeFile: (path, data) => client.json('PUT', at(path), data),
      list: async (path) => ({ entries: (await client.json<WireEntry[]>('GET', `${this.path('/files/list')}?path=${encodeURIComponent(path)}`)).map(fromWire) }),
      stat: async (path) => fromWire(await client.json<WireEntry>('GET', `${this.path('/files/stat')}?path=${encodeURIComponent(path)}`)),
      mkdir: async (path) => (await client.json<{ created: boolean }>('POST', this.path('/files/mkdir'), { path })).created,
      remove: (path) => client.json('DELETE', at(path)),
    };
  }

  static async create(client: DaemonClient, body: Record<string, unknown>): Promise<RemoteSandbox> {
    return new RemoteSandbox(client, await client.json<SandboxView>('POST', '/v1/sandboxes', body));
  }

  static async start(client: DaemonClient, tag: string, body: { count: number; env?: Record<string, string> }): Promise<(RemoteSandbox | CladeError)[]> {
    return RemoteSandbox.children(client, await client.json<ChildResult[]>('POST', `/v1/snapshots/${encodeURIComponent(tag)}/start`, body));
  }

  static async connect(client: DaemonClient, sandboxId: string): Promise<RemoteSandbox> {
    return new RemoteSandbox(client, await client.json<SandboxView>('GET', `/v1/sandboxes/${encodeURIComponent(sandboxId)}`));
  }

  get id(): string {
    return this.view.sandboxId;
  }

  async fork(count: number): Promise<(RemoteSandbox | CladeError)[]> {
    return RemoteSandbox.children(this.client, await this.client.json<ChildResult[]>('POST', this.path('/fork'), { count }));
  }

  snapshot(tag: string): Promise<Omit<SnapshotMeta, 'agent'>> {
    return this.client.json('POST', this.path('/snapshot'), { tag });
  }

  /** The daemon runs the code in one request, so output reaches the callbacks when it ends. */
  async runCode(code: string, opts: RunCodeOptions): Promise<CodeResult> {
    const r = await this.client.json<CodeResult>('POST', this.path('/code'), { code, ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}) });
    if (r.stdout) opts.onStdout?.(r.stdout);
    if (r.stderr) opts.onStderr?.(r.stderr);
    return r;
  }

  async isRunning(): Promise<boolean> {
    return this.client.json('GET', this.path()).then(
      () => true,
      (err: unknown) => (err instanceof CladeError && err.code === 'not_found' ? false : Promise.reject(err)),
    );
  }

  async kill(): Promise<void> {
    await this.client.json('DELETE', this.path()).catch((err: unknown) => {
      if (!(err instanceof CladeError && err.code === 'not_found')) throw err;
    });
  }

  private async run(cmd: string | string[], opts: CommandOptions): Promise<CommandResult> {
    if (opts.background) throw new CladeError('unavailable', 'background commands are not available through the daemon; run the command in the foreground (onStdout/onStderr still stream)');
    if (opts.stdin !== undefined && typeof opts.stdin !== 'string') throw new CladeError('bad_request', 'through the daemon, stdin must be a string');
    const body = { cmd, ...(opts.envs ? { envs: opts.envs } : {}), ...(opts.cwd ? { cwd: opts.cwd } : {}), ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}), ...(opts.stdin !== undefined ? { stdin: opts.stdin } : {}) };
    if (!opts.onStdout && !opts.onStderr) return this.client.json<CommandResult>('POST', this.path('/exec'), body);
    return this.streamed(body, opts);
  }

  /** Streams the command's output to the callbacks as NDJSON arrives, and collects it for the result. */
  private async streamed(body: object, opts: CommandOptions): Promise<CommandResult> {
    let stdout = '';
    let stderr = '';
    let exit: Omit<CommandResult, 'stdout' | 'stderr'> | undefined;
    let failure: CladeError | undefined;
    await this.client.ndjson('POST', this.path('/exec'), body, (line) => {
      if (typeof line.stdout === 'string') (stdout += line.stdout, opts.onStdout?.(line.stdout));
      else if (typeof line.stderr === 'string') (stderr += line.stderr, opts.onStderr?.(line.stderr));
      else if (line.exit) exit = line.exit as typeof exit;
      else if (line.error) failure = new CladeError((line.error as { code: CladeErrorCode }).code, (line.error as { message: string }).message);
    });
    if (failure) throw failure;
    if (!exit) throw new CladeError('unavailable', 'the daemon ended the command stream before the command ended (was it stopped?)');
    return { ...exit, stdout, stderr };
  }

  private path(suffix = ''): string {
    return `/v1/sandboxes/${this.id}${suffix}`;
  }

  private static async children(client: DaemonClient, results: ChildResult[]): Promise<(RemoteSandbox | CladeError)[]> {
    return Promise.all(
      results.map(async (r) => ('error' in r ? new CladeError(r.error.code, r.error.message) : RemoteSandbox.connect(client, r.sandboxId))),
    );
  }
}

function fromWire(e: WireEntry): FileEntry {
  return { name: e.name, type: e.type, size: e.size, mode: e.mode, mtimeMs: Date.parse(e.modifiedTime) };
}
