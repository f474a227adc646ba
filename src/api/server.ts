import { randomUUID } from 'node:crypto';
import { chmodSync, existsSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import fastifySwagger from '@fastify/swagger';
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from 'fastify';
import { pino, type Logger } from 'pino';
import { CladeError } from '../util/errors.js';
import { cladeHome, ensurePrivateDir } from '../util/home.js';
import { defaultManager, keepSandboxesOnExit } from '../core/default.js';
import type { SandboxManager } from '../core/manager.js';
import { bearerMatches, loadOrCreateToken } from './auth.js';
import { ConcurrencyGate, type DaemonContext } from './context.js';
import { errorHandler } from './errors.js';
import { Metrics } from './metrics.js';
import { SandboxRegistry } from './registry.js';
import { commandRoutes } from './routes/commands.js';
import { environmentRoutes } from './routes/environments.js';
import { fileRoutes } from './routes/files.js';
import { sandboxRoutes } from './routes/sandboxes.js';
import { snapshotRoutes } from './routes/snapshots.js';
import { systemRoutes } from './routes/system.js';
import { StateStore } from './state.js';

export const API_VERSION = '0.1.0';
/** JSON bodies (commands, code, stdin) are bounded; file uploads have their own larger limit. */
export const JSON_BODY_LIMIT = 8 * 1024 * 1024;
/** How long a SIGTERM waits for requests in flight (long commands, streams) before cutting them. */
const SHUTDOWN_GRACE_MS = 10_000;
/**
 * Connection limits: a request (headers and body) must arrive within
 * REQUEST_TIMEOUT_MS, a connection with no traffic either way for
 * IDLE_TIMEOUT_MS is closed (NDJSON streams send a blank keep-alive line
 * meanwhile; a JSON request waiting on a long command lifts it for its own
 * duration), and at most `maxConnections` are open per listener.
 */
const REQUEST_TIMEOUT_MS = 30 * 60_000;
const HEADERS_TIMEOUT_MS = 30_000;
const IDLE_TIMEOUT_MS = 10 * 60_000;
const KEEP_ALIVE_TIMEOUT_MS = 60_000;
/** A fork or snapshot holds one of the daemon's slots at most this long, even if its sandbox is stuck. */
const GATE_HOLD_LIMIT_MS = 15 * 60_000;
const ORPHAN_SWEEP_MS = 30_000;

export const daemonPaths = {
  socket: () => join(cladeHome(), 'daemon.sock'),
  token: () => join(cladeHome(), 'daemon.token'),
  state: () => join(cladeHome(), 'daemon'),
};

export type ServeOptions = {
  socketPath: string;
  /** TCP listener (bearer token required), e.g. { host: '127.0.0.1', port: 7070 }. */
  tcp?: { host: string; port: number };
  tokenFile: string;
  stateDir: string;
  maxSandboxes: number;
  maxConcurrentForks: number;
  defaultTimeoutMs: number;
  /** Kill every sandbox on shutdown instead of leaving them for the next daemon. */
  stopOnExit: boolean;
  logLevel: string;
  /** Open connections per listener; more are refused by the kernel's accept queue. */
  maxConnections?: number;
  /** More routes on the unix and TCP listeners (behind the same token), e.g. the MCP endpoint. */
  routes?: ((app: FastifyInstance, ctx: DaemonContext) => void)[];
  /** More listeners on the same sandboxes (e.g. the E2B-compatible one), closed with the others. */
  listeners?: { name: string; start: (ctx: DaemonContext, log: Logger) => Promise<FastifyInstance> }[];
};

export type Daemon = {
  socketPath: string;
  tcpPort?: number;
  adopted: string[];
  /** The TCP port of each extra listener, by name. */
  ports: Record<string, number>;
  /** Stops listening; kills every sandbox if `stopSandboxes` (default: the daemon's --stop-on-exit), else leaves them for the next daemon. */
  close(opts?: { stopSandboxes?: boolean }): Promise<void>;
};

/** Builds one listener's app; the unix one trusts its socket's file mode, the TCP one wants the token. */
export async function buildApp(ctx: DaemonContext, log: Logger, auth?: { token: string }, maxConnections = 512, routes: ((app: FastifyInstance, ctx: DaemonContext) => void)[] = []): Promise<FastifyInstance> {
  const app: FastifyInstance = Fastify({
    loggerInstance: log as FastifyBaseLogger,
    bodyLimit: JSON_BODY_LIMIT,
    connectionTimeout: IDLE_TIMEOUT_MS,
    requestTimeout: REQUEST_TIMEOUT_MS,
    keepAliveTimeout: KEEP_ALIVE_TIMEOUT_MS,
    genReqId: (req) => {
      const given = req.headers['x-request-id'];
      return typeof given === 'string' && /^[A-Za-z0-9._-]{1,64}$/.test(given) ? given : randomUUID();
    },
    ajv: { customOptions: { coerceTypes: false, removeAdditional: false } },
  });
  await app.register(fastifySwagger, {
    openapi: {
      info: { title: 'clade daemon', version: API_VERSION, description: 'Linux microVM sandboxes that fork copy-on-write. See docs/api.md.' },
      components: { securitySchemes: { bearer: { type: 'http', scheme: 'bearer', description: 'required on TCP listeners; the unix socket needs none' } } },
    },
  });
  app.setErrorHandler(errorHandler);
  app.setNotFoundHandler((req, reply) => void reply.status(404).send({ code: 'not_found', message: `no route ${req.method} ${req.url.split('?')[0]}; see /v1/openapi.json` }));
  app.addHook('onSend', async (req, reply) => void reply.header('x-request-id', req.id));
  if (auth) {
    app.addHook('onRequest', async (req, reply) => {
      if (!bearerMatches(req.headers.authorization, auth.token)) {
        return reply.status(401).send({ code: 'auth', message: 'missing or wrong bearer token: send `Authorization: Bearer <token>` with the token from the daemon\'s token file' });
      }
    });
  }
  systemRoutes(app, ctx);
  sandboxRoutes(app, ctx);
  commandRoutes(app, ctx);
  fileRoutes(app, ctx);
  environmentRoutes(app, ctx, { readsHostFiles: auth === undefined }); // the unix socket is the owner's
  snapshotRoutes(app, ctx);
  for (const more of routes) more(app, ctx);
  await app.ready();
  app.server.maxConnections = maxConnections;
  app.server.headersTimeout = HEADERS_TIMEOUT_MS;
  return app;
}

/**
 * Starts the daemon: adopts the sandboxes a previous daemon left running,
 * removes what nobody owns any more, then listens. Sandboxes outlive the
 * daemon unless `stopOnExit` is set.
 */
export async function startDaemon(opts: ServeOptions, manager: SandboxManager = defaultManager()): Promise<Daemon> {
  const log = pino({ level: opts.logLevel, base: { pid: process.pid } });
  // A daemon serves many sandboxes: a stray failure in one background task is logged, not fatal to all.
  process.on('unhandledRejection', (reason) => log.error({ err: reason instanceof Error ? reason.message : String(reason) }, 'unhandled rejection (kept running)'));
  keepSandboxesOnExit();
  const store = new StateStore(ensurePrivateDir(opts.stateDir));
  const registry = new SandboxRegistry(manager, store, opts.maxSandboxes, log);
  const ctx: DaemonContext = {
    registry,
    metrics: new Metrics(() => registry.size, () => manager.preparedVms),
    forkGate: new ConcurrencyGate(opts.maxConcurrentForks, 'forks, snapshots or snapshot starts', GATE_HOLD_LIMIT_MS),
    defaultTimeoutMs: opts.defaultTimeoutMs,
    startedAt: Date.now(),
    version: API_VERSION,
  };
  await claimSocket(opts.socketPath);
  const { adopted, dropped } = await registry.adoptAll();
  const reaped = manager.reapOrphans();
  log.info({ adopted, dropped, reaped }, 'state recovered');
  registry.startSweeping();
  // VMs a crash left without a record (a fork's children mid-way) are found once they are old enough to judge.
  const reaper = setInterval(() => {
    try {
      const r = manager.reapOrphans();
      if (r.killed || r.removed) log.info({ reaped: r }, 'removed orphaned VMs');
    } catch (err) {
      log.warn({ err: err instanceof Error ? err.message : String(err) }, 'orphan sweep failed; will retry');
    }
  }, ORPHAN_SWEEP_MS);
  reaper.unref();

  const apps: FastifyInstance[] = [];
  const unixApp = await buildApp(ctx, log, undefined, opts.maxConnections, opts.routes);
  await unixApp.listen({ path: opts.socketPath });
  chmodSync(opts.socketPath, 0o600);
  apps.push(unixApp);
  let tcpPort: number | undefined;
  if (opts.tcp) {
    const tcpApp = await buildApp(ctx, log, { token: loadOrCreateToken(opts.tokenFile) }, opts.maxConnections, opts.routes);
    await tcpApp.listen({ host: opts.tcp.host, port: opts.tcp.port });
    tcpPort = (tcpApp.server.address() as { port: number }).port;
    apps.push(tcpApp);
  }
  const ports: Record<string, number> = {};
  for (const listener of opts.listeners ?? []) {
    const app = await listener.start(ctx, log);
    ports[listener.name] = (app.server.address() as { port: number }).port;
    apps.push(app);
  }
  log.info({ socket: opts.socketPath, tcpPort, ...ports, adopted: adopted.length }, 'clade daemon listening');

  let closing: Promise<void> | undefined;
  const close = (closeOpts: { stopSandboxes?: boolean } = {}) =>
    (closing ??= (async () => {
      log.info({ stopOnExit: opts.stopOnExit }, 'shutting down');
      clearInterval(reaper);
      const cut = setTimeout(() => apps.forEach((a) => a.server.closeAllConnections()), SHUTDOWN_GRACE_MS);
      await Promise.all(apps.map((a) => a.close()));
      clearTimeout(cut);
      if (closeOpts.stopSandboxes ?? opts.stopOnExit) await registry.killAll();
      else registry.detachAll();
      rmSync(opts.socketPath, { force: true });
    })());
  return { socketPath: opts.socketPath, ...(tcpPort !== undefined ? { tcpPort } : {}), adopted, ports, close };
}

/** Refuses to start over a live daemon; removes the socket a dead one left behind. */
async function claimSocket(path: string): Promise<void> {
  if (!existsSync(path)) return;
  if (await socketAnswers(path)) throw new CladeError('conflict', `a clade daemon already listens on ${path}; stop it first, or pass --socket to use another path`);
  rmSync(path, { force: true });
}

export function socketAnswers(path: string, timeoutMs = 1000): Promise<boolean> {
  return new Promise((resolve) => {
    const req = request({ socketPath: path, path: '/v1/health', timeout: timeoutMs }, (res) => {
      res.resume();
      resolve(res.statusCode === 200);
    });
    req.on('error', () => resolve(false));
    req.on('timeout', () => (req.destroy(), resolve(false)));
    req.end();
  });
}
