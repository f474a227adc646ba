import { mkdtempSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { FastifyInstance } from 'fastify';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import type { AgentClient } from '../../src/agent-protocol/client.js';
import { MessageType, Tag } from '../../src/agent-protocol/constants.js';
import { FieldWriter } from '../../src/agent-protocol/fields.js';
import { ConcurrencyGate, type DaemonContext } from '../../src/api/context.js';
import { Metrics } from '../../src/api/metrics.js';
import { SandboxRegistry } from '../../src/api/registry.js';
import { buildApp } from '../../src/api/server.js';
import { StateStore } from '../../src/api/state.js';
import { SandboxManager } from '../../src/core/manager.js';
import type { LiveSandbox } from '../../src/core/sandbox.js';
import { connectFake, FakeAgent, fakeLiveSandbox, rssMiB, type HostRequest } from '../helpers/fake-agent.js';

// The daemon in front of a hostile guest and of slow clients: its routes fail
// the one request concerned and stay up, and a client that does not read
// pauses the guest instead of growing the daemon's heap. No VM: the guest
// agent is played by the test.

const dir = mkdtempSync(join(tmpdir(), 'clade-hostile-daemon-'));
const socketPath = join(dir, 'd.sock');
let agent: FakeAgent;
let client: AgentClient;
let live: LiveSandbox;
let app: FastifyInstance;
let registry: SandboxRegistry;
/** What the fake guest does with each EXEC, by its shell command. */
const behaviours: Record<string, (req: HostRequest) => void> = {};

beforeAll(async () => {
  agent = new FakeAgent();
  await agent.start();
  agent.onRequest = (req) => {
    if (req.type === MessageType.EXEC) {
      const shell = req.body.subarray(6, 6 + req.body.readUInt32LE(2)).toString();
      agent.ok(req.id, new FieldWriter().u64(Tag.PID, 100));
      behaviours[shell]?.(req);
    } else if (req.type === MessageType.SIGNAL) {
      agent.ok(req.id);
      const target = Number(req.body.readBigUInt64LE(6));
      agent.send(MessageType.EXIT, target, new FieldWriter().u64(Tag.EXIT_CODE, -9).u64(Tag.SIGNAL, 9).toBuffer());
      stopFlood.add(target);
    }
  };
  client = await connectFake(agent, { requestMs: 3000 });
  live = fakeLiveSandbox(client);
  const log = pino({ level: 'silent' });
  registry = new SandboxRegistry(new SandboxManager({}), new StateStore(join(dir, 'state')), 10, log);
  const ctx: DaemonContext = { registry, metrics: new Metrics(() => registry.size, () => 0), forkGate: new ConcurrencyGate(2, 'forks', 5000), defaultTimeoutMs: 0, startedAt: Date.now(), version: 'test' };
  registry.add(live, 0);
  app = await buildApp(ctx, log);
  await app.listen({ path: socketPath });
});

afterAll(async () => {
  await app.close();
  await live.kill();
  client.close();
  await agent.stop();
  rmSync(dir, { recursive: true, force: true });
});

const stopFlood = new Set<number>();

/** Sends STDOUT frames of `size` bytes until the command is signalled, waiting whenever the host's socket is full. */
function flood(size: number) {
  return (req: HostRequest) =>
    void (async () => {
      const chunk = Buffer.alloc(size, 0x61);
      while (!stopFlood.has(req.id) && !agent.conn?.destroyed) if (!agent.send(MessageType.STDOUT, req.id, chunk)) await agent.drained();
    })();
}

function call(method: string, path: string, body?: object): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, method, path, headers: body ? { 'content-type': 'application/json' } : {} }, (res) => {
      let text = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (text += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, text }));
    });
    req.on('error', reject);
    req.end(body ? JSON.stringify(body) : undefined);
  });
}

const base = () => `/v1/sandboxes/${live.id}`;

describe('the daemon facing a hostile guest and slow clients', () => {
  it('answers a malformed guest reply with a clear 502 and keeps serving', async () => {
    behaviours['bad-exit'] = (req) => agent.send(MessageType.EXIT, req.id, Buffer.from([7, 7, 7]));
    const r = await call('POST', `${base()}/exec`, { cmd: 'bad-exit' });
    expect(r.status).toBe(502);
    expect(JSON.parse(r.text)).toMatchObject({ code: 'protocol_error' });
    expect((await call('GET', '/v1/health')).status).toBe(200);
  });

  it('pauses the guest while an NDJSON client does not read, in bounded memory, and kills the command when it hangs up', async () => {
    behaviours['flood'] = flood(64 * 1024);
    const before = rssMiB();
    const received = await new Promise<number>((resolve, reject) => {
      const req = request({ socketPath, method: 'POST', path: `${base()}/exec?stream=1`, headers: { 'content-type': 'application/json' } }, (res) => {
        let n = 0;
        res.once('data', (d: Buffer) => {
          n += d.length;
          res.pause(); // a client that stops reading
          setTimeout(() => {
            res.destroy();
            resolve(n);
          }, 3000);
        });
      });
      req.on('error', reject);
      req.end(JSON.stringify({ cmd: 'flood', timeoutMs: 0 }));
    });
    const grew = rssMiB() - before;
    console.log(`a client that stopped reading for 3 s while the guest flooded output: daemon RSS grew ${grew} MiB (bound 64 MiB)`);
    expect(received).toBeGreaterThan(0);
    expect(grew).toBeLessThan(64);
    // The hang-up killed the command, which released the paused channel: the daemon answers at once.
    await new Promise((r) => setTimeout(r, 200));
    expect((await call('GET', '/v1/health')).status).toBe(200);
    behaviours['quick'] = (req) => agent.send(MessageType.EXIT, req.id, new FieldWriter().u64(Tag.EXIT_CODE, 0).toBuffer());
    const r = await call('POST', `${base()}/exec`, { cmd: 'quick' });
    expect(JSON.parse(r.text)).toMatchObject({ exitCode: 0 });
  });

  it('keeps a bounded replay of a background command that prints a byte at a time', async () => {
    behaviours['drip'] = (req) =>
      void (async () => {
        for (let i = 0; i < 200_000 && !stopFlood.has(req.id); i++) if (!agent.send(MessageType.STDOUT, req.id, Buffer.from('x'))) await agent.drained();
        agent.send(MessageType.EXIT, req.id, new FieldWriter().u64(Tag.EXIT_CODE, 0).toBuffer());
      })();
    const started = JSON.parse((await call('POST', `${base()}/exec`, { cmd: 'drip', background: true })).text) as { commandId: string };
    const out = await call('GET', `${base()}/commands/${started.commandId}/output`);
    const lines = out.text.split('\n').filter((l) => l.trim());
    const text = lines.map((l) => (JSON.parse(l) as { stdout?: string }).stdout ?? '').join('');
    console.log(`200000 one-byte frames came back as ${lines.length} NDJSON lines`);
    expect(text.length).toBe(200_000);
    expect(lines.length).toBeLessThan(2000);
    expect(JSON.parse(lines.at(-1)!)).toMatchObject({ exit: { exitCode: 0 } });
  });
});
