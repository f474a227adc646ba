import { PassThrough } from 'node:stream';
import { Type } from '@sinclair/typebox';
import type { FastifyInstance, FastifyReply } from 'fastify';
import { runCommand, type CommandHandle, type CommandOptions } from '../../core/commands.js';
import type { LiveSandbox } from '../../core/sandbox.js';
import type { CommandView } from '../commands.js';
import type { DaemonContext } from '../context.js';
import { toErrorBody } from '../errors.js';
import { CommandParams, CommandSchema, IdParams, SignalBody, StdinBody } from '../../wire/schemas.js';

type CommandReq = { Params: { id: string; commandId: string } };

/** Output text merged into one NDJSON line at most; a guest writing a byte at a time costs one line per flush, not per byte. */
const MAX_MERGED_CHARS = 64 * 1024;
/** A stream quiet for this long gets a blank line. */
const KEEP_ALIVE_MS = 15_000;
/** How long a client may leave its stream unread while the sandbox's output waits for it. */
const STALLED_CLIENT_MS = 120_000;

/**
 * The body of an NDJSON answer. Consecutive output lines of one stream are
 * merged until the next tick. When the client reads slower than lines come,
 * `holdSource` is called (the sandbox's agent channel is paused) until the
 * answer drains, so a slow client cannot grow the daemon's memory.
 */
class NdjsonBody {
  readonly out = new PassThrough();
  private merged?: { key: 'stdout' | 'stderr'; text: string };
  private flushScheduled = false;
  private release?: () => void;
  private ended = false;

  private lastWrite = Date.now();
  private readonly keepAlive: NodeJS.Timeout;

  constructor(private readonly holdSource?: () => () => void) {
    this.out.on('drain', () => this.unhold());
    this.out.on('close', () => {
      this.unhold();
      clearInterval(this.keepAlive);
    });
    // A blank line (which NDJSON readers skip) keeps a quiet stream's connection from idling out.
    this.keepAlive = setInterval(() => {
      if (Date.now() - this.lastWrite >= KEEP_ALIVE_MS && !this.ended && !this.out.destroyed) this.raw('\n');
    }, KEEP_ALIVE_MS);
    this.keepAlive.unref();
  }

  send(o: object): void {
    if (this.ended) return;
    const key = 'stdout' in o ? 'stdout' : 'stderr' in o ? 'stderr' : undefined;
    const text = key ? (o as Record<string, unknown>)[key] : undefined;
    if (key && typeof text === 'string') {
      if (this.merged && this.merged.key !== key) this.flush();
      this.merged = { key, text: (this.merged?.text ?? '') + text };
      if (this.merged.text.length >= MAX_MERGED_CHARS) this.flush();
      else this.scheduleFlush();
      return;
    }
    this.flush();
    this.write(o);
  }

  end(): void {
    this.flush();
    this.ended = true;
    clearInterval(this.keepAlive);
    this.out.end();
  }

  private scheduleFlush(): void {
    if (this.flushScheduled) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      this.flush();
    });
  }

  private flush(): void {
    const m = this.merged;
    this.merged = undefined;
    if (m) this.write({ [m.key]: m.text });
  }

  private write(o: object): void {
    this.raw(JSON.stringify(o) + '\n');
  }

  private raw(text: string): void {
    if (this.out.destroyed) return;
    this.lastWrite = Date.now();
    if (!this.out.write(text)) this.holdOrCut();
  }

  private unhold(): void {
    clearTimeout(this.stallTimer);
    this.release?.();
    this.release = undefined;
  }

  /** A client that reads nothing for this long is cut off, so it cannot hold a sandbox's output paused. */
  private stallTimer?: NodeJS.Timeout;

  private holdOrCut(): void {
    if (this.release || !this.holdSource) return;
    this.release = this.holdSource();
    this.stallTimer = setTimeout(() => this.out.destroy(), STALLED_CLIENT_MS);
    this.stallTimer.unref();
  }
}

/**
 * Answers with an NDJSON stream: `produce` writes lines with `send` while it
 * runs and its result, if any (or its error), is the last line. `onHangUp` runs if the
 * client goes away before the end; `holdSource` pauses what feeds the lines while the client is slow.
 */
