import { randomUUID } from 'node:crypto';
import { Readable } from 'node:stream';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { runCode, type CodeResult, type InterpreterHost } from '../core/interpreter.js';
import type { LiveSandbox } from '../core/sandbox.js';
import type { DaemonContext } from '../api/context.js';
import { CladeError } from '../util/errors.js';
import { PacedQueue } from './paced.js';
import { DEFAULT_CONTEXT_ID, type CodeContext, type E2bSandbox } from './state.js';

/** A quiet execution's stream gets a keep-alive line this often (the client skips it; a blank line would break its parser). */
const KEEPALIVE_MS = 15_000;
/** Output text merged into one line at most. */
const MAX_MERGED_CHARS = 64 * 1024;
/** Code contexts per sandbox besides the default one. */
const MAX_CONTEXTS = 32;

export type CodeTarget = (req: FastifyRequest) => { live: LiveSandbox; e2b: E2bSandbox };

type Line =
  | { type: 'stdout' | 'stderr'; text: string; timestamp: number }
  | { type: 'result'; text: string; is_main_result: true }
  | { type: 'error'; name: string; value: string; traceback: string }
  | { type: 'number_of_executions'; execution_count: number }
  | { type: 'end_of_execution' };

/** The interpreter a context id names: the sandbox's own for the default context, else the context's own process. */
function hostOf(live: LiveSandbox, e2b: E2bSandbox, contextId: string | undefined): { host: InterpreterHost; context: CodeContext } {
  const id = contextId ?? DEFAULT_CONTEXT_ID;
  const context = e2b.contexts.get(id);
  if (!context) throw new CladeError('not_found', `Context ${id} not found`);
  return { host: id === DEFAULT_CONTEXT_ID ? live : live.namedInterpreter(id, context.cwd), context };
}

/** Python that sets environment variables for one execution, and that puts the old values back after it. */
export function envCode(env: Record<string, string>): { set: string; restore: string } {
  const json = JSON.stringify(JSON.stringify(env));
  return {
    set: `import os as _clade_os, json as _clade_json\n_clade_env = _clade_json.loads(${json})\n_clade_saved_env = {k: _clade_os.environ.get(k) for k in _clade_env}\n_clade_os.environ.update(_clade_env)\ndel _clade_os, _clade_json, _clade_env`,
    restore: `import os as _clade_os\nfor _clade_k, _clade_v in _clade_saved_env.items():\n    if _clade_v is None:\n        _clade_os.environ.pop(_clade_k, None)\n    else:\n        _clade_os.environ[_clade_k] = _clade_v\ndel _clade_os, _clade_saved_env`,
  };
}

function nanos(): number {
  return Date.now() * 1_000_000;
}

/** The lines of one execution, paced to the client: the sandbox's output waits while the client is behind. */
async function* ndjson(queue: PacedQueue<Line>): AsyncGenerator<string> {
  for (;;) {
    const next = await queue.next(KEEPALIVE_MS);
    if (next.kind === 'end') return;
    yield next.kind === 'idle' ? '{"type":"keepalive"}\n' : JSON.stringify(next.value) + '\n';
  }
}

/**
 * Runs one execution and writes its lines: output as it comes, then the
 * result's text, the error, the execution count and the end. Environment
 * variables given for the execution are set before it and put back after.
 */
async function execute(ctx: DaemonContext, live: LiveSandbox, host: InterpreterHost, context: CodeContext, code: string, env: Record<string, string> | undefined, queue: PacedQueue<Line>): Promise<void> {
  const quiet = { timeoutMs: 0 };
  const around = env && Object.keys(env).length ? envCode(env) : undefined;
  let result: CodeResult;
  try {
    if (around) await runCode(host, around.set, quiet);
    result = await ctx.metrics.time('code', () =>
      runCode(host, code, {
        timeoutMs: 0, // like a Jupyter kernel, code runs until it ends; restartCodeContext stops it
        onStdout: (text) => queue.push({ type: 'stdout', text, timestamp: nanos() }),
        onStderr: (text) => queue.push({ type: 'stderr', text, timestamp: nanos() }),
      }),
    );
    if (around) await runCode(host, around.restore, quiet);
  } finally {
    ctx.registry.persist(live.id); // a first execution starts an interpreter a restarted daemon must find
  }
  context.executions++;
  if (result.value !== undefined) queue.push({ type: 'result', text: result.value, is_main_result: true });
  if (result.error) queue.push({ type: 'error', ...result.error });
  queue.push({ type: 'number_of_executions', execution_count: context.executions });
  queue.push({ type: 'end_of_execution' });
}

/** Sends an error with a reason phrase that says what to do: for most statuses the client shows only the status line. */
function refuse(reply: FastifyReply, status: number, message: string): FastifyReply {
  reply.raw.statusMessage = message.replace(/[^\x20-\x7e]/g, ' ').slice(0, 300);
  return reply.status(status).type('text/plain').send(message);
}

/** Stops a context's interpreter: its state is gone, and the next execution starts a fresh one. */
async function stopInterpreter(host: InterpreterHost): Promise<void> {
  const execId = host.interpreterExecId;
  host.interpreter = undefined;
  host.interpreterExecId = undefined;
  if (execId) await host.agent.signalExec(execId, 9).catch(() => undefined);
}

