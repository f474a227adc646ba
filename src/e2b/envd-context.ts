import { Code, ConnectError, createContextKey, type HandlerContext } from '@connectrpc/connect';
import type { LiveSandbox } from '../core/sandbox.js';
import { CladeError, errorMessage } from '../util/errors.js';
import type { PacedQueue } from './paced.js';
import type { E2bSandbox } from './state.js';

/** The sandbox a Connect call is for, resolved and authorized before the handler runs (server.ts). */
export type EnvdTarget = { live: LiveSandbox; e2b: E2bSandbox };

export const TARGET = createContextKey<EnvdTarget | undefined>(undefined, { description: 'the sandbox of this envd call' });

export function targetOf(ctx: HandlerContext): EnvdTarget {
  const target = ctx.values.get(TARGET);
  if (!target) throw new ConnectError('no sandbox: send the E2b-Sandbox-Id header', Code.NotFound);
  return target;
}

/**
 * clade runs every command as root. A call for the default user (no
 * Authorization header) or for root runs; one for another user is refused
 * rather than run as someone else.
 */
export function checkUser(ctx: HandlerContext): void {
  const user = userFromBasicAuth(ctx.requestHeader.get('authorization'));
  if (user !== undefined && user !== '' && user !== 'root') {
    throw new ConnectError(`clade sandboxes run everything as root; user ${JSON.stringify(user)} is not supported (leave \`user\` unset or pass 'root')`, Code.InvalidArgument);
  }
}

/** The user name of `Authorization: Basic base64("<user>:")`, as the E2B clients send it. */
export function userFromBasicAuth(header: string | null | undefined): string | undefined {
  const m = /^Basic\s+([A-Za-z0-9+/=]+)$/i.exec(header ?? '');
  if (!m) return undefined;
  const decoded = Buffer.from(m[1]!, 'base64').toString('utf8');
  const colon = decoded.indexOf(':');
  return colon < 0 ? decoded : decoded.slice(0, colon);
}

/** A clade error as the Connect error the E2B clients turn into their own error types. */
export function toConnectError(err: unknown): ConnectError {
  if (err instanceof ConnectError) return err;
  if (!(err instanceof CladeError)) return new ConnectError(errorMessage(err), Code.Internal);
  switch (err.code) {
    case 'not_found':
      return new ConnectError(err.message, Code.NotFound);
    case 'bad_request':
      return new ConnectError(err.message, Code.InvalidArgument);
    case 'auth':
      return new ConnectError(err.message, Code.Unauthenticated);
    case 'conflict':
      return new ConnectError(err.message, Code.AlreadyExists);
    case 'timeout':
      return new ConnectError(err.message, Code.DeadlineExceeded);
    case 'killed':
      return new ConnectError(err.message, Code.Unavailable);
    case 'unavailable':
      return new ConnectError(err.message, Code.ResourceExhausted);
    case 'too_large':
      return new ConnectError(err.message, Code.FailedPrecondition);
    case 'agent_error':
      if (err.agentCode === 'permission') return new ConnectError(err.message, Code.PermissionDenied);
      if (err.agentCode === 'exists') return new ConnectError(err.message, Code.AlreadyExists);
      return new ConnectError(err.message, Code.InvalidArgument);
    default:
      return new ConnectError(err.message, Code.Internal);
  }
}

/** Runs a handler body with clade errors turned into Connect errors. */
export async function connectErrors<T>(fn: () => Promise<T>): Promise<T> {
  try {
    return await fn();
  } catch (err) {
    throw toConnectError(err);
  }
}

/** The keep-alive period a stream's client asked for (`Keepalive-Ping-Interval`, seconds), within bounds. */
export function keepAliveMs(ctx: HandlerContext): number {
  const asked = Number(ctx.requestHeader.get('keepalive-ping-interval'));
  const seconds = Number.isFinite(asked) && asked > 0 ? asked : 50;
  return Math.min(Math.max(seconds, 1), 300) * 1000;
}

/**
 * What a queue gives one server stream, paced for the client: each item, and
 * `{ idle: true }` for each keep-alive period without one. Ends with the
 * queue; a failed queue or a client that went away throws a Connect error.
 */
export async function* pacedStream<T>(queue: PacedQueue<T>, ctx: HandlerContext): AsyncGenerator<{ idle: true } | { idle: false; value: T }> {
  const idle = keepAliveMs(ctx);
  for (;;) {
    const next = await queue.next(idle, ctx.signal).catch((err: unknown) => {
      throw toConnectError(err);
    });
    if (ctx.signal.aborted) throw ConnectError.from(ctx.signal.reason);
    if (next.kind === 'end') return;
    yield next.kind === 'idle' ? { idle: true } : { idle: false, value: next.value };
  }
}
