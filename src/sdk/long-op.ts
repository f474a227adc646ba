import { CladeError, type CladeErrorCode } from '../util/errors.js';
import type { ProgressEvent } from '../util/progress.js';
import type { DaemonClient } from './daemon-client.js';

/**
 * A long daemon operation (image build, template creation) streamed as NDJSON:
 * `{ progress }` lines as it goes, then one `{ result }` or `{ error }` line.
 */
export async function longOperation<T>(client: DaemonClient, path: string, body: Record<string, unknown>, onProgress?: (e: ProgressEvent) => void): Promise<T> {
  let result: T | undefined;
  let error: CladeError | undefined;
  await client.ndjson('POST', path, body, (line) => {
    if (line.progress) onProgress?.(line.progress as ProgressEvent);
    else if (line.error) {
      const e = line.error as { code: CladeErrorCode; message: string };
      error = new CladeError(e.code, e.message);
    } else if ('result' in line) result = line.result as T;
  });
  if (error) throw error;
  if (result === undefined) throw new CladeError('unavailable', `the daemon ended ${path} without a result; see its log`);
  return result;
}
