import { randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createContextValues } from '@connectrpc/connect';
import { fastifyConnectPlugin } from '@connectrpc/connect-fastify';
import Fastify, { type FastifyBaseLogger, type FastifyInstance, type FastifyReply, type FastifyRequest } from 'fastify';
import type { Logger } from 'pino';
import type { DaemonContext } from '../api/context.js';
import { CladeError } from '../util/errors.js';
import { codeRoutes } from './code.js';
import { controlRoutes } from './control.js';
import { TARGET, type EnvdTarget } from './envd-context.js';
import { filesRoutes } from './envd-files.js';
import { filesystemService } from './envd-filesystem.js';
import { processService } from './envd-process.js';
import { Filesystem } from './gen/filesystem_pb.js';
import { Process } from './gen/process_pb.js';
import { E2bState } from './state.js';
import { constantTimeEqual, e2bError, signatureValid } from './wire.js';

/** The port numbers E2B clients name in E2b-Sandbox-Port: the sandbox daemon (envd) and the code interpreter. */
export const ENVD_PORT = '49983';
export const INTERPRETER_PORT = '49999';
export const DEFAULT_E2B_LISTEN = { host: '127.0.0.1', port: 49982 };

/** The daemon's own limits (src/api/server.ts), for this listener too. */
const LIMITS = { bodyLimit: 8 * 1024 * 1024, connectionTimeout: 10 * 60_000, requestTimeout: 30 * 60_000, keepAliveTimeout: 60_000, headersTimeout: 30_000 };
/** A Connect request message is at most this big (file data goes through /files, not RPCs). */
const MAX_RPC_MESSAGE_BYTES = 16 * 1024 * 1024;
const STATE_SWEEP_MS = 5_000;

export type E2bListenOptions = {
  host: string;
  port: number;
  /** When set, every control-plane request must carry it as X-API-KEY. */
  apiKey?: string;
  maxConnections?: number;
};

type Plane = 'control' | 'envd' | 'interpreter';

declare module 'fastify' {
  interface FastifyRequest {
    e2bTarget?: EnvdTarget;
  }
}

/** Reads an API key file (one line); refuses an empty one. */
export function readApiKeyFile(path: string): string {
  const key = readFileSync(path, 'utf8').trim();
  if (key.length < 8) throw new CladeError('bad_request', `the E2B API key file ${path} holds no key of at least 8 characters`);
  return key;
}

function header(req: FastifyRequest, name: string): string | undefined {
  const v = req.headers[name];
  return Array.isArray(v) ? v[0] : v;
}

const ENVD_PATH = /^\/(process\.Process|filesystem\.Filesystem)\//;

/** Which of E2B's three services a request is for: by its path, and for /health by E2b-Sandbox-Port. */
export function planeOf(path: string, port: string | undefined): Plane {
  if (ENVD_PATH.test(path) || path === '/files') return 'envd';
  if (path === '/execute' || path === '/contexts' || path.startsWith('/contexts/')) return 'interpreter';
  if (path === '/health') return port === INTERPRETER_PORT ? 'interpreter' : 'envd';
  return 'control';
}

/** An error in the shape each plane's client reads: Connect's for RPCs, E2B's `{code, message}` elsewhere. */
function deny(req: FastifyRequest, reply: FastifyReply, status: number, connectCode: string, message: string): FastifyReply {
  if (ENVD_PATH.test(req.url.split('?')[0]!)) return reply.status(status).type('application/json').send({ code: connectCode, message });
  if (planeOf(req.url.split('?')[0]!, header(req, 'e2b-sandbox-port')) === 'interpreter') {
    reply.raw.statusMessage = message.replace(/[^\x20-\x7e]/g, ' ').slice(0, 300);
    return reply.status(status).type('text/plain').send(message);
  }
  return reply.status(status).send({ code: status, message });
}

/**
 * The E2B-compatible listener: the control plane, envd and the code
 * interpreter on one HTTP/1.1 port, as the unmodified clients reach them
 * with E2B_API_URL and E2B_SANDBOX_URL pointing here. Requests for a sandbox
 * name it in E2b-Sandbox-Id; header-less file links find their sandbox by
 * their signature. Same limits as the daemon's other listeners.
 */
