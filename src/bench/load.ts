import type { DaemonClient } from '../sdk/daemon-client.js';
import type { SandboxView } from '../wire/schemas.js';
import { CladeError } from '../util/errors.js';
import { saveBenchResult, summarize, type Summary } from './stats.js';

export type LoadMode = 'fork' | 'create';
export type LoadOptions = { client: DaemonClient; clients: number; seconds: number; mode: LoadMode };

type Phase = 'acquire' | 'exec' | 'delete' | 'iteration';

export type LoadResult = {
  benchmark: 'load';
  date: string;
  mode: LoadMode;
  clients: number;
  seconds: number;
  /** Iterations (acquire, exec, delete) that completed. */
  iterations: number;
  /** Failed iterations by error code; `unavailable` is the daemon's limits refusing work. */
  errors: Record<string, number>;
  latencyMs: Record<Phase, Summary>;
  jsonPath?: string;
};

export const LOAD_LIMITS = { clients: 200, seconds: 600 } as const;
/** A refused client waits this long before trying again, so refusals do not spin. */
const BACKOFF_MS = 200;

/**
 * `clients` concurrent loops against a daemon for `seconds`: each takes a
 * sandbox (a fork of one warm parent, or a fresh boot), runs a command in it
 * and deletes it.
 */
export async function benchLoad(o: LoadOptions): Promise<LoadResult> {
  checkBounds(o);
  const times: Record<Phase, number[]> = { acquire: [], exec: [], delete: [], iteration: [] };
  const errors: Record<string, number> = {};
  const parent = o.mode === 'fork' ? await o.client.json<SandboxView>('POST', '/v1/sandboxes', { timeoutMs: (o.seconds + 120) * 1000 }) : undefined;
  const deadline = Date.now() + o.seconds * 1000;
  try {
    await Promise.all(Array.from({ length: o.clients }, () => clientLoop(o, parent?.sandboxId, deadline, times, errors)));
  } finally {
    if (parent) await o.client.json('DELETE', `/v1/sandboxes/${parent.sandboxId}`).catch(() => undefined);
  }
  const result: LoadResult = {
    benchmark: 'load',
    date: new Date().toISOString(),
    mode: o.mode,
    clients: o.clients,
    seconds: o.seconds,
    iterations: times.iteration.length,
    errors,
    latencyMs: { acquire: summarize(times.acquire), exec: summarize(times.exec), delete: summarize(times.delete), iteration: summarize(times.iteration) },
  };
  return saveBenchResult(result);
}

function checkBounds(o: LoadOptions): void {
  if (!Number.isInteger(o.clients) || o.clients < 1 || o.clients > LOAD_LIMITS.clients) throw new CladeError('bad_request', `--clients must be from 1 to ${LOAD_LIMITS.clients}`);
  if (!Number.isInteger(o.seconds) || o.seconds < 1 || o.seconds > LOAD_LIMITS.seconds) throw new CladeError('bad_request', `--seconds must be from 1 to ${LOAD_LIMITS.seconds}`);
}

async function clientLoop(o: LoadOptions, parentId: string | undefined, deadline: number, times: Record<Phase, number[]>, errors: Record<string, number>): Promise<void> {
  while (Date.now() < deadline) {
    const t0 = performance.now();
    let id: string | undefined;
    try {
      id = await acquire(o.client, parentId);
      const t1 = performance.now();
      const r = await o.client.json<{ exitCode: number; stdout: string }>('POST', `/v1/sandboxes/${id}/exec`, { cmd: 'echo ok' });
      if (r.stdout !== 'ok\n') throw new CladeError('internal', `unexpected output ${JSON.stringify(r.stdout)}`);
      const t2 = performance.now();
      await o.client.json('DELETE', `/v1/sandboxes/${id}`);
      id = undefined;
      const t3 = performance.now();
      times.acquire.push(t1 - t0);
      times.exec.push(t2 - t1);
      times.delete.push(t3 - t2);
      times.iteration.push(t3 - t0);
    } catch (err) {
      const code = err instanceof CladeError ? err.code : 'internal';
      errors[code] = (errors[code] ?? 0) + 1;
      if (id) await o.client.json('DELETE', `/v1/sandboxes/${id}`).catch(() => undefined);
      await new Promise((r) => setTimeout(r, BACKOFF_MS));
    }
  }
}

async function acquire(client: DaemonClient, parentId: string | undefined): Promise<string> {
  if (!parentId) return (await client.json<SandboxView>('POST', '/v1/sandboxes', {})).sandboxId;
  const [kid] = await client.json<({ sandboxId: string } | { error: { code: string; message: string } })[]>('POST', `/v1/sandboxes/${parentId}/fork`, { count: 1 });
  if (!kid || 'error' in kid) throw new CladeError('internal', kid ? kid.error.message : 'fork returned no child');
  return kid.sandboxId;
}
