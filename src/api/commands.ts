import { CladeError } from '../util/errors.js';
import type { CommandHandle, CommandResult } from '../core/commands.js';
import { toErrorBody, type ErrorBody } from './errors.js';

/** Output of one background command the daemon keeps for clients that attach later (UTF-16 units). */
const MAX_REPLAY_CHARS = 8 * 1024 * 1024;
/** Kept lines grow by merging up to this size. */
const MERGE_BELOW_CHARS = 64 * 1024;
/** Background commands per sandbox, running or ended and not yet deleted (the agent runs at most 64). */
const MAX_COMMANDS_PER_SANDBOX = 64;
/** Ended commands kept per sandbox for late readers; older ones are forgotten first. */
const MAX_ENDED_PER_SANDBOX = 16;

export type OutputLine = { stdout: string } | { stderr: string } | { exit: ExitView } | { error: ErrorBody } | { truncated: number };
export type ExitView = { exitCode: number; timedOut?: boolean; signal?: number };
export type CommandView = { commandId: string; pid: number; cmd: string | string[]; startedAt: string; running: boolean; exit?: ExitView };

/**
 * A background command that outlives the request that started it: its output
 * is kept (bounded) so a client can attach, detach and attach again, and every
 * attached client sees output as it arrives.
 */
export class BackgroundCommand {
  private readonly lines: OutputLine[] = [];
  private chars = 0;
  private dropped = 0;
  private readonly followers = new Set<(line: OutputLine) => void>();
  private ended?: OutputLine;
  readonly startedAt = new Date();
  handle?: CommandHandle;

  constructor(
    readonly commandId: string,
    readonly cmd: string | string[],
  ) {}

  get running(): boolean {
    return this.ended === undefined;
  }

  view(): CommandView {
    const exit = this.ended && 'exit' in this.ended ? { exit: this.ended.exit } : {};
    return { commandId: this.commandId, pid: this.handle?.pid ?? 0, cmd: this.cmd, startedAt: this.startedAt.toISOString(), running: this.running, ...exit };
  }

  /** Output callbacks for the command's handle. */
  readonly onStdout = (d: string): void => this.push({ stdout: d });
  readonly onStderr = (d: string): void => this.push({ stderr: d });

  /** Records how the command ended, from its handle's result. */
  watch(handle: CommandHandle): void {
    this.handle = handle;
    handle.wait().then(
      (r: CommandResult) => this.end({ exit: { exitCode: r.exitCode, ...(r.timedOut ? { timedOut: true } : {}), ...(r.signal ? { signal: r.signal } : {}) } }),
      (err: unknown) => this.end({ error: toErrorBody(err).body }),
    );
  }

  /** Replays what is kept, then calls `send` with each new line; returns how to stop following. */
  follow(send: (line: OutputLine) => void, done: () => void): () => void {
    if (this.dropped > 0) send({ truncated: this.dropped });
    for (const line of this.lines) send(line);
    if (this.ended) {
      send(this.ended);
      done();
      return () => undefined;
    }
    const follower = (line: OutputLine) => {
      send(line);
      if (line === this.ended) done();
    };
    this.followers.add(follower);
    return () => this.followers.delete(follower);
  }

  private push(line: OutputLine): void {
    const size = 'stdout' in line ? line.stdout.length : 'stderr' in line ? line.stderr.length : 0;
    this.keep(line, size);
    while (this.chars > MAX_REPLAY_CHARS && this.lines.length > 1) {
      const old = this.lines.shift()!;
      const n = 'stdout' in old ? old.stdout.length : 'stderr' in old ? old.stderr.length : 0;
      this.chars -= n;
      this.dropped += n;
    }
    for (const f of this.followers) f(line);
  }

  /** Small pieces of one stream are merged into the previous line, so a byte-at-a-time command keeps few objects. */
  private keep(line: OutputLine, size: number): void {
    const last = this.lines[this.lines.length - 1];
    if (last && 'stdout' in line && 'stdout' in last && last.stdout.length < MERGE_BELOW_CHARS) last.stdout += line.stdout;
    else if (last && 'stderr' in line && 'stderr' in last && last.stderr.length < MERGE_BELOW_CHARS) last.stderr += line.stderr;
    else this.lines.push({ ...line });
    this.chars += size;
  }

  private end(line: OutputLine): void {
    this.ended = line;
    for (const f of [...this.followers]) f(line);
    this.followers.clear();
  }
}

/** The daemon's background commands, by sandbox. */
export class CommandTable {
  private readonly bySandbox = new Map<string, Map<string, BackgroundCommand>>();
  private counter = 0;

  /** Makes room for a new command of `sandboxId` (forgetting old ended ones) and registers it. */
  add(sandboxId: string, cmd: string | string[]): BackgroundCommand {
    const table = this.bySandbox.get(sandboxId) ?? new Map<string, BackgroundCommand>();
    const ended = [...table.values()].filter((c) => !c.running);
    for (const old of ended.slice(0, Math.max(0, ended.length - MAX_ENDED_PER_SANDBOX + 1))) table.delete(old.commandId);
    if (table.size >= MAX_COMMANDS_PER_SANDBOX) {
      throw new CladeError('unavailable', `sandbox ${sandboxId} already has ${table.size} background commands; kill or delete some (DELETE /v1/sandboxes/${sandboxId}/commands/<id>)`);
    }
    const command = new BackgroundCommand(`cmd-${(++this.counter).toString(36)}-${Date.now().toString(36)}`, cmd);
    table.set(command.commandId, command);
    this.bySandbox.set(sandboxId, table);
    return command;
  }

  get(sandboxId: string, commandId: string): BackgroundCommand {
    const command = this.bySandbox.get(sandboxId)?.get(commandId);
    if (!command) throw new CladeError('not_found', `sandbox ${sandboxId} has no background command ${JSON.stringify(commandId)}; list them with GET /v1/sandboxes/${sandboxId}/commands`);
    return command;
  }

  list(sandboxId: string): CommandView[] {
    return [...(this.bySandbox.get(sandboxId)?.values() ?? [])].map((c) => c.view());
  }

  delete(sandboxId: string, commandId: string): void {
    this.bySandbox.get(sandboxId)?.delete(commandId);
  }

  /** Forgets a sandbox's commands (it was deleted; its VM, and so the commands, are gone). */
  dropSandbox(sandboxId: string): void {
    this.bySandbox.delete(sandboxId);
  }
}
