import type { CladeErrorCode } from '../util/errors.js';

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
