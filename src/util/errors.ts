/**
 * Every error clade raises is a CladeError: a stable `code` a program can switch
 * on, and a message that tells a person what happened and what to do next.
 */
export type CladeErrorCode =
  | 'not_found'
  | 'bad_request'
  | 'conflict'
  | 'timeout'
  | 'boot_failed'
  | 'agent_error'
  | 'protocol_error'
  | 'auth'
  | 'too_large'
  | 'unavailable'
  | 'killed'
  | 'integrity'
  | 'internal';

export class CladeError extends Error {
  readonly code: CladeErrorCode;
  /** The agent's own error code (`not_found`, `permission`...), when the guest raised it. */
  readonly agentCode?: string;

  constructor(code: CladeErrorCode, message: string, options?: { cause?: unknown; agentCode?: string }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'CladeError';
    this.code = code;
    if (options?.agentCode !== undefined) this.agentCode = options.agentCode;
  }
}

export function errorMessage(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}

/** Any thrown value as a CladeError: itself if it is one, else an `internal` error that says what was being done. */
export function asCladeError(err: unknown, what: string): CladeError {
  return err instanceof CladeError ? err : new CladeError('internal', `${what}: ${errorMessage(err)}`, { cause: err });
}
