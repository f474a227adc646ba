import { randomBytes } from 'node:crypto';
import { rmSync } from 'node:fs';
import { request } from 'node:http';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { Sandbox } from '@e2b/code-interpreter';
import { AuthenticationError, CommandExitError, FileNotFoundError, Sandbox as BaseSandbox, SandboxError, SandboxNotFoundError } from 'e2b';
import { Client } from '@modelcontextprotocol/sdk/client/index.js';
import { StdioClientTransport } from '@modelcontextprotocol/sdk/client/stdio.js';
import { StreamableHTTPClientTransport } from '@modelcontextprotocol/sdk/client/streamableHttp.js';
import { join } from 'node:path';
import { removeSnapshot } from '../../src/core/snapshots.js';
import { Sandbox as CladeSandbox } from '../../src/sdk/index.js';
import { TestDaemon } from '../helpers/daemon.js';
import { leftNothing, remains, waitFor } from '../helpers/leaks.js';

// The unmodified E2B clients (pinned devDependencies) against `clade serve
// --e2b` with real VMs: one sandbox made through E2B's create, forks of it,
// and the error types the clients raise for bad input.

const API_KEY = 'e2b_' + randomBytes(12).toString('hex');

async function rejection(p: Promise<unknown>): Promise<unknown> {
  return p.then(
    () => {
      throw new Error('expected a rejection');
    },
    (e: unknown) => e,
  );
}

/** A raw request to the E2B listener, for bodies no client would send. */
function raw(port: number, path: string, headers: Record<string, string>, body: Buffer): Promise<{ status: number; body: Buffer }> {
  return new Promise((resolve, reject) => {
    const req = request({ host: '127.0.0.1', port, method: 'POST', path, headers }, (res) => {
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks) }));
    });
    req.on('error', reject);
    req.end(body);
  });
}

