import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { InMemoryTransport } from '@modelcontextprotocol/sdk/inMemory.js';
import { pino } from 'pino';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { ConcurrencyGate, type DaemonContext } from '../../src/api/context.js';
import { Metrics } from '../../src/api/metrics.js';
import { SandboxRegistry } from '../../src/api/registry.js';
import { StateStore } from '../../src/api/state.js';
import { SandboxManager } from '../../src/core/manager.js';
import { createTemplate } from '../../src/core/templates.js';
import { DaemonBackend } from '../../src/mcp/daemon-backend.js';
import { buildMcpServer, MAX_TOOL_OUTPUT_CHARS, truncate } from '../../src/mcp/tools.js';
import { FakeEngine, fakeImage } from '../helpers/fake-engine.js';

// clade's MCP tools through the MCP SDK's own client (in-memory transport),
// on the daemon backend over a fake engine: the tool list, a fork through the
// tools, input validation and errors as tool errors. The same tools over the
// daemon's HTTP endpoint and `clade mcp` run against real VMs in
// test/e2b/e2b-clients.test.ts.

const saved = { ...process.env };
const home = mkdtempSync(join(tmpdir(), 'clade-mcp-unit-'));
let engine: FakeEngine;
let registry: SandboxRegistry;
let client: Client;

type ToolAnswer = { content: { type: string; text: string }[]; isError?: boolean };
const call = async (name: string, args: Record<string, unknown>) => (await client.callTool({ name, arguments: args })) as ToolAnswer;
const text = (a: ToolAnswer) => a.content.map((c) => c.text).join('');

beforeAll(async () => {
  process.env.CLADE_HOME = home;
  fakeImage();
  engine = new FakeEngine();
  const log = pino({ level: 'silent' });
  registry = new SandboxRegistry(new SandboxManager({ qemu: engine }, { requestMs: 3000 }), new StateStore(join(home, 'state')), 8, log);
  const ctx: DaemonContext = { registry, metrics: new Metrics(() => registry.size, () => 0), forkGate: new ConcurrencyGate(2, 'forks', 5000), defaultTimeoutMs: 0, startedAt: Date.now(), version: 'test' };
  const server = buildMcpServer(new DaemonBackend(ctx));
  const [clientSide, serverSide] = InMemoryTransport.createLinkedPair();
  await server.connect(serverSide);
  client = new Client({ name: 'clade-test', version: '0' });
  await client.connect(clientSide);
});

afterAll(async () => {
  await client.close();
  await Promise.all(registry.manager.list().map((sb) => sb.kill()));
  process.env = saved;
  rmSync(home, { recursive: true, force: true });
});

