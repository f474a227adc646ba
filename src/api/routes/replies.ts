import type { FastifyRequest } from 'fastify';
import type { LiveSandbox } from '../../core/sandbox.js';
import type { SnapshotMeta } from '../../core/snapshots.js';
import { CladeError } from '../../util/errors.js';
import { toErrorBody } from '../errors.js';

// Small pieces of answers that several route files share.

export function childResult(kid: LiveSandbox | CladeError, add: (sb: LiveSandbox) => string): { sandboxId: string } | { error: { code: string; message: string } } {
  if (kid instanceof CladeError) return { error: toErrorBody(kid).body };
  return { sandboxId: add(kid) };
}

/**
 * A JSON answer that waits on the guest (a long command, a big fork) sends
 * nothing until it is ready: the connection's idle timeout is lifted for it,
 * and the operation's own deadline bounds it instead.
 */
export function allowLongWait(req: FastifyRequest): void {
  req.raw.socket?.setTimeout(0);
}

/** A snapshot's metadata without the agent token, which only the host may hold. */
export function publicSnapshot(meta: Omit<SnapshotMeta, 'agent' | 'hmac'> & { agent?: unknown; hmac?: unknown }): Omit<SnapshotMeta, 'agent' | 'hmac'> {
  const { agent: _secret, hmac: _mac, ...rest } = meta;
  return rest;
}
