import type { FileEntry } from '../core/files.js';
import type { CodeResult, RunCodeOptions } from '../core/interpreter.js';
import { CladeError, type CladeErrorCode } from '../util/errors.js';
import type { SandboxView } from '../wire/schemas.js';
import type { SandboxBackend, SandboxInfo, SnapshotInfo } from './backend.js';
import type { CommandHandle, CommandOptions, CommandResult, CommandRunner } from './commands.js';
import { DaemonClient, parseDaemonAddress } from './daemon-client.js';
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

/** A sandbox that a daemon runs, driven over its HTTP API. The daemon keeps its lifetime. */
export class RemoteBackend implements SandboxBackend {
  readonly commands: CommandRunner = { run: (cmd, opts) => this.run(cmd, opts) };
  readonly files: FileOps;
  private snapshotTag?: string;

  constructor(
    private readonly client: DaemonClient,
    readonly view: SandboxView,
  ) {
    const at = (path: string) => `${this.path('/files')}?path=${encodeURIComponent(path)}`;
    this.files = {
      // The daemon passes maxBytes to the guest, which refuses a bigger file before sending any of it.
      readFile: (path, maxBytes) => client.bytes('GET', `${at(path)}&maxBytes=${maxBytes}`, undefined, maxBytes),
      readStream: (path, maxBytes) => client.stream('GET', maxBytes === undefined ? at(path) : `${at(path)}&maxBytes=${maxBytes}`),
      writeFile: (path, data) => client.upload('PUT', at(path), data),
      list: async (path) => ({ entries: (await client.json<WireEntry[]>('GET', `${this.path('/files/list')}?path=${encodeURIComponent(path)}`)).map(fromWire) }),
      stat: async (path) => fromWire(await client.json<WireEntry>('GET', `${this.path('/files/stat')}?path=${encodeURIComponent(path)}`)),
      mkdir: async (path) => (await client.json<{ created: boolean }>('POST', this.path('/files/mkdir'), { path })).created,
      remove: (path) => client.json('DELETE', at(path)),
    };
  }

  static async create(client: DaemonClient, body: Record<string, unknown>): Promise<RemoteBackend> {
    return new RemoteBackend(client, await client.json<SandboxView>('POST', '/v1/sandboxes', body));
  }

  static async start(client: DaemonClient, tag: string, body: { count: number; env?: Record<string, string> }): Promise<(RemoteBackend | CladeError)[]> {
    return RemoteBackend.children(client, await client.json<ChildResult[]>('POST', `/v1/snapshots/${encodeURIComponent(tag)}/start`, body));
  }

  static async connect(client: DaemonClient, sandboxId: string): Promise<RemoteBackend> {
    return new RemoteBackend(client, await client.json<SandboxView>('GET', `/v1/sandboxes/${encodeURIComponent(sandboxId)}`));
  }

  get id(): string {
    return this.view.sandboxId;
  }

  async fork(count: number): Promise<{ children: (RemoteBackend | CladeError)[] }> {
    return { children: await RemoteBackend.children(this.client, await this.client.json<ChildResult[]>('POST', this.path('/fork'), { count })) };
  }

  async snapshot(tag: string): Promise<{ info: SnapshotInfo }> {
    const info = await this.client.json<SnapshotInfo>('POST', this.path('/snapshot'), { tag });
    this.snapshotTag = tag;
    return { info };
  }

  /** As the daemon described the sandbox when this handle was made (boot time is not reported: 0). */
  info(): SandboxInfo {
    const v = this.view;
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
      ports: (v.ports ?? []).map((p) => ({ ...p })),
    };
  }

  /** With output callbacks, the daemon streams the output as the code prints it. */
  async runCode(code: string, opts: RunCodeOptions): Promise<CodeResult> {
    const body = { code, ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}) };
    if (!opts.onStdout && !opts.onStderr) return this.client.json<CodeResult>('POST', this.path('/code'), body);
    let result: CodeResult | undefined;
    let failure: CladeError | undefined;
    await this.client.ndjson('POST', this.path('/code'), body, (line) => {
      if (typeof line.stdout === 'string') opts.onStdout?.(line.stdout);
      else if (typeof line.stderr === 'string') opts.onStderr?.(line.stderr);
      else if (line.result) result = line.result as CodeResult;
      else if (line.error) failure = wireError(line.error);
    });
    if (failure) throw failure;
    if (!result) throw new CladeError('unavailable', 'the daemon ended the runCode stream before the code finished (was it stopped?)');
    return result;
  }

  async setTimeout(timeoutMs: number): Promise<void> {
    await this.client.json('PATCH', this.path(), { timeoutMs });
  }

  async prewarmForks(size: number): Promise<void> {
    await this.client.json('POST', this.path('/prewarm'), { size });
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

  private async run(cmd: string | string[], opts: CommandOptions): Promise<CommandResult | CommandHandle> {
    if (opts.stdin instanceof Uint8Array) throw new CladeError('bad_request', 'through the daemon, stdin must be a string (or true, with background, to keep it open)');
    if (opts.stdin === true && !opts.background) throw new CladeError('bad_request', 'stdin: true keeps stdin open for sendStdin, which needs background: true');
    const body = {
      cmd,
      ...(opts.envs ? { envs: opts.envs } : {}),
      ...(opts.cwd ? { cwd: opts.cwd } : {}),
      ...(opts.timeoutMs !== undefined ? { timeoutMs: opts.timeoutMs } : {}),
      ...(opts.stdin !== undefined && opts.stdin !== false ? { stdin: opts.stdin } : {}),
    };
    if (opts.background) return RemoteCommandHandle.start(this.client, this.path(), body, opts);
    if (!opts.onStdout && !opts.onStderr) return this.client.json<CommandResult>('POST', this.path('/exec'), body);
    return this.streamed(body, opts);
  }

  /** Streams the command's output to the callbacks as NDJSON arrives, and collects it for the result. */
  private streamed(body: object, opts: CommandOptions): Promise<CommandResult> {
    return readCommandStream(this.client, 'POST', this.path('/exec'), body, opts, { stdout: '', stderr: '' });
  }

  private path(suffix = ''): string {
    return `/v1/sandboxes/${this.id}${suffix}`;
  }

  private static async children(client: DaemonClient, results: ChildResult[]): Promise<(RemoteBackend | CladeError)[]> {
    return Promise.all(
      results.map(async (r) => ('error' in r ? new CladeError(r.error.code, r.error.message) : RemoteBackend.connect(client, r.sandboxId))),
    );
  }
}

