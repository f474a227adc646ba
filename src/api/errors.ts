import type { FastifyError, FastifyReply, FastifyRequest } from 'fastify';
import { CladeError, errorMessage } from '../util/errors.js';

import { STATUS_OF, type ErrorBody } from '../wire/errors.js';

export { STATUS_OF, type ErrorBody } from '../wire/errors.js';

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
