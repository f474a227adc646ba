import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { runCommand, type CommandHandle, type CommandOptions, type CommandResult } from '../../core/commands.js';
import { runCode, type RunCodeOptions } from '../../core/interpreter.js';
import type { LiveSandbox } from '../../core/sandbox.js';
import { CladeError } from '../../util/errors.js';
import type { DaemonContext } from '../context.js';
import { ChildResults, CodeBody, CodeResult, CommandSchema, CreateBody, ExecBody, ExecResult, ForkBody, IdParams, ListQuery, PatchSandboxBody, PrewarmBody, SandboxSchema, SnapshotBody, SnapshotSchema, StreamQuery } from '../../wire/schemas.js';
import { Type } from '@sinclair/typebox';
import { allowLongWait, childResult, publicSnapshot } from './replies.js';
import { holdAgentOf, ndjsonReply, startBackground } from './commands.js';

type ExecOptions = Omit<CommandOptions, 'background'>;
type IdReq = { Params: { id: string } };

export function sandboxRoutes(app: FastifyInstance, ctx: DaemonContext): void {
  const { registry, metrics } = ctx;
  const { manager } = registry;

  app.post('/v1/sandboxes', { schema: { tags: ['sandboxes'], summary: 'boot a sandbox', body: CreateBody, response: { 201: SandboxSchema } } }, async (req, reply) => {
    const body = req.body as CreateBody;
    allowLongWait(req);
    const release = registry.reserve(1);
    try {
      const { timeoutMs, ...opts } = body;
      const live = await metrics.time('create', () => manager.create(opts));
      return reply.status(201).send(registry.add(live, timeoutMs ?? ctx.defaultTimeoutMs));
    } finally {
      release();
    }
  });

  app.get('/v1/sandboxes', { schema: { tags: ['sandboxes'], summary: 'list sandboxes', querystring: ListQuery, response: { 200: Type.Array(SandboxSchema) } } }, async (req) => {
    return registry.list(req.query as { parentId?: string; snapshotTag?: string });
  });

  app.get<IdReq>('/v1/sandboxes/:id', { schema: { tags: ['sandboxes'], summary: 'describe a sandbox', params: IdParams, response: { 200: SandboxSchema } } }, async (req) => {
    registry.get(req.params.id);
    return registry.view(req.params.id);
  });

  app.delete<IdReq>('/v1/sandboxes/:id', { schema: { tags: ['sandboxes'], summary: 'kill a sandbox and remove its files', params: IdParams } }, async (req, reply) => {
    await registry.remove(req.params.id);
    return reply.status(204).send();
  });

  app.patch<IdReq>('/v1/sandboxes/:id', { schema: { tags: ['sandboxes'], summary: 'set a new lifetime, counted from now', params: IdParams, body: PatchSandboxBody, response: { 200: SandboxSchema } } }, async (req) => {
    registry.get(req.params.id);
    return registry.setLifetime(req.params.id, (req.body as { timeoutMs: number }).timeoutMs);
  });

  app.post<IdReq>(
    '/v1/sandboxes/:id/exec',
    {
      schema: {
        tags: ['sandboxes'],
        summary: 'run a command: JSON result, NDJSON stream (?stream=1 or Accept: application/x-ndjson), or background (201 with a commandId)',
        params: IdParams,
        querystring: StreamQuery,
        body: ExecBody,
        response: { 200: ExecResult, 201: CommandSchema },
      },
    },
    async (req, reply) => {
      const sandbox = registry.get(req.params.id);
      const body = req.body as ExecBody;
      const opts: ExecOptions = { ...(body.envs ? { envs: body.envs } : {}), ...(body.cwd ? { cwd: body.cwd } : {}), ...(body.timeoutMs !== undefined ? { timeoutMs: body.timeoutMs } : {}), ...(body.stdin !== undefined ? { stdin: body.stdin } : {}) };
      if (body.background) return reply.status(201).send(await startBackground(sandbox, body.cmd, opts, ctx));
      if (typeof body.stdin === 'boolean') throw new CladeError('bad_request', 'stdin: true (keep stdin open) needs background: true; send the data as a string instead');
      if (wantsStream(req)) return streamExec(sandbox, body.cmd, opts, reply, ctx);
      allowLongWait(req); // the command's own timeout bounds this request
      return metrics.time('exec', () => runCommand(sandbox, body.cmd, opts) as Promise<CommandResult>);
    },
  );

  app.post<IdReq>(
    '/v1/sandboxes/:id/code',
    { schema: { tags: ['sandboxes'], summary: 'run Python in the persistent interpreter (NDJSON stream of output, then the result, with ?stream=1)', params: IdParams, querystring: StreamQuery, body: CodeBody, response: { 200: CodeResult } } },
    async (req, reply) => {
      const sandbox = registry.get(req.params.id);
      const body = req.body as { code: string; timeoutMs?: number };
      const opts = body.timeoutMs !== undefined ? { timeoutMs: body.timeoutMs } : {};
      // The first call starts the interpreter, which a restarted daemon must find.
      const run = (more: RunCodeOptions) => metrics.time('code', () => runCode(sandbox, body.code, { ...opts, ...more })).finally(() => registry.persist(sandbox.id));
      if (!wantsStream(req)) {
        allowLongWait(req);
        return run({});
      }
      return ndjsonReply(reply, (line) => run({ onStdout: (d) => line({ stdout: d }), onStderr: (d) => line({ stderr: d }) }).then((result) => ({ result })), undefined, holdAgentOf(sandbox));
    },
  );

  app.post<IdReq>('/v1/sandboxes/:id/prewarm', { schema: { tags: ['sandboxes'], summary: 'pre-start VM processes for the next forks of this sandbox', params: IdParams, body: PrewarmBody, response: { 200: Type.Object({ size: Type.Integer() }) } } }, async (req) => {
    const sandbox = registry.get(req.params.id);
    const { size } = req.body as { size: number };
    allowLongWait(req);
    // Pre-started VMs count against --max-sandboxes like running ones: hold room for them while they start.
    const release = registry.reserve(size);
    try {
      // A first prewarm may move the sandbox to a VM process of its own RAM file, like a fork.
      await registry.exclusive(sandbox.id, () => manager.prewarm(sandbox, size));
    } finally {
      release();
    }
    registry.persist(sandbox.id);
    return { size };
  });

  app.post<IdReq>('/v1/sandboxes/:id/fork', { schema: { tags: ['sandboxes'], summary: 'fork into count running children', params: IdParams, body: ForkBody, response: { 200: ChildResults } } }, async (req) => {
    const parent = registry.get(req.params.id);
    const body = req.body as { count?: number; timeoutMs?: number };
    const count = body.count ?? 1;
    allowLongWait(req);
    const release = registry.reserve(count);
    try {
      // The core runs forks of one parent one after another and merges those that wait.
      const { children } = await ctx.forkGate.runKeyed(parent.id, () => metrics.time('fork', () => manager.fork(parent, count)));
      registry.persist(parent.id); // the parent may continue in a new VM process
      return children.map((k) => childResult(k, (sb) => registry.add(sb, body.timeoutMs ?? ctx.defaultTimeoutMs).sandboxId));
    } finally {
      release();
    }
  });

  app.post<IdReq>('/v1/sandboxes/:id/snapshot', { schema: { tags: ['sandboxes'], summary: 'save the running state as a persistent snapshot', params: IdParams, body: SnapshotBody, response: { 201: SnapshotSchema } } }, async (req, reply) => {
    const sandbox = registry.get(req.params.id);
    const { tag } = req.body as { tag: string };
    allowLongWait(req);
    const { meta } = await registry.exclusive(sandbox.id, () => ctx.forkGate.run(() => metrics.time('snapshot', () => manager.snapshot(sandbox, tag))));
    registry.persist(sandbox.id);
    return reply.status(201).send(publicSnapshot(meta));
  });
}