export async function buildE2bApp(ctx: DaemonContext, log: Logger, opts: Pick<E2bListenOptions, 'apiKey' | 'maxConnections'> = {}): Promise<FastifyInstance> {
  const state = new E2bState(ctx.registry);
  const app: FastifyInstance = Fastify({
    loggerInstance: log.child({ listener: 'e2b' }) as FastifyBaseLogger,
    bodyLimit: LIMITS.bodyLimit,
    connectionTimeout: LIMITS.connectionTimeout,
    requestTimeout: LIMITS.requestTimeout,
    keepAliveTimeout: LIMITS.keepAliveTimeout,
    genReqId: () => randomUUID(),
  });
  app.decorateRequest('e2bTarget', undefined);
  app.setErrorHandler((err, req, reply) => {
    const { status, body } = e2bError(err);
    if (status >= 500 && status !== 501 && status !== 503) req.log.error({ err }, body.message);
    return deny(req, reply, status, 'internal', body.message);
  });
  app.setNotFoundHandler((req, reply) => deny(req, reply, 404, 'unimplemented', `clade's E2B listener has no route ${req.method} ${req.url.split('?')[0]}; see docs/e2b.md for what it serves`));

  app.addHook('onRequest', async (req, reply) => {
    const path = req.url.split('?')[0]!;
    const plane = planeOf(path, header(req, 'e2b-sandbox-port'));
    if (plane === 'control') {
      if (opts.apiKey !== undefined && !constantTimeEqual(header(req, 'x-api-key') ?? '', opts.apiKey)) {
        return deny(req, reply, 401, 'unauthenticated', 'missing or wrong API key: set E2B_API_KEY to the key `clade serve --e2b` was given');
      }
      return;
    }
    const id = header(req, 'e2b-sandbox-id');
    if (id === undefined) {
      // Header-less file links (uploadUrl, downloadUrl) are signed with their sandbox's token: find it by that.
      if (path === '/files') {
        const found = signedFilesTarget(state, req);
        if (found) return void (req.e2bTarget = found);
        return deny(req, reply, 401, 'unauthenticated', 'a /files request without E2b-Sandbox-Id needs a valid signature (from uploadUrl or downloadUrl)');
      }
      return deny(req, reply, 400, 'invalid_argument', 'send the E2b-Sandbox-Id header (the E2B clients do when E2B_SANDBOX_URL points here)');
    }
    let target: EnvdTarget;
    try {
      target = state.get(id);
    } catch {
      // What E2B's proxy answers for a sandbox that is gone: its clients report it as not running.
      return deny(req, reply, 502, 'unavailable', `sandbox ${id} is not running (killed, timed out, or never existed)`);
    }
    req.e2bTarget = target;
    if (plane === 'envd' && path !== '/health') {
      const token = header(req, 'x-access-token');
      const signed = path === '/files' && signedFor(req, target.e2b.envdAccessToken);
      if (!signed && !constantTimeEqual(token ?? '', target.e2b.envdAccessToken)) return deny(req, reply, 401, 'unauthenticated', `missing or wrong access token for sandbox ${id}; get a new one with Sandbox.connect`);
    }
    if (plane === 'interpreter' && path !== '/health') {
      const traffic = header(req, 'e2b-traffic-access-token');
      const token = header(req, 'x-access-token');
      if (!constantTimeEqual(traffic ?? '', target.e2b.trafficAccessToken) && !constantTimeEqual(token ?? '', target.e2b.envdAccessToken)) {
        return deny(req, reply, 401, 'unauthenticated', `missing or wrong access token for sandbox ${id}; get a new one with Sandbox.connect`);
      }
    }
  });

  const targetOf = (req: FastifyRequest): EnvdTarget => {
    if (!req.e2bTarget) throw new CladeError('not_found', 'no sandbox for this request');
    return req.e2bTarget;
  };

  // Its own scope: the Connect plugin brings body parsers of its own for the same content types.
  await app.register(async (scope) => {
    acceptLenientJson(scope);
    scope.get('/health', async (req, reply) => {
      targetOf(req);
      return reply.status(204).send();
    });
    controlRoutes(scope, ctx, state);
    filesRoutes(scope, (req) => targetOf(req).live);
    codeRoutes(scope, ctx, targetOf);
  });
  await app.register(fastifyConnectPlugin, {
    routes: (router) => {
      router.service(Process, processService);
      router.service(Filesystem, filesystemService);
    },
    contextValues: (req) => createContextValues().set(TARGET, req.e2bTarget),
    grpc: false,
    grpcWeb: false,
    connect: true,
    acceptCompression: [],
    readMaxBytes: MAX_RPC_MESSAGE_BYTES,
    jsonOptions: { ignoreUnknownFields: true },
  });

  const sweeper = setInterval(() => state.sweep(), STATE_SWEEP_MS);
  sweeper.unref();
  app.addHook('onClose', async () => clearInterval(sweeper));
  await app.ready();
  app.server.maxConnections = opts.maxConnections ?? 512;
  app.server.headersTimeout = LIMITS.headersTimeout;
  return app;
}

/** JSON bodies as the clients send them: the code interpreter's says application/json on bodiless calls (restart, delete). */
function acceptLenientJson(scope: FastifyInstance): void {
  scope.removeContentTypeParser('application/json');
  scope.addContentTypeParser('application/json', { parseAs: 'string' }, (_req, body, done) => {
    const text = String(body);
    if (text.trim() === '') return done(null, {});
    try {
      done(null, JSON.parse(text));
    } catch {
      done(Object.assign(new Error('the body is not valid JSON'), { statusCode: 400 }), undefined);
    }
  });
}

function signedFor(req: FastifyRequest, token: string): boolean {
  const q = req.query as Record<string, string | undefined>;
  if (!q.signature) return false;
  const operation = req.method === 'GET' ? 'read' : 'write';
  return signatureValid({ path: q.path ?? '', operation, user: q.username ?? '', signature: q.signature, ...(q.signature_expiration ? { expiration: q.signature_expiration } : {}) }, token);
}

function signedFilesTarget(state: E2bState, req: FastifyRequest): EnvdTarget | undefined {
  const e2b = state.findBy((s) => signedFor(req, s.envdAccessToken));
  if (!e2b) return undefined;
  try {
    return state.get(e2b.sandboxId);
  } catch {
    return undefined;
  }
}

/** Starts the listener; the daemon closes it with its others. */
export async function startE2bListener(ctx: DaemonContext, log: Logger, opts: E2bListenOptions): Promise<FastifyInstance> {
  if (opts.apiKey === undefined) log.warn({ host: opts.host, port: opts.port }, 'the E2B listener accepts any API key: every local process can drive sandboxes through it; pass --e2b-api-key to require one');
  const app = await buildE2bApp(ctx, log, opts);
  await app.listen({ host: opts.host, port: opts.port });
  return app;
}
