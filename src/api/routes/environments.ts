import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { Type } from '@sinclair/typebox';
import { buildImage, listImages, removeImage } from '../../core/images.js';
import { createTemplate } from '../../core/templates.js';
import { listTemplates, removeTemplate } from '../../core/template-store.js';
import { CladeError } from '../../util/errors.js';
import type { ProgressEvent } from '../../util/progress.js';
import type { DaemonContext } from '../context.js';
import { BuildImageBody, ImageBuildResult, ImageRefParams, ImageSchema, NameParams, StreamQuery, TemplateBody, TemplateSchema } from '../../wire/schemas.js';
import { ndjsonReply } from './commands.js';
import { allowLongWait } from './replies.js';

/**
 * Images (build from a recipe, list, remove) and templates (create, list,
 * remove). `readsHostFiles`: whether this listener's clients may have a
 * recipe copy the daemon host's files, i.e. they are the owner on the unix
 * socket; a token-holder over TCP is not thereby allowed to read the host.
 */
export function environmentRoutes(app: FastifyInstance, ctx: DaemonContext, listener: { readsHostFiles: boolean }): void {
  app.get('/v1/images', { schema: { tags: ['images'], summary: 'list images with their recipe', response: { 200: Type.Array(ImageSchema) } } }, async () => listImages());

  app.post<{ Body: BuildImageBody }>(
    '/v1/images',
    {
      schema: {
        tags: ['images'],
        summary: 'build an image from a recipe (cached by content digest); NDJSON progress lines then the result with ?stream=1 or Accept: application/x-ndjson',
        querystring: StreamQuery,
        body: BuildImageBody,
        response: { 200: ImageBuildResult },
      },
    },
    async (req, reply) => {
      const { force, ...recipe } = req.body;
      if (recipe.copy?.length && !listener.readsHostFiles) throw new CladeError('bad_request', 'copy reads files on the daemon\'s host: build the image with the CLI on that host or through the unix socket');
      allowLongWait(req);
      const build = async (progress?: (e: ProgressEvent) => void) => {
        const r = await buildImage({ ...recipe, ...(force ? { force } : {}), ...(progress ? { progress } : {}) });
        return { ...r.manifest, cached: r.cached, seconds: r.seconds };
      };
      return longOperation(req, reply, build);
    },
  );

  app.delete<{ Params: { ref: string } }>(
    '/v1/images/:ref',
    { schema: { tags: ['images'], summary: 'remove an image (by name or digest) and its names', params: ImageRefParams, response: { 200: Type.Object({ digest: Type.String(), names: Type.Array(Type.String()) }) } } },
    async (req) => removeImage(req.params.ref),
  );

  app.get('/v1/templates', { schema: { tags: ['templates'], summary: 'list templates', response: { 200: Type.Array(TemplateSchema) } } }, async () => listTemplates());

  app.post(
    '/v1/templates',
    {
      schema: {
        tags: ['templates'],
        summary: 'boot, run the setup, start a process and wait until ready, snapshot; NDJSON progress (setup output) then the result with ?stream=1 or Accept: application/x-ndjson',
        querystring: StreamQuery,
        body: TemplateBody,
        response: { 200: TemplateSchema },
      },
    },
    async (req, reply) => {
      allowLongWait(req);
      const release = ctx.registry.reserve(1); // the setup sandbox counts against the daemon's limit while it runs
      const create = (progress?: (e: ProgressEvent) => void) => createTemplate(ctx.registry.manager, req.body, progress).finally(release);
      return longOperation(req, reply, create);
    },
  );

  app.delete<{ Params: { name: string } }>(
    '/v1/templates/:name',
    { schema: { tags: ['templates'], summary: 'remove a template and its snapshot', params: NameParams } },
    async (req, reply) => {
      removeTemplate(req.params.name);
      return reply.status(204).send();
    },
  );
}

/** Answers with the result as JSON, or streams progress lines and then `{ result }` (or `{ error }`) as NDJSON. */
function longOperation(req: FastifyRequest, reply: FastifyReply, run: (progress?: (e: ProgressEvent) => void) => Promise<object>): Promise<object> | FastifyReply {
  const stream = (req.query as { stream?: string }).stream === '1' || (req.headers.accept ?? '').includes('application/x-ndjson');
  if (!stream) return run();
  return ndjsonReply(reply, (send) => run((progress) => send({ progress })).then((result) => ({ result })));
}
