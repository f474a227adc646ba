import { PassThrough } from 'node:stream';
import { Type } from '@sinclair/typebox';
import type { FastifyInstance, FastifyReply } from 'fastify';
import type { CommandOptions } from '../../sdk/commands.js';
import type { Sandbox } from '../../sdk/sandbox.js';
import type { CommandView } from '../commands.js';
import type { DaemonContext } from '../context.js';
import { toErrorBody } from '../errors.js';
import { CommandParams, CommandSchema, IdParams, SignalBody, StdinBody } from '../schemas.js';

type CommandReq = { Params: { id: string; commandId: string } };

/**
 * Answers with an NDJSON stream: `produce` writes lines with `send` while it
 * runs and its result, if any (or its error), is the last line. `onHangUp` runs if the
 * client goes away before the end.
 */
export function ndjsonReply(reply: FastifyReply, produce: (send: (o: object) => void) => Promise<object | undefined>, onHangUp?: () => void): FastifyReply {
  const out = new PassThrough();
  const send = (o: object) => void out.write(JSON.stringify(o) + '\n');
  let finished = false;
  reply.raw.once('close', () => {
    if (!finished) onHangUp?.();
  });
  produce(send)
    .then(
      (last) => last && send(last),
      (err: unknown) => send({ error: toErrorBody(err).body }),
    )
    .finally(() => {
      finished = true;
      out.end();
    });
  return reply.header('content-type', 'application/x-ndjson').header('cache-control', 'no-store').send(out);
}

/** Starts a command the daemon keeps running and recording after this request ends. */
export async function startBackground(sandbox: Sandbox, cmd: string | string[], opts: Omit<CommandOptions, 'background'>, ctx: DaemonContext): Promise<CommandView> {
  const command = ctx.registry.commands.add(sandbox.sandboxId, cmd);
  try {
    const handle = await sandbox.commands.run(cmd, { ...opts, background: true, onStdout: command.onStdout, onStderr: command.onStderr });
    command.watch(handle);
    return command.view();
  } catch (err) {
    ctx.registry.commands.delete(sandbox.sandboxId, command.commandId);
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
