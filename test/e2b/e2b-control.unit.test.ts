import { mkdtempSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AuthenticationError, CommandExitError, InvalidArgumentError, Sandbox, SandboxError, SandboxNotFoundError } from 'e2b';
import { ConcurrencyGate, type DaemonContext } from '../../src/api/context.js';
import { Metrics } from '../../src/api/metrics.js';
import { SandboxRegistry } from '../../src/api/registry.js';
import { StateStore } from '../../src/api/state.js';
import { SandboxManager } from '../../src/core/manager.js';
import { createTemplate } from '../../src/core/templates.js';
import { networkFromE2b } from '../../src/e2b/control.js';
import { buildE2bApp } from '../../src/e2b/server.js';
import { FakeEngine, fakeImage } from '../helpers/fake-engine.js';

// The E2B control plane and the listener's checks, driven by the unmodified
// `e2b` client, on a fake engine (in-memory guest agents): create, list with
// metadata and paging, connect, info, timeouts, fork with a failed child,
// kill, and the client's error types for bad keys, ids, tokens and envelopes.
// test/e2b/e2b-clients.test.ts runs the same clients against real VMs.

const saved = { ...process.env };
const home = mkdtempSync(join(tmpdir(), 'clade-e2b-unit-'));
const KEY = 'e2b_unit_test_key';
let engine: FakeEngine;
let registry: SandboxRegistry;
let app: FastifyInstance;
let port = 0;
const opts = () => ({ apiKey: KEY, apiUrl: `http://127.0.0.1:${port}`, sandboxUrl: `http://127.0.0.1:${port}` });

beforeAll(async () => {
  process.env.CLADE_HOME = home;
  fakeImage();
  engine = new FakeEngine();
  const log = pino({ level: 'silent' });
  registry = new SandboxRegistry(new SandboxManager({ qemu: engine }, { requestMs: 3000 }), new StateStore(join(home, 'state')), 8, log);
  const ctx: DaemonContext = { registry, metrics: new Metrics(() => registry.size, () => 0), forkGate: new ConcurrencyGate(2, 'forks', 5000), defaultTimeoutMs: 0, startedAt: Date.now(), version: 'test' };
  app = await buildE2bApp(ctx, log, { apiKey: KEY });
  await app.listen({ host: '127.0.0.1', port: 0 });
  port = (app.server.address() as { port: number }).port;
});

afterAll(async () => {
  await app.close();
  await Promise.all(registry.manager.list().map((sb) => sb.kill()));
  process.env = saved;
  rmSync(home, { recursive: true, force: true });
});

function raw(path: string, headers: Record<string, string>, body: Buffer | string, method = 'POST'): Promise<{ status: number; text: string; headers: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, method, path, headers }, (res) => {
      let text = '';
      res.on('data', (c: Buffer) => (text += c.toString()));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, text, headers: res.headers }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => {
      throw new Error('expected a rejection');
    },
    (e: unknown) => e,
  );
}