describe('clade MCP tools (fake engine)', () => {
  it('lists its tools with input schemas', async () => {
    const { tools } = await client.listTools();
    expect(tools.map((t) => t.name).sort()).toEqual(
      ['create_sandbox', 'fork_sandbox', 'kill_sandbox', 'list_files', 'list_sandboxes', 'read_file', 'run_code', 'run_command', 'snapshot_sandbox', 'start_from_snapshot', 'write_file'].sort(),
    );
    const fork = tools.find((t) => t.name === 'fork_sandbox')!;
    expect(fork.inputSchema.required).toContain('sandboxId');
  });

  it('creates a sandbox, forks it into three through the tools and kills them', async () => {
    const created = JSON.parse(text(await call('create_sandbox', {}))) as { sandboxId: string };
    expect(text(await call('run_command', { sandboxId: created.sandboxId, command: 'echo from mcp' }))).toBe('exit code: 0\nstdout:\nfrom mcp\n');
    const forked = await call('fork_sandbox', { sandboxId: created.sandboxId, count: 3 });
    expect(forked.isError).toBeFalsy();
    const kids = JSON.parse(text(forked)) as { sandboxId: string }[];
    expect(kids).toHaveLength(3);
    for (const k of kids) expect(text(await call('run_command', { sandboxId: k.sandboxId, command: 'hostname' }))).toContain(k.sandboxId);
    const listed = JSON.parse(text(await call('list_sandboxes', {}))) as { sandboxId: string; parentId?: string }[];
    expect(listed.filter((s) => s.parentId === created.sandboxId)).toHaveLength(3);
    for (const s of [created, ...kids]) expect(text(await call('kill_sandbox', { sandboxId: s.sandboxId }))).toBe(`killed ${s.sandboxId}`);
    expect(registry.size).toBe(0);
  });

  it('snapshots a sandbox and starts copies of it through the tools', async () => {
    const sb = JSON.parse(text(await call('create_sandbox', {}))) as { sandboxId: string };
    const snap = JSON.parse(text(await call('snapshot_sandbox', { sandboxId: sb.sandboxId, tag: 'mcp-unit' }))) as { tag: string };
    expect(snap.tag).toBe('mcp-unit');
    const started = JSON.parse(text(await call('start_from_snapshot', { tag: 'mcp-unit', count: 2 }))) as { sandboxId: string }[];
    expect(started).toHaveLength(2);
    const listed = JSON.parse(text(await call('list_sandboxes', {}))) as { sandboxId: string; snapshotTag?: string }[];
    const tagged = listed.filter((s) => s.snapshotTag === 'mcp-unit').map((s) => s.sandboxId);
    for (const s of started) expect(tagged).toContain(s.sandboxId);
    const again = JSON.parse(text(await call('create_sandbox', { snapshot: 'mcp-unit' }))) as { sandboxId: string };
    const missing = await call('start_from_snapshot', { tag: 'no-such-tag', count: 1 });
    expect(missing.isError).toBe(true);
    for (const s of [sb, again, ...started]) await call('kill_sandbox', { sandboxId: s.sandboxId });
    expect(registry.size).toBe(0);
  });

  it('creates a sandbox from a template, and refuses mixed sources and bad networks before anything starts', async () => {
    await createTemplate(registry.manager, { name: 'mcp-unit-tpl', env: { FROM_TEMPLATE: '1' } });
    const sb = JSON.parse(text(await call('create_sandbox', { template: 'mcp-unit-tpl' }))) as { sandboxId: string; snapshotTag?: string };
    expect(sb.snapshotTag).toBe('mcp-unit-tpl');
    await call('kill_sandbox', { sandboxId: sb.sandboxId });
    const both = await call('create_sandbox', { image: 'default', template: 'mcp-unit-tpl' });
    expect(both.isError).toBe(true);
    expect(text(both)).toMatch(/give one of image, template or snapshot, not image and template/);
    const snapNet = await call('create_sandbox', { snapshot: 'mcp-unit-tpl', egress: 'all' });
    expect(snapNet.isError).toBe(true);
    expect(text(snapNet)).toMatch(/keep the network it was taken with/);
    const badEntry = await call('create_sandbox', { egress: ['not a host'] });
    expect(badEntry.isError).toBe(true);
    expect(text(badEntry)).toMatch(/is not a host name/);
    const badPort = await call('create_sandbox', { ports: [70000] });
    expect(badPort.isError).toBe(true);
    expect(registry.size).toBe(0);
  });

  it('answers bad input and failures as tool errors, changing nothing', async () => {
    const badId = await call('run_command', { sandboxId: 'not-an-id', command: 'echo' });
    expect(badId.isError).toBe(true);
    expect(text(badId)).toMatch(/sb-0123456789ab/);
    const badCount = await call('fork_sandbox', { sandboxId: 'sb-000000000000', count: 0 });
    expect(badCount.isError).toBe(true);
    const missing = await call('kill_sandbox', { sandboxId: 'sb-000000000000' });
    expect(missing.isError).toBe(true);
    expect(text(missing)).toMatch(/sb-000000000000/);
    const failed = await call('run_command', { sandboxId: 'sb-000000000000', command: 'echo' });
    expect(failed.isError).toBe(true);
    expect(registry.size).toBe(0);
    // A command that fails is a tool error whose text still says how it ended.
    const sb = JSON.parse(text(await call('create_sandbox', {}))) as { sandboxId: string };
    const nonzero = await call('run_command', { sandboxId: sb.sandboxId, command: 'no-such-command' });
    expect(nonzero.isError).toBe(true);
    expect(text(nonzero)).toMatch(/^exit code: 127/);
    await call('kill_sandbox', { sandboxId: sb.sandboxId });
  });

  it('cuts long output, keeping its start and end, with a note', () => {
    const long = 'a'.repeat(MAX_TOOL_OUTPUT_CHARS) + 'MIDDLE' + 'z'.repeat(MAX_TOOL_OUTPUT_CHARS);
    const cut = truncate(long);
    expect(cut.length).toBeLessThan(MAX_TOOL_OUTPUT_CHARS + 200);
    expect(cut.startsWith('aaaa')).toBe(true);
    expect(cut.endsWith('zzzz')).toBe(true);
    expect(cut).toMatch(/\[clade: \d+ characters left out of \d+;/);
    expect(truncate('short')).toBe('short');
  });
});
