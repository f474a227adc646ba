import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { CladeError, errorMessage, type CladeErrorCode } from '../util/errors.js';

/** The one place where clade error codes become HTTP statuses (and back, in the client). */
export const STATUS_OF: Record<CladeErrorCode, number> = {
  bad_request: 400,
  auth: 401,
  not_found: 404,
  conflict: 409,
  killed: 410,
  too_large: 413,
  agent_error: 422,
  internal: 500,
  integrity: 500,
  boot_failed: 500,
  protocol_error: 502,
  unavailable: 503,
  timeout: 504,
};

export type ErrorBody = { code: CladeErrorCode; message: string };

/** Turns anything a handler throws (ours, fastify's validation and body errors) into `{ code, message }`. */
export function toErrorBody(err: unknown): { status: number; body: ErrorBody } {
  if (err instanceof CladeError) return { status: STATUS_OF[err.code], body: { code: err.code, message: err.message } };
  const fe = err as Partial<FastifyError>;
  if (fe.validation) return { status: 400, body: { code: 'bad_request', message: `invalid request: ${fe.message}` } };
  if (fe.statusCode === 413) return { status: 413, body: { code: 'too_large', message: `the request body is larger than this route accepts (${fe.message})` } };
  if (fe.statusCode && fe.statusCode >= 400 && fe.statusCode < 500) return { status: fe.statusCode, body: { code: 'bad_request', message: errorMessage(err) } };
  return { status: 500, body: { code: 'internal', message: errorMessage(err) } };
}

export function errorHandler(err: unknown, req: FastifyRequest, reply: FastifyReply): void {
  const { status, body } = toErrorBody(err);
  // A refusal by the daemon's limits is routine under load; anything else at 5xx is a failure worth a stack.
  if (status === 503) req.log.warn(body.message);
  else if (status >= 500) req.log.error({ err }, body.message);
  void reply.status(status).send(body);
}