describe('E2B clients against clade serve --e2b (real VMs)', () => {
  const daemon = new TestDaemon(['--e2b-listen', '127.0.0.1:0', '--e2b-api-key', API_KEY, '--stop-on-exit']);
  const saved = { ...process.env };
  let port = 0;
  let sbx: Sandbox;
  const ids = new Set<string>();
  const snapshotTag = `e2b-test-${randomBytes(4).toString('hex')}`;

  beforeAll(async () => {
    await daemon.start();
    port = Number(/"e2b":(\d+)/.exec(daemon.log)?.[1]);
    expect(port).toBeGreaterThan(0);
    // The two variables a user sets to switch (plus any key, here the one the daemon requires).
    process.env.E2B_API_URL = `http://127.0.0.1:${port}`;
    process.env.E2B_SANDBOX_URL = `http://127.0.0.1:${port}`;
    process.env.E2B_API_KEY = API_KEY;
    sbx = await Sandbox.create({ metadata: { suite: 'e2b' }, timeoutMs: 600_000 });
    ids.add(sbx.sandboxId);
  });

  afterAll(async () => {
    await daemon.stop('SIGTERM');
    rmSync(daemon.dir, { recursive: true, force: true });
    process.env = saved;
    try {
      removeSnapshot(snapshotTag);
    } catch {
      // deleted by the test, as it should be
    }
    for (const id of ids) expect(await waitFor(() => leftNothing(id)), `left behind: ${remains(id).join(', ')}`).toBe(true);
  });

  it('runs commands in the foreground with streaming callbacks', async () => {
    const out: string[] = [];
    const err: string[] = [];
    const r = await sbx.commands.run('echo hi; echo oops >&2; printf "%s" "$GREETING"', { envs: { GREETING: 'hello' }, onStdout: (d) => void out.push(d), onStderr: (d) => void err.push(d) });
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toBe('hi\nhello');
    expect(r.stderr).toBe('oops\n');
    expect(out.join('')).toBe('hi\nhello');
    expect(err.join('')).toBe('oops\n');
    expect((await sbx.commands.run('pwd', { cwd: '/tmp' })).stdout).toBe('/tmp\n');
  });

  it('a failing command is a CommandExitError with its exit code and output', async () => {
    const e = await rejection(sbx.commands.run('echo before; exit 3'));
    expect(e).toBeInstanceOf(CommandExitError);
    expect((e as CommandExitError).exitCode).toBe(3);
    expect((e as CommandExitError).stdout).toBe('before\n');
  });

  it('background commands take stdin, are listed and are killed', async () => {
    const h = await sbx.commands.run('cat', { background: true, stdin: true });
    expect(h.pid).toBeGreaterThan(0);
    const got: string[] = [];
    const h2 = await sbx.commands.connect(h.pid, { onStdout: (d) => void got.push(d) });
    await h.sendStdin('ping\n');
    expect(await waitFor(() => got.join('') === 'ping\n', 20_000)).toBe(true);
    expect((await sbx.commands.list()).map((p) => p.pid)).toContain(h.pid);
    expect(await h.kill()).toBe(true);
    const e = await rejection(h.wait());
    expect(e).toBeInstanceOf(CommandExitError);
    expect((e as CommandExitError).exitCode).toBe(-1);
    void h2.wait().catch(() => undefined);
    expect(await sbx.commands.kill(h.pid)).toBe(false);
  });

  it('writes, reads, lists, renames and removes files (text, binary, 10 MiB)', async () => {
    await sbx.files.write('/tmp/e2b/a.txt', 'hello file');
    expect(await sbx.files.read('/tmp/e2b/a.txt')).toBe('hello file');
    const big = randomBytes(10 * 1024 * 1024);
    await sbx.files.write('/tmp/e2b/big.bin', big.buffer.slice(big.byteOffset, big.byteOffset + big.length) as ArrayBuffer);
    const back = Buffer.from(await sbx.files.read('/tmp/e2b/big.bin', { format: 'bytes' }));
    expect(back.equals(big)).toBe(true);
    await sbx.files.write([
      { path: '/tmp/e2b/m1', data: 'one' },
      { path: '/tmp/e2b/m2', data: 'two' },
    ]);
    // Each part's filename is its whole path (not only its last component).
    expect(await sbx.files.read('/tmp/e2b/m1')).toBe('one');
    expect(await sbx.files.read('/tmp/e2b/m2')).toBe('two');
    expect(await sbx.files.makeDir('/tmp/e2b/sub')).toBe(true);
    expect(await sbx.files.makeDir('/tmp/e2b/sub')).toBe(false);
    const listed = await sbx.files.list('/tmp/e2b');
    expect(listed.map((e) => e.name).sort()).toEqual(['a.txt', 'big.bin', 'm1', 'm2', 'sub']);
    expect(listed.find((e) => e.name === 'big.bin')?.size).toBe(big.length);
    expect(listed.find((e) => e.name === 'sub')?.type).toBe('dir');
    const moved = await sbx.files.rename('/tmp/e2b/a.txt', '/tmp/e2b/sub/b.txt');
    expect(moved.path).toBe('/tmp/e2b/sub/b.txt');
    expect(await sbx.files.exists('/tmp/e2b/a.txt')).toBe(false);
    expect(await sbx.files.exists('/tmp/e2b/sub/b.txt')).toBe(true);
    await sbx.files.remove('/tmp/e2b/sub');
    expect(await sbx.files.exists('/tmp/e2b/sub')).toBe(false);
    expect(await rejection(sbx.files.read('/tmp/e2b/nothing'))).toBeInstanceOf(FileNotFoundError);
    const events: string[] = [];
    const watch = await sbx.files.watchDir('/tmp/e2b', (e) => void events.push(`${e.type} ${e.name}`));
    await sbx.files.write('/tmp/e2b/watched', 'x');
    expect(await waitFor(() => events.includes('create watched'), 10_000), events.join(', ')).toBe(true);
    await watch.stop();
    const [metrics] = await sbx.getMetrics();
    expect(metrics!.memTotal).toBeGreaterThan(0);
  });

  it('runCode keeps state between calls and reports an error with its traceback', async () => {
    const first = await sbx.runCode('x = 41\nprint("side")\nx + 1');
    expect(first.text).toBe('42');
    expect(first.logs.stdout.join('')).toBe('side\n');
    expect(first.error).toBeUndefined();
    const second = await sbx.runCode('x * 2');
    expect(second.text).toBe('82');
    expect(second.executionCount).toBe(first.executionCount! + 1);
    const bad = await sbx.runCode('def f():\n    raise ValueError("nope")\nf()');
    expect(bad.error?.name).toBe('ValueError');
    expect(bad.error?.value).toBe('nope');
    expect(bad.error?.traceback).toContain('ValueError');
    const ctx = await sbx.createCodeContext({ cwd: '/tmp' });
    await sbx.runCode('y = 7', { context: ctx });
    expect((await sbx.runCode('y', { context: ctx })).text).toBe('7');
    expect((await sbx.runCode('"y" in dir()')).text).toBe('False');
    await sbx.restartCodeContext(ctx);
    expect((await sbx.runCode('y', { context: ctx })).error?.name).toBe('NameError');
    await sbx.removeCodeContext(ctx);
    expect((await sbx.listCodeContexts()).map((c) => c.id)).not.toContain(ctx.id);
  });

  it('fork({count: 3}) gives three isolated copies of the running sandbox', async () => {
    await sbx.files.write('/tmp/fork-marker', 'parent');
    const kids = await sbx.fork({ count: 3 });
    for (const k of kids) if (!(k instanceof Error)) ids.add(k.sandboxId);
    expect(kids.every((k) => !(k instanceof Error))).toBe(true);
    const children = kids as Sandbox[];
    expect(new Set(children.map((c) => c.sandboxId)).size).toBe(3);
    // Each child has the parent's interpreter state and files, and its own from here on.
    await Promise.all(children.map((c, i) => c.files.write('/tmp/fork-marker', `child${i}`)));
    const values = await Promise.all(children.map(async (c, i) => (await c.runCode(`x = ${i}\nx`)).text));
    expect(values).toEqual(['0', '1', '2']);
    expect(await Promise.all(children.map((c) => c.files.read('/tmp/fork-marker')))).toEqual(['child0', 'child1', 'child2']);
    expect(await sbx.files.read('/tmp/fork-marker')).toBe('parent');
    expect((await sbx.runCode('x')).text).toBe('41');
    expect((await children[0]!.commands.run('echo child')).stdout).toBe('child\n');

    const listed = await Sandbox.list({ query: { metadata: { suite: 'e2b' } } }).nextItems();
    expect(listed.map((s) => s.sandboxId).sort()).toEqual([sbx.sandboxId, ...children.map((c) => c.sandboxId)].sort());
    await children[2]!.setTimeout(120_000);
    const info = await children[2]!.getInfo();
    expect(Date.parse(info.endAt.toString()) - Date.now()).toBeLessThanOrEqual(121_000);
    for (const c of children) expect(await c.kill()).toBe(true);
    expect(await BaseSandbox.kill(children[0]!.sandboxId)).toBe(false);
    expect(await rejection(children[0]!.commands.run('true'))).toBeInstanceOf(SandboxError);
  });

  it('bad input gets the clients\' own errors', async () => {
    expect(await rejection(Sandbox.connect('sb-000000000000'))).toBeInstanceOf(SandboxNotFoundError);
    expect(await rejection(Sandbox.create({ apiKey: 'wrong-key' }))).toBeInstanceOf(AuthenticationError);
    expect(await rejection(Sandbox.list({ apiKey: 'wrong-key' }).nextItems())).toBeInstanceOf(AuthenticationError);
    // The right sandbox with an envd token that is not its own.
    const stranger = new BaseSandbox({ sandboxId: sbx.sandboxId, envdVersion: '0.6.4', envdAccessToken: 'not-the-token' });
    expect(await rejection(stranger.commands.run('true'))).toBeInstanceOf(AuthenticationError);
    expect(await rejection(stranger.files.list('/'))).toBeInstanceOf(AuthenticationError);
    expect(await rejection(stranger.files.read('/etc/hostname'))).toBeInstanceOf(AuthenticationError);
    const headers = { 'E2b-Sandbox-Id': sbx.sandboxId, 'E2b-Sandbox-Port': '49983', 'Content-Type': 'application/connect+json', 'Connect-Protocol-Version': '1' };
    // A streaming call whose envelope says 100 bytes and carries 3: a Connect error, and the sandbox still works.
    const token = (sbx as unknown as { envdAccessToken: string }).envdAccessToken;
    const frame = Buffer.concat([Buffer.from([0, 0, 0, 0, 100]), Buffer.from('{}x')]);
    const malformed = await raw(port, '/process.Process/Start', { ...headers, 'X-Access-Token': token }, frame);
    const text = malformed.body.toString();
    expect(malformed.status === 200 ? text : JSON.stringify(JSON.parse(text))).toMatch(/invalid_argument|protocol error|premature eof/i);
    expect((await sbx.commands.run('echo still')).stdout).toBe('still\n');
  });

  it('reports the latency of commands.run("echo hi"): E2B client vs clade SDK on the same daemon', async () => {
    const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)]!;
    const time = async (fn: () => Promise<unknown>) => {
      const ms: number[] = [];
      for (let i = 0; i < 20; i++) {
        const t0 = performance.now();
        await fn();
        ms.push(performance.now() - t0);
      }
      return median(ms);
    };
    const clade = await CladeSandbox.connect(sbx.sandboxId, { daemon: `unix://${daemon.socket}` });
    const viaE2b = await time(() => sbx.commands.run('echo hi'));
    const viaClade = await time(() => clade.commands.run('echo hi'));
    console.log(`commands.run('echo hi'), median of 20: E2B client ${viaE2b.toFixed(1)} ms, clade SDK ${viaClade.toFixed(1)} ms`);
    expect((await sbx.commands.run('echo hi')).stdout).toBe('hi\n');
  });

  it('MCP clients (daemon HTTP endpoint and `clade mcp` on stdio) list the tools and fork through them', async () => {
    type ToolAnswer = { content: { text: string }[]; isError?: boolean };
    const text = (a: unknown) => (a as ToolAnswer).content.map((c) => c.text).join('');
    const noToken = await fetch(`http://127.0.0.1:${daemon.tcpPort}/mcp`, { method: 'POST', headers: { 'content-type': 'application/json', accept: 'application/json, text/event-stream' }, body: '{"jsonrpc":"2.0","id":1,"method":"tools/list"}' });
    expect(noToken.status).toBe(401);
    const http = new Client({ name: 'clade-test', version: '0' });
    await http.connect(new StreamableHTTPClientTransport(new URL(`http://127.0.0.1:${daemon.tcpPort}/mcp`), { requestInit: { headers: { authorization: `Bearer ${daemon.token()}` } } }));
    try {
      expect((await http.listTools()).tools.map((t) => t.name)).toContain('fork_sandbox');
      const forked = await http.callTool({ name: 'fork_sandbox', arguments: { sandboxId: sbx.sandboxId, count: 1 } });
      const [kid] = JSON.parse(text(forked)) as { sandboxId: string }[];
      ids.add(kid!.sandboxId);
      expect(text(await http.callTool({ name: 'run_code', arguments: { sandboxId: kid!.sandboxId, code: 'x' } }))).toBe('value: 41');
      expect(text(await http.callTool({ name: 'run_command', arguments: { sandboxId: kid!.sandboxId, command: 'echo via mcp' } }))).toBe('exit code: 0\nstdout:\nvia mcp\n');
      const bad = (await http.callTool({ name: 'read_file', arguments: { sandboxId: kid!.sandboxId, path: '/no/such/file' } })) as ToolAnswer;
      expect(bad.isError).toBe(true);
      expect(text(await http.callTool({ name: 'kill_sandbox', arguments: { sandboxId: kid!.sandboxId } }))).toBe(`killed ${kid!.sandboxId}`);
    } finally {
      await http.close();
    }
    // `clade mcp` over stdio, through the same daemon (no VM of its own).
    const stdio = new Client({ name: 'clade-test', version: '0' });
    const main = join(import.meta.dirname, '../../src/cli/main.ts');
    await stdio.connect(new StdioClientTransport({ command: process.execPath, args: ['--import', 'tsx', main, 'mcp'], env: { ...(process.env as Record<string, string>), CLADE_DAEMON: `unix://${daemon.socket}` }, stderr: 'ignore' }));
    try {
      const listed = JSON.parse(text(await stdio.callTool({ name: 'list_sandboxes', arguments: {} }))) as { sandboxId: string }[];
      expect(listed.map((s) => s.sandboxId)).toContain(sbx.sandboxId);
    } finally {
      await stdio.close();
    }
  });

  it('createSnapshot, then create from it as a template, list and delete it', async () => {
    const snap = await sbx.createSnapshot({ name: snapshotTag });
    expect(snap.snapshotId).toBe(snapshotTag);
    const listed = await Sandbox.listSnapshots({ sandboxId: sbx.sandboxId }).nextItems();
    expect(listed.map((s) => s.snapshotId)).toContain(snapshotTag);
    const copy = await Sandbox.create(snap.snapshotId);
    ids.add(copy.sandboxId);
    expect((await copy.runCode('x')).text).toBe('41');
    expect(await copy.kill()).toBe(true);
    expect(await Sandbox.deleteSnapshot(snapshotTag)).toBe(true);
    expect(await Sandbox.deleteSnapshot(snapshotTag)).toBe(false);
  });

  it("network.allowOut with all else denied gives the sandbox clade's default-deny network", async () => {
    const sb = await BaseSandbox.create({ network: { allowOut: ['allowed.example'], denyOut: ['0.0.0.0/0'] }, timeoutMs: 120_000 });
    ids.add(sb.sandboxId);
    const info = await sb.getInfo();
    expect(info.allowInternetAccess).toBe(false);
    expect(info.network).toMatchObject({ allowOut: ['allowed.example'], denyOut: ['0.0.0.0/0'] });
    expect((await sb.commands.run('cat /sys/class/net/eth0/address')).stdout.trim()).toBe('52:54:00:c1:ad:0f');
    // A name outside the list is not resolved: clade's DNS answers NXDOMAIN without asking anyone.
    const dns = await rejection(sb.commands.run(`python3 -c "import socket; socket.gethostbyname('blocked.example')"`));
    expect(dns).toBeInstanceOf(CommandExitError);
    expect((dns as CommandExitError).stderr).toMatch(/gaierror/);
    expect(await sb.kill()).toBe(true);
  });

  it('kill ends the sandbox; calls to it then fail as not running', async () => {
    expect(await sbx.kill()).toBe(true);
    expect(await rejection(Sandbox.connect(sbx.sandboxId))).toBeInstanceOf(SandboxNotFoundError);
    expect(await rejection(sbx.commands.run('true'))).toBeInstanceOf(SandboxError);
  });
});