function wantsStream(req: FastifyRequest): boolean {
  return (req.query as { stream?: string }).stream === '1' || (req.headers.accept ?? '').includes('application/x-ndjson');
}

/**
 * Streams a command as NDJSON: `{"stdout":…}` and `{"stderr":…}` lines as the
 * guest produces output, then `{"exit":{…}}` (or `{"error":{…}}`). A client
 * that hangs up kills the command, so nothing runs on unattended.
 */
async function streamExec(sandbox: LiveSandbox, cmd: string | string[], opts: ExecOptions, reply: FastifyReply, ctx: DaemonContext): Promise<FastifyReply> {
  // Output can arrive before the reply stream exists: keep it until then.
  const early: object[] = [];
  let line: (o: object) => void = (o) => early.push(o);
  const handle = (await runCommand(sandbox, cmd, { ...opts, background: true, captureOutput: false, onStdout: (d) => line({ stdout: d }), onStderr: (d) => line({ stderr: d }) })) as CommandHandle;
  return ndjsonReply(
    reply,
    (send) => {
      for (const o of early) send(o);
      line = send;
      return ctx.metrics.time('exec', () => handle.wait()).then((r) => ({ exit: { exitCode: r.exitCode, ...(r.timedOut ? { timedOut: true } : {}), ...(r.signal ? { signal: r.signal } : {}) } }));
    },
    () => void handle.kill().catch(() => undefined),
    holdAgentOf(sandbox),
  );
}
