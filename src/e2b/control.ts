import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { runCommand, type CommandResult } from '../core/commands.js';
import type { NetworkOptions } from '../core/manager.js';
import type { LiveSandbox } from '../core/sandbox.js';
import { listSnapshots, readSnapshotMeta, removeSnapshot, validateTag } from '../core/snapshots.js';
import { templateExists } from '../core/template-store.js';
import type { DaemonContext } from '../api/context.js';
import { CladeError } from '../util/errors.js';
import { MAX_FORK_COUNT } from '../util/limits.js';
import { ENVD_VERSION, type E2bSandbox, type E2bState } from './state.js';
import { e2bError, matchesMetadata, paginate, parseMetadataFilter, parseStates, secondsToMs } from './wire.js';

/** E2B's default lifetime of a sandbox whose request gives none. */
export const E2B_DEFAULT_TIMEOUT_MS = 300_000;
/** Templates the E2B clients ask for by default; clade serves them with its default image. */
const DEFAULT_TEMPLATES = new Set(['base', 'code-interpreter-v1', 'default']);
const NO_END = '9999-12-31T23:59:59.000Z';

type IdReq = { Params: { id: string } };
type Body = Record<string, unknown>;

/** The `Sandbox` object the clients read after create, connect and fork. */
function sandboxObject(live: LiveSandbox, e2b: E2bSandbox) {
  return {
    sandboxID: live.id,
    templateID: e2b.templateId,
    clientID: 'clade',
    envdVersion: ENVD_VERSION,
    envdAccessToken: e2b.envdAccessToken,
    trafficAccessToken: e2b.trafficAccessToken,
    domain: null,
  };
}

function listed(ctx: DaemonContext, state: E2bState, live: LiveSandbox) {
  const view = ctx.registry.view(live.id);
  const e2b = state.peek(live.id);
  return {
    sandboxID: live.id,
    templateID: e2b?.templateId ?? live.snapshotTag ?? 'base',
    clientID: 'clade',
    metadata: e2b?.metadata ?? {},
    envdVersion: ENVD_VERSION,
    startedAt: view.startedAt,
    endAt: view.expiresAt ?? NO_END,
    state: 'running' as const,
    cpuCount: live.shape.cpus,
    memoryMB: live.shape.memoryMiB,
    diskSizeMB: 0,
    volumeMounts: [],
  };
}

/** Fields of E2B's create request that clade cannot honour: each is refused with why, never ignored. */
export function refuseUnsupported(body: Body): void {
  const no = (what: string, why: string) => {
    throw new CladeError('bad_request', `${what} is not supported by clade: ${why}`);
  };
  if (body.mcp != null) no('mcp', 'clade runs no MCP gateway inside sandboxes; run `clade mcp` next to your agent instead');
  if (Array.isArray(body.volumeMounts) && body.volumeMounts.length > 0) no('volumeMounts', 'clade has no volumes; copy files in with files.write');
  if (body.autoPause === true) no('lifecycle.onTimeout: pause', 'clade sandboxes are killed at their timeout; take a snapshot (createSnapshot) to keep one');
  if ((body.autoResume as { enabled?: unknown } | undefined)?.enabled === true) no('lifecycle.autoResume', 'clade sandboxes cannot be paused');
  if (body.iam != null) no('iam', 'clade issues no workload identity tokens');
}

/** E2B's "all traffic" in a deny list. */
const ALL_TRAFFIC = '0.0.0.0/0';

/**
 * E2B's internet switch and egress lists as a clade network (docs/network.md),
 * or undefined for no network. clade's egress is an allow-list: E2B's
 * `allowInternetAccess: true` (or a network with no deny list) is egress
 * "all", a deny list of all traffic (or `allowInternetAccess: false`) with
 * `allowOut` is that list. Unlike E2B, a sandbox that asks for neither gets no
 * network at all. What cannot be expressed is refused, never approximated.
 */
