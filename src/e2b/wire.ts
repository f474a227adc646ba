import { createHash, timingSafeEqual } from 'node:crypto';
import { CladeError, errorMessage } from '../util/errors.js';
import { STATUS_OF } from '../wire/errors.js';

// Pieces of the E2B wire that need no sandbox: error bodies, list filters and
// paging, file-URL signatures. Kept apart so they are tested without a VM.

/** E2B's control-plane and file error body: the HTTP status again as a number, and a message. */
export type E2bErrorBody = { code: number; message: string };

export function e2bError(err: unknown): { status: number; body: E2bErrorBody } {
  if (err instanceof CladeError) {
    // A guest out of space is E2B's 507, which its client turns into NotEnoughSpaceError.
    const status = err.agentCode === 'no_space' ? 507 : STATUS_OF[err.code];
    return { status, body: { code: status, message: err.message } };
  }
  const fe = err as { statusCode?: number; validation?: unknown; message?: string };
  if (fe.validation) return { status: 400, body: { code: 400, message: `invalid request: ${fe.message}` } };
  if (fe.statusCode && fe.statusCode >= 400 && fe.statusCode < 600) return { status: fe.statusCode, body: { code: fe.statusCode, message: errorMessage(err) } };
  return { status: 500, body: { code: 500, message: errorMessage(err) } };
}

/**
 * The `metadata` list filter as the E2B client sends it: `k=v&k2=v2` with
 * keys and values URI-encoded once more before the whole is put in the query
 * (so after the query's own decoding, a value still needs one decode).
 */
export function parseMetadataFilter(raw: string | undefined): Record<string, string> {
  if (raw === undefined || raw === '') return {};
  if (raw.length > 16 * 1024) throw new CladeError('bad_request', 'the metadata filter is longer than 16 KiB');
  const out: Record<string, string> = {};
  for (const [k, v] of new URLSearchParams(raw)) {
    try {
      out[decodeURIComponent(k)] = decodeURIComponent(v);
    } catch {
      throw new CladeError('bad_request', `the metadata filter has a malformed escape in ${JSON.stringify(k)}`);
    }
  }
  return out;
}

export function matchesMetadata(metadata: Record<string, string>, filter: Record<string, string>): boolean {
  return Object.entries(filter).every(([k, v]) => metadata[k] === v);
}

/** `running,paused` or repeated parameters, as a set of states. */
export function parseStates(raw: string | string[] | undefined): Set<string> | undefined {
  if (raw === undefined) return undefined;
  const parts = (Array.isArray(raw) ? raw : [raw]).flatMap((s) => s.split(',')).map((s) => s.trim()).filter(Boolean);
  for (const s of parts) if (s !== 'running' && s !== 'paused') throw new CladeError('bad_request', `unknown sandbox state ${JSON.stringify(s)}: use running or paused`);
  return parts.length ? new Set(parts) : undefined;
}

export type PageItem = { key: string; at: number };

/**
 * One page of `items` (sorted by time, then key; `order` desc reverses it),
 * starting after the item the token names. The token is opaque to clients:
 * the position of the last item given, so a page stays right while items
 * come and go.
 */
export function paginate<T extends PageItem>(items: T[], opts: { limit?: number; nextToken?: string; order?: 'asc' | 'desc' }): { page: T[]; nextToken?: string } {
  const limit = opts.limit ?? 100;
  if (!Number.isInteger(limit) || limit < 1 || limit > 1000) throw new CladeError('bad_request', `limit must be an integer from 1 to 1000, got ${opts.limit}`);
  const dir = opts.order === 'desc' ? -1 : 1;
  const cmp = (a: PageItem, b: PageItem) => dir * (a.at - b.at || (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  const sorted = [...items].sort(cmp);
  let start = 0;
  if (opts.nextToken) {
    const after = decodeToken(opts.nextToken);
    start = sorted.findIndex((i) => cmp(i, after) > 0);
    if (start < 0) start = sorted.length;
  }
  const page = sorted.slice(start, start + limit);
  const last = page[page.length - 1];
  return { page, ...(start + limit < sorted.length && last ? { nextToken: encodeToken(last) } : {}) };
}

function encodeToken(item: PageItem): string {
  return Buffer.from(JSON.stringify([item.at, item.key])).toString('base64url');
}

function decodeToken(token: string): PageItem {
  try {
    const [at, key] = JSON.parse(Buffer.from(token, 'base64url').toString('utf8')) as unknown[];
    if (typeof at === 'number' && typeof key === 'string') return { at, key };
  } catch {
    // fall through
  }
  throw new CladeError('bad_request', 'nextToken is not one this server gave out; start again without it');
}

/**
 * Checks a file URL's signature as the E2B client makes it (`uploadUrl`,
 * `downloadUrl`): `v1_` + base64 of SHA-256 over
 * `<path>:<read|write>:<user>:<token>[:<expiry>]`, padding removed; an expiry
 * in the past fails.
 */
export function signatureValid(q: { path: string; operation: 'read' | 'write'; user: string; signature: string; expiration?: string }, token: string, nowS = Math.floor(Date.now() / 1000)): boolean {
  let raw = `${q.path}:${q.operation}:${q.user}:${token}`;
  if (q.expiration !== undefined) {
    if (!/^\d{1,12}$/.test(q.expiration) || Number(q.expiration) < nowS) return false;
    raw += `:${q.expiration}`;
  }
  const expected = 'v1_' + createHash('sha256').update(raw).digest('base64').replace(/=+$/, '');
  return constantTimeEqual(q.signature, expected);
}

/** String comparison whose time says nothing about where the strings differ. */
export function constantTimeEqual(given: string, expected: string): boolean {
  const a = createHash('sha256').update(given).digest();
  const b = createHash('sha256').update(expected).digest();
  return timingSafeEqual(a, b) && given.length > 0;
}

/** Seconds from the wire as milliseconds, checked. */
export function secondsToMs(seconds: unknown, what: string): number {
  if (typeof seconds !== 'number' || !Number.isInteger(seconds) || seconds < 0 || seconds > 365 * 86_400) throw new CladeError('bad_request', `${what} must be a whole number of seconds from 0 to one year, got ${JSON.stringify(seconds)}`);
  return seconds * 1000;
}
