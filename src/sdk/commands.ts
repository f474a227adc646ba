import type { CommandHandle, CommandOptions, CommandResult } from '../core/commands.js';
import { CladeError } from '../util/errors.js';

export type { CommandHandle, CommandOptions, CommandResult } from '../core/commands.js';

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
    if (Array.isArray(cmd) ? cmd.length === 0 : typeof cmd !== 'string' || cmd.trim() === '') throw new CladeError('bad_request', 'the command is empty');
    return this.runner.run(cmd, opts);
  }
}