export function networkFromE2b(body: Body): NetworkOptions | undefined {
  const internet = body.allow_internet_access;
  if (internet != null && typeof internet !== 'boolean') throw new CladeError('bad_request', 'allow_internet_access must be true or false');
  const net = body.network;
  if (net == null) return internet === true ? { egress: 'all' } : undefined;
  if (typeof net !== 'object' || Array.isArray(net)) throw new CladeError('bad_request', 'network must be an object');
  const { allowOut, denyOut, allowPublicTraffic, ...rest } = net as Record<string, unknown>;
  const other = Object.keys(rest).filter((k) => (rest as Record<string, unknown>)[k] != null);
  if (other.length) throw new CladeError('bad_request', `network.${other[0]} is not supported by clade: its sandbox networks take allowOut and denyOut (all traffic) only; see docs/e2b.md`);
  if (allowPublicTraffic === true) throw new CladeError('bad_request', 'network.allowPublicTraffic: true is not supported by clade: sandbox ports are reached on the host through clade\'s own network.ports (docs/network.md), never publicly');
  const list = (v: unknown, what: string): string[] => {
    if (v == null) return [];
    if (!Array.isArray(v) || !v.every((x) => typeof x === 'string')) throw new CladeError('bad_request', `network.${what} must be a list of strings`);
    return v as string[];
  };
  const allowed = list(allowOut, 'allowOut');
  const denied = list(denyOut, 'denyOut');
  if (denied.some((d) => d.trim() !== ALL_TRAFFIC)) {
    throw new CladeError('bad_request', `network.denyOut lists ${JSON.stringify(denied.find((d) => d.trim() !== ALL_TRAFFIC))}: clade's egress is an allow-list, so it denies all traffic ("${ALL_TRAFFIC}") or nothing; deny all and list what to allow in allowOut`);
  }
  const denyAll = denied.length > 0 || internet === false;
  if (!denyAll) return { egress: 'all' };
  return { egress: allowed.length ? allowed : 'none' };
}

/** A clade network as E2B's sandbox detail reports it. */
function e2bNetworkOf(live: LiveSandbox): { allowInternetAccess: boolean; network?: { allowOut?: string[]; denyOut: string[] } } {
  const net = live.shape.network;
  if (!net) return { allowInternetAccess: false };
  if (net.egress === 'all') return { allowInternetAccess: true, network: { denyOut: [] } };
  return { allowInternetAccess: false, network: { ...(net.egress === 'none' ? {} : { allowOut: net.egress }), denyOut: [ALL_TRAFFIC] } };
}

function stringMap(v: unknown, what: string): Record<string, string> {
  if (v == null) return {};
  if (typeof v !== 'object' || Array.isArray(v) || !Object.values(v).every((x) => typeof x === 'string')) throw new CladeError('bad_request', `${what} must be an object of strings`);
  if (Object.keys(v).length > 256) throw new CladeError('bad_request', `${what} has more than 256 entries`);
  return v as Record<string, string>;
}

function timeoutOf(body: Body, fallbackMs: number): number {
  return body.timeout === undefined || body.timeout === null ? fallbackMs : secondsToMs(body.timeout, 'timeout');
}

/**
 * A template is clade's default image, a clade template (`clade template
 * create`), a persistent snapshot's tag, or an image name, looked up in that
 * order. Templates and snapshots keep the network they were made with.
 */
