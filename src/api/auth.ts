import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { closeSync, existsSync, openSync, readFileSync, writeSync } from 'node:fs';
import { CladeError } from '../util/errors.js';

/** Reads the daemon's bearer token, creating it (mode 0600) on first start. */
export function loadOrCreateToken(path: string): string {
  if (!existsSync(path)) {
    try {
      const fd = openSync(path, 'wx', 0o600);
      writeSync(fd, randomBytes(32).toString('hex') + '\n');
      closeSync(fd);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
  }
  const token = readFileSync(path, 'utf8').trim();
  if (token.length < 32) throw new CladeError('auth', `the token file ${path} holds no usable token; delete it and restart \`clade serve\` to make a new one`);
  return token;
}

/** Compares a request's `Authorization: Bearer …` with the token in constant time. */
export function bearerMatches(header: string | undefined, token: string): boolean {
  const given = /^Bearer (.+)$/.exec(header ?? '')?.[1] ?? '';
  // Hashing first makes both sides the same length, so the comparison time says nothing about the token.
  return timingSafeEqual(sha256(given), sha256(token)) && given.length > 0;
}

function sha256(s: string): Buffer {
  return createHash('sha256').update(s).digest();
}
