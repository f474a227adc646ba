import { pipeline, Readable, Transform } from 'node:stream';
import type { FastifyInstance } from 'fastify';
import { Type } from '@sinclair/typebox';
import { CladeError } from '../../util/errors.js';
import { agentFileOps, Files, type EntryInfo } from '../../core/files.js';
import type { LiveSandbox } from '../../core/sandbox.js';
import type { DaemonContext } from '../context.js';
import { EntrySchema, IdParams, MkdirBody, PathQuery, ReadQuery } from '../../wire/schemas.js';

/** Largest upload. Uploads stream through to the guest; the daemon holds only a few chunks of one. */
export const MAX_UPLOAD_BYTES = 4 * 1024 * 1024 * 1024;

type FileReq = { Params: { id: string }; Querystring: { path: string } };

export function fileRoutes(app: FastifyInstance, ctx: DaemonContext): void {
  const { registry } = ctx;

  app.get<{ Params: { id: string }; Querystring: { path: string; maxBytes?: string } }>(
    '/v1/sandboxes/:id/files',
    { schema: { tags: ['files'], summary: 'download a file (raw bytes, streamed as the client reads; with maxBytes, a bigger file is refused with 413 before any byte is sent)', params: IdParams, querystring: ReadQuery } },
    async (req, reply) => {
      const { path, maxBytes } = req.query;
      const stream = await filesOf(registry.get(req.params.id)).read(path, { format: 'stream', ...(maxBytes !== undefined ? { maxBytes: Number(maxBytes) } : {}) });
      return reply.type('application/octet-stream').send(Readable.fromWeb(stream as import('node:stream/web').ReadableStream<Uint8Array>));
    },
  );

  app.get<FileReq>('/v1/sandboxes/:id/files/list', { schema: { tags: ['files'], summary: 'list a directory', params: IdParams, querystring: PathQuery, response: { 200: Type.Array(EntrySchema) } } }, async (req) => {
    return (await filesOf(registry.get(req.params.id)).list(req.query.path)).map(entryJson);
  });

  app.get<FileReq>('/v1/sandboxes/:id/files/stat', { schema: { tags: ['files'], summary: 'describe a file or directory', params: IdParams, querystring: PathQuery, response: { 200: EntrySchema } } }, async (req) => {
    return entryJson(await filesOf(registry.get(req.params.id)).getInfo(req.query.path));
  });

  app.post<{ Params: { id: string }; Body: { path: string } }>(
    '/v1/sandboxes/:id/files/mkdir',
    { schema: { tags: ['files'], summary: 'create a directory and its parents', params: IdParams, body: MkdirBody, response: { 200: Type.Object({ created: Type.Boolean() }) } } },
    async (req) => ({ created: await filesOf(registry.get(req.params.id)).makeDir(req.body.path) }),
  );

  app.delete<FileReq>('/v1/sandboxes/:id/files', { schema: { tags: ['files'], summary: 'remove a file or a directory tree', params: IdParams, querystring: PathQuery } }, async (req, reply) => {
    await filesOf(registry.get(req.params.id)).remove(req.query.path);
    return reply.status(204).send();
  });

  // Uploads take any content type as raw bytes, streamed to the guest as they arrive, in a
  // scope of their own so JSON routes keep their parser.
  void app.register(async (scope) => {
    scope.removeAllContentTypeParsers();
    scope.addContentTypeParser('*', (_req, payload, done) => done(null, payload));
    scope.put<FileReq>(
      '/v1/sandboxes/:id/files',
      { schema: { tags: ['files'], summary: `upload a file (raw body, streamed, at most ${MAX_UPLOAD_BYTES} bytes); parents are created; it appears only when complete`, params: IdParams, querystring: PathQuery, response: { 200: Type.Object({ path: Type.String(), bytes: Type.Integer() }) } } },
      async (req) => {
        const sandbox = registry.get(req.params.id);
        const counted = countUpTo(MAX_UPLOAD_BYTES);
        const source = (req.body as Readable | undefined) ?? Readable.from([]);
        // pipeline, not pipe: a client that breaks off fails the stream, and the upload is discarded.
        pipeline(source, counted.stream, () => undefined);
        const info = await filesOf(sandbox).write(req.query.path, counted.stream);
        return { path: info.path, bytes: counted.bytes() };
      },
    );
  });
}

function filesOf(sandbox: LiveSandbox): Files {
  return new Files(agentFileOps(sandbox.agent));
}

function entryJson(e: EntryInfo) {
  return { ...e, modifiedTime: e.modifiedTime.toISOString() };
}

/** Passes bytes through, counting them, and fails the stream (so the upload is discarded) past `max`. */
function countUpTo(max: number): { stream: Transform; bytes: () => number } {
  let n = 0;
  const stream = new Transform({
    transform(chunk: Buffer, _enc, cb) {
      n += chunk.length;
      if (n > max) cb(new CladeError('too_large', `the upload is larger than ${max} bytes`));
      else cb(null, chunk);
    },
  });
  return { stream, bytes: () => n };
}