async function startFromTemplate(ctx: DaemonContext, templateId: string, env: Record<string, string>, network: NetworkOptions | undefined): Promise<LiveSandbox> {
  const { manager } = ctx.registry;
  const withNetwork = network ? { network } : {};
  if (DEFAULT_TEMPLATES.has(templateId)) return ctx.metrics.time('create', () => manager.create({ env, ...withNetwork }));
  if (templateExists(templateId)) return ctx.metrics.time('create', () => manager.create({ template: templateId, env, ...withNetwork }));
  let isSnapshot = false;
  try {
    validateTag(templateId);
    readSnapshotMeta(templateId);
    isSnapshot = true;
  } catch {
    isSnapshot = false;
  }
  if (isSnapshot) {
    if (network) throw new CladeError('bad_request', `template ${JSON.stringify(templateId)} is a snapshot: its sandboxes keep the network it was taken with; leave allowInternetAccess and network out`);
    const [kid] = await ctx.forkGate.run(() => ctx.metrics.time('start', () => manager.fromSnapshot(templateId, { count: 1, env })));
    if (!kid || kid instanceof CladeError) throw kid ?? new CladeError('internal', `snapshot ${templateId} started no sandbox`);
    return kid;
  }
  try {
    return await ctx.metrics.time('create', () => manager.create({ image: templateId, env, ...withNetwork }));
  } catch (err) {
    if (err instanceof CladeError && err.code === 'not_found') throw new CladeError('not_found', `no template ${JSON.stringify(templateId)}: clade serves its templates (\`clade template ls\`), images (\`clade image ls\`) and snapshots (\`clade snapshot ls\`) as templates, and "base" as its default image`);
    throw err;
  }
}

/** The guest's memory, CPU and disk use, read from /proc and df in one command. */
async function guestMetrics(live: LiveSandbox) {
  const script = 'head -1 /proc/stat; sleep 0.2; head -1 /proc/stat; cat /proc/meminfo; df -k -P / | tail -1';
  const r = (await runCommand(live, script, { timeoutMs: 10_000 })) as CommandResult;
  return parseGuestMetrics(r.stdout, live.shape.cpus);
}

export function parseGuestMetrics(text: string, cpus: number) {
  const lines = text.split('\n');
  const cpuLines = lines.filter((l) => l.startsWith('cpu '));
  const ticks = (l: string | undefined) => (l ?? '').trim().split(/\s+/).slice(1).map(Number);
  const [a, b] = [ticks(cpuLines[0]), ticks(cpuLines[1])];
  const total = (t: number[]) => t.reduce((x, y) => x + (Number.isFinite(y) ? y : 0), 0);
  const idle = (t: number[]) => (t[3] ?? 0) + (t[4] ?? 0);
  const dt = total(b) - total(a);
  const cpuUsedPct = dt > 0 ? Math.round((1000 * (dt - (idle(b) - idle(a)))) / dt) / 10 : 0;
  const mem = (key: string) => Number(new RegExp(`^${key}:\\s+(\\d+)`, 'm').exec(text)?.[1] ?? 0) * 1024;
  const df = lines.filter((l) => l.trim()).pop()?.trim().split(/\s+/) ?? [];
  const now = new Date();
  return {
    timestamp: now.toISOString(),
    timestampUnix: Math.floor(now.getTime() / 1000),
    cpuUsedPct,
    cpuCount: cpus,
    memTotal: mem('MemTotal'),
    memUsed: mem('MemTotal') - mem('MemAvailable'),
    memCache: mem('Cached'),
    diskTotal: Number(df[1] ?? 0) * 1024,
    diskUsed: Number(df[2] ?? 0) * 1024,
  };
}

function snapshotItems() {
  return listSnapshots().map((m) => ({ key: m.tag, at: Date.parse(m.createdAt) || 0, sandboxId: m.sandboxId }));
}

/**
 * The E2B control plane over the daemon's registry: create (a template is an
 * image or a snapshot), list with metadata filters and paging, connect,
 * kill, timeouts, info, metrics, fork (clade's live fork, one entry per
 * child), snapshots. What clade does not have answers 501 with the reason.
 */
