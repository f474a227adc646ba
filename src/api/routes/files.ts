import type { FastifyInstance } from 'fastify';
import { Type } from '@sinclair/typebox';
import type { EntryInfo } from '../../sdk/files.js';
import type { DaemonContext } from '../context.js';
import { EntrySchema, IdParams, MkdirBody, PathQuery } from '../schemas.js';

/** Largest upload; the agent moves files in chunks, but the daemon holds the whole body in memory. */
export const MAX_UPLOAD_BYTES = 256 * 1024 * 1024;

type FileReq = { Params: { id: string }; Querystring: { path: string } };

export function fileRoutes(app: FastifyInstance, ctx: DaemonContext): void {
  const { registry } = ctx;

  app.get<FileReq>('/v1/sandboxes/:id/files', { schema: { tags: ['files'], summary: 'download a file (raw bytes)', params: IdParams, querystring: PathQuery } }, async (req, reply) => {
    const data = await registry.get(req.params.id).files.read(req.query.path, { format: 'bytes' });
    return reply.type('application/octet-stream').send(Buffer.from(data.buffer, data.byteOffset, data.byteLength));
  });

  app.get<FileReq>('/v1/sandboxes/:id/files/list', { schema: { tags: ['files'], summary: 'list a directory', params: IdParams, querystring: PathQuery, response: { 200: Type.Array(EntrySchema) } } }, async (req) => {
    return (await registry.get(req.params.id).files.list(req.query.path)).map(entryJson);
  });

  app.get<FileReq>('/v1/sandboxes/:id/files/stat', { schema: { tags: ['files'], summary: 'describe a file or directory', params: IdParams, querystring: PathQuery, response: { 200: EntrySchema } } }, async (req) => {
    return entryJson(await registry.get(req.params.id).files.getInfo(req.query.path));
  });

  app.post<{ Params: { id: string }; Body: { path: string } }>(
    '/v1/sandboxes/:id/files/mkdir',
    { schema: { tags: ['files'], summary: 'create a directory and its parents', params: IdParams, body: MkdirBody, response: { 200: Type.Object({ created: Type.Boolean() }) } } },
    async (req) => ({ created: await registry.get(req.params.id).files.makeDir(req.body.path) }),
  );

  app.delete<FileReq>('/v1/sandboxes/:id/files', { schema: { tags: ['files'], summary: 'remove a file or a directory tree', params: IdParams, querystring: PathQuery } }, async (req, reply) => {
    await registry.get(req.params.id).files.remove(req.query.path);
    return reply.status(204).send();
  });

  // Uploads take any content type as raw bytes, in a scope of their own so JSON routes keep their parser.
  void app.register(async (scope) => {
    scope.removeAllContentTypeParsers();
    scope.addContentTypeParser('*', { parseAs: 'buffer', bodyLimit: MAX_UPLOAD_BYTES }, (_req, body, done) => done(null, body));
    scope.put<FileReq>(
      '/v1/sandboxes/:id/files',
      { bodyLimit: MAX_UPLOAD_BYTES, schema: { tags: ['files'], summary: `upload a file (raw body, at most ${MAX_UPLOAD_BYTES} bytes); parents are created`, params: IdParams, querystring: PathQuery, response: { 200: Type.Object({ path: Type.String(), bytes: Type.Integer() }) } } },
      async (req) => {
        const data = (req.body as Buffer | undefined) ?? Buffer.alloc(0);
        const info = await registry.get(req.params.id).files.write(req.query.path, data);
        return { path: info.path, bytes: data.length };
      },
    );
  });
}

function entryJson(e: EntryInfo) {
  return { ...e, modifiedTime: e.modifiedTime.toISOString() };
}
