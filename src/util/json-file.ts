import { closeSync, constants, fstatSync, openSync, readSync } from 'node:fs';
import type { Static, TSchema } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import { errorMessage } from './errors.js';

/** Records clade keeps (manifests, templates, snapshot metadata) are a few KiB; a larger file is not one of them. */
const RECORD_MAX_BYTES = 1 << 20;

/**
 * Reads a small file without following a link at its name or blocking on a
 * FIFO put there, and refuses one larger than `maxBytes`.
 */
export function readFileNoFollow(path: string, maxBytes: number): string {
  const fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  try {
    if (!fstatSync(fd).isFile()) throw new Error('not a regular file');
    const buf = Buffer.alloc(maxBytes + 1);
    let n = 0;
    for (;;) {
      const got = readSync(fd, buf, n, buf.length - n, null);
      if (got === 0) break;
      n += got;
      if (n > maxBytes) throw new Error(`larger than ${maxBytes} bytes`);
    }
    return buf.toString('utf8', 0, n);
  } finally {
    closeSync(fd);
  }
}

/**
 * A JSON record read back from disk and checked against its schema like a
 * request: the value, or what is wrong with it (for an error that also says
 * what to do about it).
 */
export function readCheckedJson<T extends TSchema>(path: string, schema: T): { value: Static<T> } | { problem: string } {
  let raw: unknown;
  try {
    raw = JSON.parse(readFileNoFollow(path, RECORD_MAX_BYTES));
  } catch (err) {
    return { problem: errorMessage(err) };
  }
  if (Value.Check(schema, raw)) return { value: raw };
  const first = [...Value.Errors(schema, raw)][0];
  return { problem: first ? `${first.path || '/'}: ${first.message}` : 'not the expected shape' };
}