/** E2B's code interpreter API (port 49999): /execute and code contexts, on clade's persistent interpreters. */
export function codeRoutes(app: FastifyInstance, ctx: DaemonContext, targetOf: CodeTarget): void {
  app.post('/execute', async (req, reply) => {
    const { live, e2b } = targetOf(req);
    const body = (req.body ?? {}) as { code?: unknown; context_id?: unknown; language?: unknown; env_vars?: unknown };
    if (typeof body.code !== 'string') return refuse(reply, 400, 'code (a string) is required');
    if (body.context_id != null && typeof body.context_id !== 'string') return refuse(reply, 400, 'context_id must be a string');
    if (body.env_vars != null && (typeof body.env_vars !== 'object' || !Object.values(body.env_vars).every((v) => typeof v === 'string'))) return refuse(reply, 400, 'env_vars must be an object of strings');
    const queue = new PacedQueue<Line>({
      hold: () => live.agent.holdReading(),
      merge: (last, next) =>
        (last.type === 'stdout' || last.type === 'stderr') && next.type === last.type && last.text.length < MAX_MERGED_CHARS ? { ...last, text: last.text + next.text } : undefined,
    });
    const language = typeof body.language === 'string' ? body.language.toLowerCase() : undefined;
    if (language !== undefined && language !== 'python' && body.context_id == null) {
      // An error line, not a status: the client shows an execution's error in full, a status only by its code.
      queue.push({ type: 'error', name: 'UnsupportedLanguage', value: `clade's code interpreter runs Python only, not ${JSON.stringify(body.language)}; run other languages with commands.run`, traceback: '' });
      queue.push({ type: 'end_of_execution' });
      queue.end();
    } else {
      let target: ReturnType<typeof hostOf>;
      try {
        target = hostOf(live, e2b, (body.context_id as string | undefined) ?? undefined);
      } catch (err) {
        return refuse(reply, 404, err instanceof Error ? err.message : String(err));
      }
      req.raw.socket?.setTimeout(0); // keep-alive lines keep the connection busy; the client's timeout bounds it
      void execute(ctx, live, target.host, target.context, body.code, (body.env_vars as Record<string, string> | undefined) ?? undefined, queue).then(
        () => queue.end(),
        (err: unknown) => {
          const e = err instanceof CladeError ? err : new CladeError('internal', String(err));
          queue.push({ type: 'error', name: e.code === 'timeout' ? 'TimeoutError' : 'InterpreterError', value: e.message, traceback: '' });
          queue.push({ type: 'end_of_execution' });
          queue.end();
        },
      );
    }
    reply.raw.once('close', () => queue.close());
    return reply.header('content-type', 'application/x-ndjson').header('cache-control', 'no-store').send(Readable.from(ndjson(queue)));
  });

  app.post('/contexts', async (req, reply) => {
    const { live, e2b } = targetOf(req);
    const body = (req.body ?? {}) as { language?: unknown; cwd?: unknown };
    if (body.language != null && String(body.language).toLowerCase() !== 'python') return refuse(reply, 400, `clade's code contexts run Python only, not ${JSON.stringify(body.language)}`);
    if (body.cwd != null && (typeof body.cwd !== 'string' || !body.cwd.startsWith('/'))) return refuse(reply, 400, 'cwd must be an absolute path');
    if (e2b.contexts.size > MAX_CONTEXTS) return refuse(reply, 429, `this sandbox already has ${MAX_CONTEXTS} code contexts; remove some first`);
    const context: CodeContext = { id: randomUUID(), language: 'python', cwd: (body.cwd as string | undefined) ?? '/root', executions: 0 };
    e2b.contexts.set(context.id, context);
    live.namedInterpreter(context.id, context.cwd); // its process starts with its first execution
    return { id: context.id, language: context.language, cwd: context.cwd };
  });

  app.get('/contexts', async (req) => {
    const { e2b } = targetOf(req);
    return [...e2b.contexts.values()].map((c) => ({ id: c.id, language: c.language, cwd: c.cwd }));
  });

  app.post<{ Params: { id: string } }>('/contexts/:id/restart', async (req, reply) => {
    const { live, e2b } = targetOf(req);
    let target: ReturnType<typeof hostOf>;
    try {
      target = hostOf(live, e2b, req.params.id);
    } catch (err) {
      return refuse(reply, 404, err instanceof Error ? err.message : String(err));
    }
    await stopInterpreter(target.host);
    target.context.executions = 0;
    ctx.registry.persist(live.id);
    return reply.status(204).send();
  });

  app.delete<{ Params: { id: string } }>('/contexts/:id', async (req, reply) => {
    const { live, e2b } = targetOf(req);
    if (req.params.id === DEFAULT_CONTEXT_ID) return refuse(reply, 400, 'the default context cannot be removed; restart it instead');
    let target: ReturnType<typeof hostOf>;
    try {
      target = hostOf(live, e2b, req.params.id);
    } catch (err) {
      return refuse(reply, 404, err instanceof Error ? err.message : String(err));
    }
    await stopInterpreter(target.host);
    e2b.contexts.delete(req.params.id);
    live.interpreters.delete(req.params.id);
    ctx.registry.persist(live.id);
    return reply.status(204).send();
  });
}
