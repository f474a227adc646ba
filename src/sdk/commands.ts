import type { ExecExit, ExecHandle } from '../agent-protocol/client.js';
import { CladeError } from '../util/errors.js';
import type { LiveSandbox } from '../core/sandboxes.js';

export type CommandResult = {
  exitCode: number;
  stdout: string;
  stderr: string;
  /** Set when the command was killed because it ran past `timeoutMs`. */
  timedOut?: boolean;
  /** The signal that ended the command, if one did. */
  signal?: number;
  /** Bytes of output left out of `stdout`/`stderr` because they passed the 16 MiB each keeps (the callbacks saw them). */
  truncated?: { stdout: number; stderr: number };
};

export type CommandOptions = {
  onStdout?: (data: string) => void;
  onStderr?: (data: string) => void;
  cwd?: string;
  envs?: Record<string, string>;
  /** Kill the command after this long (default 60 s; 0 = never). */
  timeoutMs?: number;
  /** Data for the command's stdin; with `background`, `stdin: true` keeps it open for `sendStdin`. */
  stdin?: string | Uint8Array | boolean;
  background?: boolean;
  /**
   * Keep output for the result and the handle's `stdout`/`stderr` (default
   * true). False for commands that print without end: only the callbacks see it.
   */
  captureOutput?: boolean;
};

const DEFAULT_TIMEOUT_MS = 60_000;
/** Output kept per stream in a CommandResult; the streaming callbacks see all of it. */
export const MAX_CAPTURE_BYTES = 16 * 1024 * 1024;

/** A command running in the background, in this process's sandbox or in a daemon's. */
export interface CommandHandle {
  /** The command's process id in the guest. */
  readonly pid: number;
  /** Output so far. */
  readonly stdout: string;
  readonly stderr: string;
  /** Waits for the command to end and returns its result. */
  wait(): Promise<CommandResult>;
  /** Writes to the command's stdin (started with `stdin: true`). */
  sendStdin(data: string | Uint8Array): Promise<void>;
  closeStdin(): Promise<void>;
  /** Signals the command's process group (default SIGKILL); resolves false if it had already ended. */
  kill(signal?: number): Promise<boolean>;
}

/** A background command of a sandbox in this process, through its agent. */
class AgentCommandHandle implements CommandHandle {
  private readonly result: Promise<CommandResult>;

  constructor(
    private readonly handle: ExecHandle,
    private readonly capture: { stdout: Capture; stderr: Capture },
  ) {
    this.result = handle.exited.then((exit: ExecExit) => {
      const dropped = { stdout: capture.stdout.dropped, stderr: capture.stderr.dropped };
      return {
        exitCode: exit.exitCode,
        stdout: capture.stdout.text(),
        stderr: capture.stderr.text(),
        ...(exit.timedOut ? { timedOut: true } : {}),
        ...(exit.signal ? { signal: exit.signal } : {}),
        ...(dropped.stdout || dropped.stderr ? { truncated: dropped } : {}),
      };
    });
    this.result.catch(() => undefined);
  }

  /** Output so far. */
  get stdout(): string {
    return this.capture.stdout.text();
  }

  get stderr(): string {
    return this.capture.stderr.text();
  }

  get pid(): number {
    return this.handle.pid;
  }

  /** Waits for the command to end and returns its result. */
  wait(): Promise<CommandResult> {
    return this.result;
  }

  async sendStdin(data: string | Uint8Array): Promise<void> {
    this.handle.writeStdin(Buffer.from(data));
  }

  async closeStdin(): Promise<void> {
    this.handle.closeStdin();
  }

  async kill(signal = 9): Promise<boolean> {
    try {
      await this.handle.signal(signal);
      return true;
    } catch (err) {
      if (err instanceof CladeError && err.code === 'not_found') return false;
      throw err;
    }
  }
}

/** How commands reach a sandbox: its agent in this process, or a daemon over HTTP. */
export interface CommandRunner {
  run(cmd: string | string[], opts: CommandOptions): Promise<CommandResult | CommandHandle>;
}

export class Commands {
  constructor(private readonly runner: CommandRunner) {}

  /**
   * Runs a command: a string goes to `/bin/sh -c`, an array is an argv run
   * directly. Resolves with the exit code and output; a non-zero exit code is a
   * result, not an error. With `background: true`, resolves with a handle once
   * the command has started.
   */
  run(cmd: string | string[], opts: CommandOptions & { background: true }): Promise<CommandHandle>;
  run(cmd: string | string[], opts?: CommandOptions & { background?: false }): Promise<CommandResult>;
  async run(cmd: string | string[], opts: CommandOptions = {}): Promise<CommandResult | CommandHandle> {
    if (Array.isArray(cmd) ? cmd.length === 0 : cmd.trim() === '') throw new CladeError('bad_request', 'the command is empty');
    return this.runner.run(cmd, opts);
  }
}

/** Commands through the sandbox's agent, in this process. */
export class AgentCommands implements CommandRunner {
  constructor(private readonly live: LiveSandbox) {}

  async run(cmd: string | string[], opts: CommandOptions): Promise<CommandResult | CommandHandle> {
    if (!this.live.alive) throw new CladeError('killed', `sandbox ${this.live.id} is not running`);
    const limit = opts.captureOutput === false ? 0 : MAX_CAPTURE_BYTES;
    const out = new Capture(limit, opts.onStdout);
    const err = new Capture(limit, opts.onStderr);
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const keepStdin = opts.stdin !== undefined && opts.stdin !== false;
    const handle = await this.live.agent.exec(
      {
        ...(Array.isArray(cmd) ? { argv: cmd } : { shell: cmd }),
        env: { ...this.live.env, ...(opts.envs ?? {}) },
        ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
        timeoutMs,
        stdin: keepStdin,
      },
      { onStdout: (d) => out.push(d), onStderr: (d) => err.push(d) },
    );
    if (typeof opts.stdin === 'string' || opts.stdin instanceof Uint8Array) {
      handle.writeStdin(Buffer.from(opts.stdin));
      handle.closeStdin();
    }
    const cmdHandle = new AgentCommandHandle(handle, { stdout: out, stderr: err });
    if (opts.background) return cmdHandle;
    return cmdHandle.wait();
  }
}

/**
 * Collects a stream's output up to `limit` bytes in one growing buffer, so a
 * guest that writes a byte at a time costs no more than one that writes
 * megabytes at once, and decodes UTF-8 across chunk boundaries for the callback.
 */
export class Capture {
  private buf = Buffer.alloc(0);
  private used = 0;
  /** Bytes past the limit, seen by the callback but not kept. */
  dropped = 0;
  private readonly decoder = new TextDecoder('utf-8');

  constructor(
    private readonly limit: number,
    private readonly onData?: (s: string) => void,
  ) {}

  push(d: Buffer): void {
    const take = Math.min(d.length, this.limit - this.used);
    if (take > 0) {
      if (this.used + take > this.buf.length) {
        const grown = Buffer.allocUnsafe(Math.min(this.limit, Math.max(this.used + take, this.buf.length * 2, 4096)));
        this.buf.copy(grown, 0, 0, this.used);
        this.buf = grown;
      }
      d.copy(this.buf, this.used, 0, take);
      this.used += take;
    }
    if (this.limit > 0) this.dropped += d.length - Math.max(take, 0);
    if (this.onData) {
      const text = this.decoder.decode(d, { stream: true });
      if (text) this.onData(text);
    }
  }

  text(): string {
    return this.buf.toString('utf8', 0, this.used);
  }
}
