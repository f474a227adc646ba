import { DaemonClient, parseDaemonAddress } from '../sdk/daemon-client.js';
import { daemonPaths, socketAnswers } from '../api/server.js';
import type { SandboxView } from '../wire/schemas.js';
import { CladeError, type CladeErrorCode } from '../util/errors.js';
import type { SnapshotMeta } from '../core/snapshots.js';
import { emit, table } from './output.js';

type ChildResult = { sandboxId: string } | { error: { code: string; message: string } };

/** The daemon named by CLADE_DAEMON (and CLADE_TOKEN), else the one on this clade home's socket, if it answers. */
export async function findDaemon(): Promise<DaemonClient | undefined> {
  const address = process.env.CLADE_DAEMON;
  if (address) return new DaemonClient(parseDaemonAddress(address), process.env.CLADE_TOKEN);
  const socketPath = daemonPaths.socket();
  return (await socketAnswers(socketPath)) ? new DaemonClient({ socketPath }) : undefined;
}

async function requireDaemon(what: string): Promise<DaemonClient> {
  const client = await findDaemon();
  if (!client) throw new CladeError('unavailable', `\`clade ${what}\` works through the daemon, and none answers on ${daemonPaths.socket()}: start one with \`clade serve\` (or set CLADE_DAEMON)`);
  return client;
}

export async function psAction(json: boolean): Promise<void> {
  const list = await (await requireDaemon('ps')).json<SandboxView[]>('GET', '/v1/sandboxes');
  emit(json, list, () =>
    list.length === 0
      ? 'no sandboxes; create one with `clade run` or POST /v1/sandboxes'
      : table([['SANDBOX', 'PARENT', 'SNAPSHOT', 'MEMORY', 'PID', 'STARTED', 'EXPIRES', 'PORTS'], ...list.map((s) => [s.sandboxId, s.parentId ?? '-', s.snapshotTag ?? '-', `${s.memoryMiB} MiB`, String(s.pid), s.startedAt, s.expiresAt ?? 'never', s.ports?.length ? s.ports.map((p) => `${p.port}->${p.host}`).join(',') : '-'])]),
  );
}

export async function forkAction(json: boolean, id: string, opts: { count: number }): Promise<number> {
  const kids = await (await requireDaemon('fork')).json<ChildResult[]>('POST', `/v1/sandboxes/${encodeURIComponent(id)}/fork`, { count: opts.count });
  emit(json, kids, () => kids.map((k) => ('sandboxId' in k ? k.sandboxId : `error: ${k.error.code}: ${k.error.message}`)).join('\n'));
  return kids.some((k) => 'error' in k) ? 1 : 0;
}

export async function snapshotSandboxAction(json: boolean, id: string | undefined, opts: { tag?: string }): Promise<void> {
  if (!id || !opts.tag) throw new CladeError('bad_request', 'usage: clade snapshot <sandbox-id> --tag <tag> (or a subcommand: create, ls, inspect, rm)');
  const meta = await (await requireDaemon('snapshot')).json<Omit<SnapshotMeta, 'agent'>>('POST', `/v1/sandboxes/${encodeURIComponent(id)}/snapshot`, { tag: opts.tag });
  emit(json, meta, () => `snapshot ${meta.tag} of ${id}, parent ${meta.parent ?? '-'}`);
}

export type RunRequest = { argv: string[]; fromSnapshot?: string; create: Record<string, unknown>; env: Record<string, string>; timeoutMs: number; json: boolean };

/** `clade run` through a daemon: create (or start from a snapshot), run with streamed output, delete. */
export async function runViaDaemon(client: DaemonClient, r: RunRequest): Promise<number> {
  const id = r.fromSnapshot ? await startFromSnapshot(client, r.fromSnapshot, r.env) : (await client.json<SandboxView>('POST', '/v1/sandboxes', { ...r.create, env: r.env })).sandboxId;
  try {
    const body = { cmd: r.argv.length === 1 ? r.argv[0]! : r.argv, timeoutMs: r.timeoutMs };
    if (r.json) {
      const res = await client.json<{ exitCode: number }>('POST', `/v1/sandboxes/${id}/exec`, body);
      emit(true, { sandboxId: id, ...res }, () => '');
      return res.exitCode;
    }
    let exitCode = 1;
    await client.ndjson('POST', `/v1/sandboxes/${id}/exec`, body, (line) => {
      if (typeof line.stdout === 'string') process.stdout.write(line.stdout);
      else if (typeof line.stderr === 'string') process.stderr.write(line.stderr);
      else if (line.exit) exitCode = (line.exit as { exitCode: number }).exitCode;
      else if (line.error) throw new CladeError('internal', (line.error as { message: string }).message);
    });
    return exitCode;
  } finally {
    await client.json('DELETE', `/v1/sandboxes/${id}`).catch(() => undefined);
  }
}

async function startFromSnapshot(client: DaemonClient, tag: string, env: Record<string, string>): Promise<string> {
  const [first] = await client.json<ChildResult[]>('POST', `/v1/snapshots/${encodeURIComponent(tag)}/start`, { count: 1, env });
  if (!first) throw new CladeError('internal', 'the daemon started no sandbox');
  if ('error' in first) throw new CladeError(first.error.code as CladeErrorCode, first.error.message);
  return first.sandboxId;
}