export function controlRoutes(app: FastifyInstance, ctx: DaemonContext, state: E2bState): void {
  const { registry } = ctx;
  const e2bOf = (id: string) => state.get(id);

  const create = async (req: FastifyRequest, reply: FastifyReply) => {
    const body = (req.body ?? {}) as Body;
    refuseUnsupported(body);
    const network = networkFromE2b(body);
    const templateId = typeof body.templateID === 'string' && body.templateID ? body.templateID : 'base';
    const metadata = stringMap(body.metadata, 'metadata');
    const env = stringMap(body.envVars, 'envVars');
    const timeoutMs = timeoutOf(body, E2B_DEFAULT_TIMEOUT_MS);
    req.raw.socket?.setTimeout(0); // a boot takes seconds under emulation; its own deadline bounds it
    const release = registry.reserve(1);
    try {
      const live = await startFromTemplate(ctx, templateId, env, network);
      registry.add(live, timeoutMs);
      const e2b = state.adopt(live.id, templateId, metadata);
      return reply.status(201).send(sandboxObject(live, e2b));
    } finally {
      release();
    }
  };
  app.post('/v2/sandboxes', create);
  app.post('/sandboxes', create);

  const list = async (req: FastifyRequest, reply: FastifyReply) => {
    const q = req.query as Record<string, string | string[] | undefined>;
    const one = (k: string) => (Array.isArray(q[k]) ? (q[k] as string[])[0] : (q[k] as string | undefined));
    const filter = parseMetadataFilter(one('metadata'));
    const states = parseStates(q.state);
    const template = one('template');
    const startedAfter = one('startedAfter') ? Date.parse(one('startedAfter')!) : undefined;
    if (startedAfter !== undefined && Number.isNaN(startedAfter)) throw new CladeError('bad_request', 'startedAfter must be an RFC 3339 time');
    const order = one('order');
    if (order !== undefined && order !== 'asc' && order !== 'desc') throw new CladeError('bad_request', 'order must be asc or desc');
    const limit = one('limit') !== undefined ? Number(one('limit')) : undefined;
    const rows = registry
      .list({})
      .map((v) => registry.get(v.sandboxId))
      .map((live) => listed(ctx, state, live))
      .filter((s) => (!states || states.has('running')) && matchesMetadata(s.metadata, filter) && (template === undefined || s.templateID === template) && (startedAfter === undefined || Date.parse(s.startedAt) > startedAfter));
    const { page, nextToken } = paginate(
      rows.map((r) => ({ ...r, key: r.sandboxID, at: Date.parse(r.startedAt) })),
      { ...(limit !== undefined ? { limit } : {}), ...(one('nextToken') ? { nextToken: one('nextToken')! } : {}), ...(order ? { order: order as 'asc' | 'desc' } : {}) },
    );
    if (nextToken) void reply.header('x-next-token', nextToken);
    return page.map(({ key: _k, at: _a, ...r }) => r);
  };
  app.get('/v2/sandboxes', list);
  app.get('/sandboxes', list);

  const connect = async (req: FastifyRequest<IdReq>, reply: FastifyReply) => {
    const { live, e2b } = e2bOf(req.params.id);
    const body = (req.body ?? {}) as Body;
    if (body.timeout != null) registry.setLifetime(live.id, timeoutOf(body, 0));
    return reply.status(200).send(sandboxObject(live, e2b));
  };
  app.post<IdReq>('/v2/sandboxes/:id/connect', connect);
  app.post<IdReq>('/sandboxes/:id/connect', connect);

  app.get<IdReq>('/sandboxes/:id', async (req) => {
    const { live } = e2bOf(req.params.id);
    return { ...listed(ctx, state, live), domain: null, ...e2bNetworkOf(live), lifecycle: { onTimeout: 'kill', autoResume: false } };
  });

  app.delete<IdReq>('/sandboxes/:id', async (req, reply) => {
    registry.get(req.params.id);
    state.forget(req.params.id);
    await registry.remove(req.params.id);
    return reply.status(204).send();
  });

  app.post<IdReq>('/sandboxes/:id/timeout', async (req, reply) => {
    const { live } = e2bOf(req.params.id);
    const body = (req.body ?? {}) as Body;
    if (body.timeout === undefined) throw new CladeError('bad_request', 'timeout (seconds) is required');
    registry.setLifetime(live.id, timeoutOf(body, 0));
    return reply.status(204).send();
  });

  app.get<IdReq>('/sandboxes/:id/metrics', async (req) => {
    const { live } = e2bOf(req.params.id);
    return [await guestMetrics(live)];
  });

  app.post<IdReq>('/sandboxes/:id/fork', async (req, reply) => {
    const { live: parent, e2b } = e2bOf(req.params.id);
    const body = (req.body ?? {}) as Body;
    const count = body.count ?? 1;
    if (typeof count !== 'number' || !Number.isInteger(count) || count < 1 || count > MAX_FORK_COUNT) throw new CladeError('bad_request', `count must be an integer from 1 to ${MAX_FORK_COUNT}`);
    const timeoutMs = timeoutOf(body, E2B_DEFAULT_TIMEOUT_MS);
    req.raw.socket?.setTimeout(0);
    const release = registry.reserve(count);
    try {
      const { children } = await ctx.forkGate.runKeyed(parent.id, () => ctx.metrics.time('fork', () => registry.manager.fork(parent, count)));
      registry.persist(parent.id);
      const results = children.map((kid) => {
        if (kid instanceof CladeError) return { error: e2bError(kid).body };
        registry.add(kid, timeoutMs);
        return { sandbox: sandboxObject(kid, state.inherit(kid.id, e2b)) };
      });
      return reply.status(201).send(results);
    } finally {
      release();
    }
  });

  app.post<IdReq>('/sandboxes/:id/snapshots', async (req, reply) => {
    const { live } = e2bOf(req.params.id);
    const body = (req.body ?? {}) as Body;
    const tag = typeof body.name === 'string' && body.name ? body.name : `${live.id}-${Date.now().toString(36)}`;
    validateTag(tag);
    req.raw.socket?.setTimeout(0);
    await registry.exclusive(live.id, () => ctx.forkGate.run(() => ctx.metrics.time('snapshot', () => registry.manager.snapshot(live, tag))));
    registry.persist(live.id);
    return reply.status(201).send({ snapshotID: tag, names: [tag] });
  });

  app.get('/snapshots', async (req, reply) => {
    const q = req.query as Record<string, string | undefined>;
    const rows = snapshotItems().filter((s) => (!q.sandboxID || s.sandboxId === q.sandboxID) && (!q.name || s.key === q.name));
    const { page, nextToken } = paginate(rows, { ...(q.limit ? { limit: Number(q.limit) } : {}), ...(q.nextToken ? { nextToken: q.nextToken } : {}) });
    if (nextToken) void reply.header('x-next-token', nextToken);
    return page.map((s) => ({ snapshotID: s.key, names: [s.key] }));
  });

  app.delete<IdReq>('/templates/:id', async (req, reply) => {
    validateTag(req.params.id);
    removeSnapshot(req.params.id);
    return reply.status(204).send();
  });

  const unsupported = (what: string, why: string) => async () => {
    throw Object.assign(new Error(`${what} is not supported by clade: ${why}`), { statusCode: 501 });
  };
  app.post('/sandboxes/:id/pause', unsupported('pause', 'clade sandboxes keep running until killed; take a snapshot (createSnapshot) and start from it instead'));
  app.post('/sandboxes/:id/resume', unsupported('resume', 'clade sandboxes cannot be paused'));
  app.post('/v2/sandboxes/:id/resume', unsupported('resume', 'clade sandboxes cannot be paused'));
  app.put('/sandboxes/:id/network', unsupported('updateNetwork', 'a clade sandbox keeps the network it was created with; create one with the allow-list you need (allowOut with denyOut ["0.0.0.0/0"])'));
  app.post('/templates', unsupported('template builds', 'build images with `clade image build`, or snapshot a warmed sandbox'));
  app.post('/v2/templates', unsupported('template builds', 'build images with `clade image build`, or snapshot a warmed sandbox'));
  app.post('/v3/templates', unsupported('template builds', 'build images with `clade image build`, or snapshot a warmed sandbox'));
}