describe('E2B control plane on a fake engine', () => {
  it('creates, lists by metadata with paging, connects, reports info and kills', async () => {
    const a = await Sandbox.create({ ...opts(), metadata: { team: 'a b', n: '1' } });
    const b = await Sandbox.create({ ...opts(), metadata: { team: 'a b', n: '2' }, timeoutMs: 60_000 });
    const c = await Sandbox.create({ ...opts(), metadata: { team: 'other' } });
    expect(a.sandboxId).toMatch(/^sb-[0-9a-f]{12}$/);

    const pager = Sandbox.list({ ...opts(), query: { metadata: { team: 'a b' } }, limit: 1 });
    const seen: string[] = [];
    while (pager.hasNext) seen.push(...(await pager.nextItems()).map((s) => s.sandboxId));
    expect(seen.sort()).toEqual([a.sandboxId, b.sandboxId].sort());
    const all = await Sandbox.list(opts()).nextItems();
    expect(all.map((s) => s.sandboxId).sort()).toEqual([a.sandboxId, b.sandboxId, c.sandboxId].sort());
    expect(all.find((s) => s.sandboxId === c.sandboxId)?.metadata).toEqual({ team: 'other' });

    const info = await b.getInfo();
    expect(info.state).toBe('running');
    expect(info.metadata).toEqual({ team: 'a b', n: '2' });
    expect(Math.abs(info.endAt.getTime() - Date.now() - 60_000)).toBeLessThan(5_000);
    await b.setTimeout(10_000);
    expect(Math.abs((await b.getInfo()).endAt.getTime() - Date.now() - 10_000)).toBeLessThan(5_000);

    const again = await Sandbox.connect(a.sandboxId, opts());
    expect(again.sandboxId).toBe(a.sandboxId);
    for (const s of [a, b, c]) expect(await s.kill()).toBe(true);
    expect(await Sandbox.kill(a.sandboxId, opts())).toBe(false);
    expect(registry.size).toBe(0);
  });

  it('fork({count}) gives one entry per child, a failed child as an error', async () => {
    const parent = await Sandbox.create(opts());
    engine.failChildren = new Set([1]);
    try {
      const kids = await parent.fork({ count: 3 });
      expect(kids).toHaveLength(3);
      expect(kids[1]).toBeInstanceOf(Error);
      expect(String(kids[1])).toContain('fake child 1 failed');
      const ok = [kids[0], kids[2]] as Sandbox[];
      for (const k of ok) {
        expect(k).toBeInstanceOf(Sandbox);
        expect(registry.view(k.sandboxId).parentId).toBe(parent.sandboxId);
        expect(await k.kill()).toBe(true);
      }
    } finally {
      engine.failChildren = new Set();
      await parent.kill();
    }
    expect(await rejection(Sandbox.fork('sb-000000000000', { ...opts(), count: 1 }))).toBeInstanceOf(SandboxNotFoundError);
  });

  it("maps E2B's internet switch and egress lists onto clade's allow-list network, and refuses what it cannot express", async () => {
    expect(networkFromE2b({})).toBeUndefined();
    expect(networkFromE2b({ allow_internet_access: false })).toBeUndefined();
    expect(networkFromE2b({ allow_internet_access: true })).toEqual({ egress: 'all' });
    expect(networkFromE2b({ network: { allowOut: ['pypi.org'] } })).toEqual({ egress: 'all' }); // nothing denied: E2B allows all
    expect(networkFromE2b({ network: { denyOut: ['0.0.0.0/0'] } })).toEqual({ egress: 'none' });
    expect(networkFromE2b({ network: { allowOut: ['pypi.org', '203.0.113.0/24'], denyOut: ['0.0.0.0/0'] } })).toEqual({ egress: ['pypi.org', '203.0.113.0/24'] });
    expect(networkFromE2b({ allow_internet_access: false, network: { allowOut: ['pypi.org'] } })).toEqual({ egress: ['pypi.org'] });
    expect(networkFromE2b({ network: { allowPublicTraffic: false } })).toEqual({ egress: 'all' });
    expect(() => networkFromE2b({ network: { denyOut: ['198.51.100.7'] } })).toThrow(/clade's egress is an allow-list/);
    expect(() => networkFromE2b({ network: { egressProxy: { address: 'proxy:1080' } } })).toThrow(/network.egressProxy is not supported by clade/);
    expect(() => networkFromE2b({ network: { allowPublicTraffic: true } })).toThrow(/allowPublicTraffic: true is not supported/);
    expect(() => networkFromE2b({ network: { allowOut: 'pypi.org' } })).toThrow(/allowOut must be a list of strings/);
    expect(() => networkFromE2b({ allow_internet_access: 'yes' })).toThrow(/must be true or false/);
    // Through the unmodified client: refused before anything starts.
    const before = registry.size;
    const e = await rejection(Sandbox.create({ ...opts(), network: { denyOut: ['198.51.100.7'] } }));
    expect(e).toBeInstanceOf(SandboxError);
    expect(String(e)).toMatch(/allow-list/);
    expect(registry.size).toBe(before);
  });

  it('starts a sandbox from a clade template named as the E2B template', async () => {
    await createTemplate(registry.manager, { name: 'e2b-unit-tpl', env: { FROM_TEMPLATE: '1' } });
    const sb = await Sandbox.create('e2b-unit-tpl', opts());
    try {
      expect((await sb.getInfo()).templateId).toBe('e2b-unit-tpl');
      expect(registry.manager.get(sb.sandboxId).snapshotTag).toBe('e2b-unit-tpl');
      const e = await rejection(Sandbox.create('e2b-unit-tpl', { ...opts(), allowInternetAccess: true }));
      expect(String(e)).toMatch(/template e2b-unit-tpl fixes the sandbox's network/);
    } finally {
      await sb.kill();
    }
  });

  it('refuses what clade does not do with a clear error, never a silent no-op', async () => {
    const e = await rejection(Sandbox.create({ ...opts(), volumeMounts: { '/data': 'vol' } }));
    expect(e).toBeInstanceOf(SandboxError);
    expect(String(e)).toMatch(/volumeMounts is not supported by clade/);
    const sb = await Sandbox.create(opts());
    try {
      const paused = await rejection(sb.pause());
      expect(String(paused)).toMatch(/501.*pause is not supported by clade/);
      const pty = await rejection(sb.pty.create({ cols: 80, rows: 24, onData: () => undefined }));
      expect(String(pty)).toMatch(/PTY sessions are not supported by clade/);
      const user = await rejection(sb.commands.run('true', { user: 'user' }));
      expect(user).toBeInstanceOf(InvalidArgumentError);
    } finally {
      await sb.kill();
    }
    expect(registry.size).toBe(0);
  });

  it('bad keys, ids, tokens and envelopes get the client\'s error types and change nothing', async () => {
    expect(await rejection(Sandbox.create({ ...opts(), apiKey: 'wrong' }))).toBeInstanceOf(AuthenticationError);
    expect(await rejection(Sandbox.list({ ...opts(), apiKey: 'wrong' }).nextItems())).toBeInstanceOf(AuthenticationError);
    expect(await rejection(Sandbox.connect('sb-000000000000', opts()))).toBeInstanceOf(SandboxNotFoundError);
    expect(await rejection(Sandbox.getInfo('sb-000000000000', opts()))).toBeInstanceOf(SandboxNotFoundError);
    expect(registry.size).toBe(0);

    const sb = await Sandbox.create(opts());
    try {
      const stranger = new Sandbox({ ...opts(), sandboxId: sb.sandboxId, envdVersion: '0.6.4', envdAccessToken: 'not-its-token' });
      expect(await rejection(stranger.files.list('/'))).toBeInstanceOf(AuthenticationError);
      expect(await rejection(stranger.commands.run('echo hi'))).toBeInstanceOf(AuthenticationError);
      expect(await rejection(stranger.files.read('/etc/hostname'))).toBeInstanceOf(AuthenticationError);
      const gone = new Sandbox({ ...opts(), sandboxId: 'sb-000000000000', envdVersion: '0.6.4', envdAccessToken: 'x' });
      expect(await rejection(gone.commands.run('echo hi'))).toBeInstanceOf(SandboxError);

      const token = (sb as unknown as { envdAccessToken: string }).envdAccessToken;
      const headers = { 'e2b-sandbox-id': sb.sandboxId, 'e2b-sandbox-port': '49983', 'x-access-token': token, 'connect-protocol-version': '1' };
      // An envelope that announces more bytes than it carries.
      const short = await raw('/process.Process/Start', { ...headers, 'content-type': 'application/connect+json' }, Buffer.concat([Buffer.from([0, 0, 0, 0, 100]), Buffer.from('{}')]));
      expect(short.text).toMatch(/"code":"invalid_argument"/);
      // A compressed envelope nobody negotiated, and JSON that is not the message.
      const compressed = await raw('/process.Process/Start', { ...headers, 'content-type': 'application/connect+json' }, Buffer.concat([Buffer.from([1, 0, 0, 0, 2]), Buffer.from('{}')]));
      expect(compressed.text).toMatch(/"code":"(invalid_argument|internal|unimplemented)"/);
      const notJson = await raw('/filesystem.Filesystem/Stat', { ...headers, 'content-type': 'application/json' }, '{"path":');
      expect(notJson.status).toBe(400);
      expect(JSON.parse(notJson.text).code).toBe('invalid_argument');
      const noId = await raw('/filesystem.Filesystem/Stat', { 'content-type': 'application/json' }, '{"path":"/"}');
      expect(noId.status).toBe(400);
      // The sandbox still answers: the in-memory guest knows no bash, so the command ends with 127 through the whole stream.
      expect(await sb.isRunning()).toBe(true);
      const ran = await rejection(sb.commands.run('echo hi'));
      expect(ran).toBeInstanceOf(CommandExitError);
      expect((ran as CommandExitError).exitCode).toBe(127);
      expect(registry.size).toBe(1);
    } finally {
      await sb.kill();
    }
  });
  it('header-less file links are served only with the signature the client made for them', async () => {
    const sb = await Sandbox.create(opts());
    try {
      const link = new URL(await sb.downloadUrl('/etc/hostname'));
      expect(link.searchParams.get('signature')).toMatch(/^v1_/);
      const signed = await raw(`${link.pathname}${link.search}`, {}, '', 'GET');
      // The in-memory guest cannot stat files: what matters is that the link got past the checks to the guest.
      expect(signed.status, signed.text).not.toBe(401);
      expect(signed.text).not.toMatch(/E2b-Sandbox-Id|signature/);
      link.searchParams.set('path', '/etc/shadow');
      const moved = await raw(`${link.pathname}${link.search}`, {}, '', 'GET');
      expect(moved.status).toBe(401);
      const upload = new URL(await sb.uploadUrl('/tmp/up'));
      const readWithWriteLink = await raw(`${upload.pathname}${upload.search}`, {}, '', 'GET');
      expect(readWithWriteLink.status).toBe(401);
    } finally {
      await sb.kill();
    }
  });
});
