import type { FastifyInstance } from 'fastify';
import type { DaemonContext } from '../context.js';
import { Health, Version } from '../../wire/schemas.js';

export function systemRoutes(app: FastifyInstance, ctx: DaemonContext): void {
  app.get('/v1/health', { schema: { tags: ['system'], summary: 'liveness', response: { 200: Health } } }, async () => ({
    ok: true,
    sandboxes: ctx.registry.size,
    pid: process.pid,
    uptimeS: (Date.now() - ctx.startedAt) / 1000,
  }));

  app.get('/v1/version', { schema: { tags: ['system'], summary: 'daemon and API version', response: { 200: Version } } }, async () => ({ version: ctx.version, api: 'v1' as const }));

  app.get('/metrics', { schema: { tags: ['system'], summary: 'Prometheus metrics', hide: false } }, async (_req, reply) => {
    return reply.type(ctx.metrics.registry.contentType).send(await ctx.metrics.registry.metrics());
  });

  app.get('/v1/openapi.json', { schema: { hide: true } }, async () => app.swagger());
}
