import type { ExecExit, ExecHandle } from '../agent-protocol/client.js';
import { CladeError } from '../util/errors.js';
import type { AgentClient } from '../agent-protocol/client.js';
import { MAX_CAPTURE_BYTES, OutputCapture } from './capture.js';

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
  /** The output's bytes as they arrive, undecoded (binary output, or a client that wants bytes). */
  onStdoutBytes?: (data: Buffer) => void;
  onStderrBytes?: (data: Buffer) => void;
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
    private readonly capture: { stdout: OutputCapture; stderr: OutputCapture },
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

/** What a command needs of its sandbox. */
export type CommandHost = { readonly id: string; readonly agent: AgentClient; readonly env: Record<string, string>; readonly alive: boolean };

/**
 * Runs a command in a sandbox through its agent: a string goes to
 * `/bin/sh -c`, an array is an argv run directly. Resolves with the result,
 * or with a handle once it has started (`background`).
 */
export async function runCommand(host: CommandHost, cmd: string | string[], opts: CommandOptions = {}): Promise<CommandResult | CommandHandle> {
  if (Array.isArray(cmd) ? cmd.length === 0 : typeof cmd !== 'string' || cmd.trim() === '') throw new CladeError('bad_request', 'the command is empty');
  if (!host.alive) throw new CladeError('killed', `sandbox ${host.id} is not running`);
  const limit = opts.captureOutput === false ? 0 : MAX_CAPTURE_BYTES;
  const out = new OutputCapture(limit, opts.onStdout);
  const err = new OutputCapture(limit, opts.onStderr);
  const keepStdin = opts.stdin !== undefined && opts.stdin !== false;
  const handle = await host.agent.exec(
    {
      ...(Array.isArray(cmd) ? { argv: cmd } : { shell: cmd }),
      env: { ...host.env, ...(opts.envs ?? {}) },
      ...(opts.cwd !== undefined ? { cwd: opts.cwd } : {}),
      timeoutMs: opts.timeoutMs ?? DEFAULT_TIMEOUT_MS,
      stdin: keepStdin,
    },
    {
      onStdout: (d) => (out.push(d), opts.onStdoutBytes?.(d)),
      onStderr: (d) => (err.push(d), opts.onStderrBytes?.(d)),
    },
  );
  if (typeof opts.stdin === 'string' || opts.stdin instanceof Uint8Array) {
    handle.writeStdin(Buffer.from(opts.stdin));
    handle.closeStdin();
  }
  const cmdHandle = new AgentCommandHandle(handle, { stdout: out, stderr: err });
  return opts.background ? cmdHandle : cmdHandle.wait();
}