export function ndjsonReply(reply: FastifyReply, produce: (send: (o: object) => void) => Promise<object | undefined>, onHangUp?: () => void, holdSource?: () => () => void): FastifyReply {
  const body = new NdjsonBody(holdSource);
  const send = (o: object) => body.send(o);
  let finished = false;
  reply.raw.once('close', () => {
    if (!finished) onHangUp?.();
    body.out.destroy();
  });
  produce(send)
    .then(
      (last) => last && send(last),
      (err: unknown) => send({ error: toErrorBody(err).body }),
    )
    .finally(() => {
      finished = true;
      body.end();
    });
  return reply.header('content-type', 'application/x-ndjson').header('cache-control', 'no-store').send(body.out);
}

/** Pauses a sandbox's agent channel: what a slow NDJSON client holds while it catches up. */
export function holdAgentOf(sandbox: LiveSandbox): () => () => void {
  return () => sandbox.agent.holdReading();
}

/** Starts a command the daemon keeps running and recording after this request ends. */
export async function startBackground(sandbox: LiveSandbox, cmd: string | string[], opts: Omit<CommandOptions, 'background'>, ctx: DaemonContext): Promise<CommandView> {
  const command = ctx.registry.commands.add(sandbox.id, cmd);
  try {
    // The daemon keeps only the command's bounded replay buffer, not a second copy of its output.
    const handle = (await runCommand(sandbox, cmd, { ...opts, background: true, captureOutput: false, onStdout: command.onStdout, onStderr: command.onStderr })) as CommandHandle;
    command.watch(handle);
    return command.view();
  } catch (err) {
    ctx.registry.commands.delete(sandbox.id, command.commandId);
    throw err;
  }
}

/** Background commands: list, describe, follow output, stdin, signal, forget. */
export function commandRoutes(app: FastifyInstance, ctx: DaemonContext): void {
  const { registry } = ctx;
  const commandOf = (p: CommandReq['Params']) => {
    registry.get(p.id);
    return registry.commands.get(p.id, p.commandId);
  };

  app.get<{ Params: { id: string } }>('/v1/sandboxes/:id/commands', { schema: { tags: ['commands'], summary: 'background commands of a sandbox', params: IdParams, response: { 200: Type.Array(CommandSchema) } } }, async (req) => {
    registry.get(req.params.id);
    return registry.commands.list(req.params.id);
  });

  app.get<CommandReq>('/v1/sandboxes/:id/commands/:commandId', { schema: { tags: ['commands'], summary: 'describe a background command', params: CommandParams, response: { 200: CommandSchema } } }, async (req) => {
    return commandOf(req.params).view();
  });

  app.get<CommandReq>(
    '/v1/sandboxes/:id/commands/:commandId/output',
    { schema: { tags: ['commands'], summary: 'NDJSON: the output kept so far, then new output as it comes, then {"exit":…}; hanging up leaves the command running', params: CommandParams } },
    async (req, reply) => {
      const command = commandOf(req.params);
      let stop = () => undefined as unknown;
      return ndjsonReply(
        reply,
        // follow() sends the end line itself.
        (send) => new Promise<undefined>((resolve) => (stop = command.follow(send, () => resolve(undefined)))),
        () => stop(),
        holdAgentOf(registry.get(req.params.id)),
      );
    },
  );

  app.post<CommandReq>('/v1/sandboxes/:id/commands/:commandId/stdin', { schema: { tags: ['commands'], summary: 'write to a background command\'s stdin (started with stdin: true)', params: CommandParams, body: StdinBody } }, async (req, reply) => {
    const command = commandOf(req.params);
    const body = req.body as { data?: string; close?: boolean };
    if (body.data) await command.handle!.sendStdin(body.data);
    if (body.close) await command.handle!.closeStdin();
    return reply.status(204).send();
  });

  app.post<CommandReq>(
    '/v1/sandboxes/:id/commands/:commandId/signal',
    { schema: { tags: ['commands'], summary: 'signal a background command\'s process group (default SIGKILL)', params: CommandParams, body: SignalBody, response: { 200: Type.Object({ delivered: Type.Boolean() }) } } },
    async (req) => {
      const command = commandOf(req.params);
      const { signal } = req.body as { signal?: number };
      return { delivered: command.running ? await command.handle!.kill(signal ?? 9) : false };
    },
  );

  app.delete<CommandReq>('/v1/sandboxes/:id/commands/:commandId', { schema: { tags: ['commands'], summary: 'kill a background command if it runs, and forget it', params: CommandParams } }, async (req, reply) => {
    const command = commandOf(req.params);
    if (command.running) await command.handle!.kill(9).catch(() => false);
    registry.commands.delete(req.params.id, req.params.commandId);
    return reply.status(204).send();
  });
}