function wireError(e: unknown): CladeError {
  const { code, message } = e as { code: CladeErrorCode; message: string };
  return new CladeError(code, message);
}

type CommandView = { commandId: string; pid: number };

/**
 * A background command the daemon runs: it keeps running (and its output is
 * kept) whatever happens to this process. The handle follows its output
 * stream, so `stdout`, `stderr` and the callbacks are current.
 */
class RemoteCommandHandle implements CommandHandle {
  private readonly output = { stdout: '', stderr: '' };
  private readonly result: Promise<CommandResult>;

  private constructor(
    private readonly client: DaemonClient,
    private readonly base: string,
    private readonly view: CommandView,
    opts: CommandOptions,
  ) {
    this.result = this.follow(opts);
    this.result.catch(() => undefined);
  }

  static async start(client: DaemonClient, sandboxPath: string, body: object, opts: CommandOptions): Promise<RemoteCommandHandle> {
    const view = await client.json<CommandView>('POST', `${sandboxPath}/exec`, { ...body, background: true });
    return new RemoteCommandHandle(client, `${sandboxPath}/commands/${encodeURIComponent(view.commandId)}`, view, opts);
  }

  get pid(): number {
    return this.view.pid;
  }

  get stdout(): string {
    return this.output.stdout;
  }

  get stderr(): string {
    return this.output.stderr;
  }

  wait(): Promise<CommandResult> {
    return this.result;
  }

  async sendStdin(data: string | Uint8Array): Promise<void> {
    await this.client.json('POST', `${this.base}/stdin`, { data: typeof data === 'string' ? data : Buffer.from(data).toString('utf8') });
  }

  async closeStdin(): Promise<void> {
    await this.client.json('POST', `${this.base}/stdin`, { close: true });
  }

  async kill(signal = 9): Promise<boolean> {
    return (await this.client.json<{ delivered: boolean }>('POST', `${this.base}/signal`, { signal })).delivered;
  }

  private follow(opts: CommandOptions): Promise<CommandResult> {
    return readCommandStream(this.client, 'GET', `${this.base}/output`, undefined, opts, this.output);
  }
}

/**
 * Reads a command's NDJSON stream (`{"stdout"}`, `{"stderr"}`, then `{"exit"}`
 * or `{"error"}`): output goes to the callbacks as it arrives and is collected
 * in `output`, which the caller may read while it grows.
 */
async function readCommandStream(client: DaemonClient, method: string, path: string, body: object | undefined, opts: CommandOptions, output: { stdout: string; stderr: string }): Promise<CommandResult> {
  let exit: Omit<CommandResult, 'stdout' | 'stderr'> | undefined;
  let failure: CladeError | undefined;
  await client.ndjson(method, path, body, (line) => {
    if (typeof line.stdout === 'string') (output.stdout += line.stdout, opts.onStdout?.(line.stdout));
    else if (typeof line.stderr === 'string') (output.stderr += line.stderr, opts.onStderr?.(line.stderr));
    else if (line.exit) exit = line.exit as typeof exit;
    else if (line.error) failure = wireError(line.error);
  });
  if (failure) throw failure;
  if (!exit) throw new CladeError('unavailable', 'the daemon ended the command stream before the command ended (was it stopped?)');
  return { ...exit, stdout: output.stdout, stderr: output.stderr };
}

function fromWire(e: WireEntry): FileEntry {
  return { name: e.name, type: e.type, size: e.size, mode: e.mode, mtimeMs: Date.parse(e.modifiedTime) };
}
