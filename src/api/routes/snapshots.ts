import type { FastifyInstance } from 'fastify';
import { Type } from '@sinclair/typebox';
import { listSnapshots, readSnapshotMeta, removeSnapshot, snapshotDir, verifySnapshot } from '../../core/snapshots.js';
import type { DaemonContext } from '../context.js';
import { ChildResults, DeleteSnapshotQuery, SnapshotSchema, StartBody, TagParams } from '../../wire/schemas.js';
import { allowLongWait, childResult, publicSnapshot } from './replies.js';

type TagReq = { Params: { tag: string } };


export function snapshotRoutes(app: FastifyInstance, ctx: DaemonContext): void {
  app.get('/v1/snapshots', { schema: { tags: ['snapshots'], summary: 'list persistent snapshots', response: { 200: Type.Array(SnapshotSchema) } } }, async () => listSnapshots().map(publicSnapshot));

  app.get<TagReq>('/v1/snapshots/:tag', { schema: { tags: ['snapshots'], summary: 'show a snapshot after checking its files against their SHA-256', params: TagParams, response: { 200: SnapshotSchema } } }, async (req) => ({
    ...publicSnapshot(await verifySnapshot(req.params.tag)),
    verified: true,
  }));

  app.delete<TagReq & { Querystring: { cascade?: string } }>(
    '/v1/snapshots/:tag',
    { schema: { tags: ['snapshots'], summary: 'delete a snapshot (cascade=1: also those made from it)', params: TagParams, querystring: DeleteSnapshotQuery, response: { 200: Type.Object({ removed: Type.Array(Type.String()) }) } } },
    async (req) => {
      snapshotDir(req.params.tag); // 400 for a bad tag; removeSnapshot answers 404, and deletes damaged snapshots too
      return { removed: removeSnapshot(req.params.tag, { cascade: req.query.cascade === '1' }) };
    },
  );

  app.post<TagReq & { Body: StartBody }>(
    '/v1/snapshots/:tag/start',
    { schema: { tags: ['snapshots'], summary: 'start count sandboxes from a snapshot', params: TagParams, body: StartBody, response: { 200: ChildResults } } },
    async (req) => {
      const { count = 1, env, timeoutMs } = req.body;
      readSnapshotMeta(req.params.tag);
      allowLongWait(req);
      const release = ctx.registry.reserve(count);
      try {
        const kids = await ctx.forkGate.run(() => ctx.metrics.time('start', () => ctx.registry.manager.fromSnapshot(req.params.tag, { count, ...(env ? { env } : {}) })));
        return kids.map((k) => childResult(k, (sb) => ctx.registry.add(sb, timeoutMs ?? ctx.defaultTimeoutMs).sandboxId));
      } finally {
        release();
      }
    },
  );
}
