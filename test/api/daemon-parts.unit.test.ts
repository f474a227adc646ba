import { mkdtempSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { pino } from 'pino';
import { bearerMatches, loadOrCreateToken } from '../../src/api/auth.js';
import { ConcurrencyGate, type DaemonContext } from '../../src/api/context.js';
import { Metrics } from '../../src/api/metrics.js';
import { SandboxRegistry } from '../../src/api/registry.js';
import { buildApp } from '../../src/api/server.js';
import { errorFromAnswer, parseDaemonAddress } from '../../src/sdk/daemon-client.js';
import { STATUS_OF, toErrorBody } from '../../src/api/errors.js';
import { StateStore, type SandboxRecord } from '../../src/api/state.js';
import { SandboxManager } from '../../src/core/manager.js';
import { sandboxDir } from '../../src/core/sandbox.js';
import { CladeError } from '../../src/util/errors.js';
import { memoryDir } from '../../src/util/home.js';

function scratch(): string {
  return mkdtempSync(join(tmpdir(), 'clade-unit-'));
}

describe('daemon building blocks (no VMs)', () => {
  it('records are written mode 0600, replaced whole, and half-written temp files are dropped', () => {
    const dir = scratch();
    try {
      const store = new StateStore(dir);
      const rec = recordFixture('sb-000000000001');
      store.save(rec);
      store.save({ ...rec, agentIdCursor: 2 });
      writeFileSync(join(dir, 'sandboxes', '.sb-000000000002.json.99.tmp'), '{"half');
      writeFileSync(join(dir, 'sandboxes', 'sb-000000000003.json'), '{"broken');
      // Well-formed JSON that points where clade never puts things is dropped too, unused.
      const four = recordFixture('sb-000000000004');
      store.save({ ...four, vm: { ...four.vm, runDir: '/etc' } });
      const five = recordFixture('sb-000000000005');
      store.save({ ...five, vm: { ...five.vm, memory: { file: '/root/.ssh/id_rsa', shared: true } } });
      writeFileSync(join(dir, 'sandboxes', 'sb-000000000006.json'), JSON.stringify({ ...recordFixture('sb-000000000006'), id: '../../x' }));
      const invalid: string[] = [];
      expect(store.loadAll((f) => invalid.push(f))).toEqual([{ ...rec, agentIdCursor: 2 }]);
      expect(invalid.sort()).toEqual(['sb-000000000003.json', 'sb-000000000004.json', 'sb-000000000005.json', 'sb-000000000006.json']);
      expect(readdirSync(join(dir, 'sandboxes'))).toEqual(['sb-000000000001.json']);
      expect(statSync(join(dir, 'sandboxes', 'sb-000000000001.json')).mode & 0o777).toBe(0o600);
      expect(statSync(join(dir, 'sandboxes')).mode & 0o777).toBe(0o700);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('the token is made once, mode 0600, and only the exact bearer matches', () => {
    const dir = scratch();
    try {
      const path = join(dir, 'token');
      const token = loadOrCreateToken(path);
      expect(loadOrCreateToken(path)).toBe(token);
      expect(statSync(path).mode & 0o777).toBe(0o600);
      expect(bearerMatches(`Bearer ${token}`, token)).toBe(true);
      for (const wrong of [undefined, '', 'Bearer ', `Bearer ${token}x`, `bearer ${token}`, token]) expect(bearerMatches(wrong, token)).toBe(false);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('error codes map to statuses and come back as the same CladeError', () => {
    expect(toErrorBody(new CladeError('not_found', 'gone'))).toEqual({ status: 404, body: { code: 'not_found', message: 'gone' } });
    expect(toErrorBody(new CladeError('unavailable', 'full')).status).toBe(503);
    expect(toErrorBody(new Error('boom')).status).toBe(500);
    for (const code of Object.keys(STATUS_OF)) {
      const back = errorFromAnswer(STATUS_OF[code as keyof typeof STATUS_OF], Buffer.from(JSON.stringify({ code, message: 'm' })));
      expect(back).toMatchObject({ code, message: 'm' });
    }
    expect(errorFromAnswer(502, Buffer.from('<html>'))).toMatchObject({ code: 'internal' });
  });

  it('an image build over TCP may not copy the daemon host\'s files, and is refused before any work', async () => {
    const dir = scratch();
    const log = pino({ level: 'silent' });
    const registry = new SandboxRegistry(new SandboxManager({}), new StateStore(join(dir, 'state')), 10, log);
    const ctx: DaemonContext = { registry, metrics: new Metrics(() => 0, () => 0), forkGate: new ConcurrencyGate(1, 'forks'), defaultTimeoutMs: 0, startedAt: Date.now(), version: 'test' };
    const tcp = await buildApp(ctx, log, { token: 't'.repeat(64) });
    try {
      const r = await tcp.inject({ method: 'POST', url: '/v1/images', headers: { authorization: `Bearer ${'t'.repeat(64)}` }, payload: { name: 'x', copy: ['/etc:/opt/etc'] } });
      expect(r.statusCode).toBe(400);
      expect(r.json()).toEqual({ code: 'bad_request', message: 'copy reads files on the daemon\'s host: build the image with the CLI on that host or through the unix socket' });
    } finally {
      await tcp.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });

  it('daemon addresses are unix:// or http://', () => {
    expect(parseDaemonAddress('unix:///run/clade.sock')).toEqual({ socketPath: '/run/clade.sock' });
    expect(parseDaemonAddress('http://127.0.0.1:7070')).toEqual({ host: '127.0.0.1', port: 7070 });
    expect(() => parseDaemonAddress('https://x')).toThrow(/only unix/);
    expect(() => parseDaemonAddress('nope')).toThrow(CladeError);
  });
});

/** A record of the shape the daemon writes, for a sandbox of this clade home. */
function recordFixture(id: string): SandboxRecord {
  const runDir = join(sandboxDir(id), 'vm-0');
  return {
    id,
    vm: {
      engine: 'qemu',
      id,
      pid: 1234,
      runDir,
      accelerator: 'tcg',
      memory: { file: join(memoryDir(), `${id}.mem`), shared: true },
      shape: { imageDigest: 'cd'.repeat(32), memoryMiB: 1024, cpus: 1 },
    },
    tokenHex: 'ab'.repeat(32),
    env: {},
    agentIdCursor: 5,
    createdAt: new Date(0).toISOString(),
    expiresAt: null,
  };
}
