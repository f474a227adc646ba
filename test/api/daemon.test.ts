import { request } from 'node:http';
import { existsSync, readdirSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { CladeError } from '../../src/util/errors.js';
import { Sandbox } from '../../src/sdk/index.js';
import { TestDaemon } from '../helpers/daemon.js';
import { leftNothing, remains, vmPids, waitFor } from '../helpers/leaks.js';
import { run } from '../helpers/run.js';

const MAIN = join(import.meta.dirname, '../../src/cli/main.ts');

type View = { sandboxId: string; parentId?: string; pid: number };
type Child = { sandboxId: string } | { error: { code: string; message: string } };
type Exec = { exitCode: number; stdout: string; stderr: string };

/** The error a call was rejected with, as a CladeError. */
async function failure(p: Promise<unknown>): Promise<CladeError> {
  const err = await p.then(() => undefined, (e: unknown) => e);
  expect(err).toBeInstanceOf(CladeError);
  return err as CladeError;
}

/**
 * Status of a request that announces a body too large to accept: the daemon
 * must refuse it from the header alone, before a byte of it is sent (sending
 * it anyway races the daemon's early close, EPIPE).
 */
function statusOfAnnouncedBody(socketPath: string, path: string, bytes: number): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, method: 'POST', path, headers: { 'content-type': 'application/json', 'content-length': bytes } }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
      req.destroy();
    });
    req.on('error', reject);
    req.flushHeaders();
  });
}

/** Raw status of a request, for bodies the typed client would never send. */
function rawStatus(socketPath: string, method: string, path: string, body: Buffer | string, contentType = 'application/json'): Promise<number> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, method, path, headers: { 'content-type': contentType } }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    req.on('error', reject);
    req.end(body);
  });
}

describe('clade serve (HTTP API, real VMs)', () => {
  // max-sandboxes 3: the parent and two forked children fill it.
  const daemon = new TestDaemon(['--max-sandboxes', '3', '--stop-on-exit']);
  const created = new Set<string>();
  let parent: View;

  beforeAll(async () => {
    await daemon.start();
    parent = await daemon.client().json<View>('POST', '/v1/sandboxes', { env: { MODE: 'api' }, timeoutMs: 600_000 });
    created.add(parent.sandboxId);
  });

  afterAll(async () => {
    try {
      await daemon.stop('SIGTERM'); // --stop-on-exit: every sandbox is killed
      for (const id of created) expect(await waitFor(() => leftNothing(id)), `left behind: ${remains(id).join(', ')}`).toBe(true);
      expect(existsSync(daemon.socket)).toBe(false);
      expect(readdirSync(join(daemon.stateDir, 'sandboxes'))).toEqual([]);
    } finally {
      rmSync(daemon.dir, { recursive: true, force: true });
    }
  });

  it('rejects malformed, oversized and out-of-range bodies; unknown ids are 404', async () => {
    const c = daemon.client();
    expect(await rawStatus(daemon.socket, 'POST', '/v1/sandboxes', '{not json')).toBe(400);
    expect(await statusOfAnnouncedBody(daemon.socket, '/v1/sandboxes', 9 << 20)).toBe(413);
    expect((await failure(c.json('POST', '/v1/sandboxes', { memoryMiB: 'lots' }))).code).toBe('bad_request');
    expect((await failure(c.json('POST', '/v1/sandboxes', { unknownField: 1 }))).code).toBe('bad_request');
    expect((await failure(c.json('POST', `/v1/sandboxes/${parent.sandboxId}/fork`, { count: 1001 }))).code).toBe('bad_request');
    expect((await failure(c.json('GET', '/v1/sandboxes/sb-000000000000'))).code).toBe('not_found');
    expect((await failure(c.json('POST', '/v1/sandboxes/sb-000000000000/exec', { cmd: 'true' }))).code).toBe('not_found');
    expect((await failure(c.json('GET', '/v1/snapshots/no-such-tag'))).code).toBe('not_found');
  });

  it('TCP requires the bearer token: 401 without it or with a wrong one', async () => {
    expect((await failure(daemon.tcpClient().json('GET', '/v1/health'))).code).toBe('auth');
    expect((await failure(daemon.tcpClient('0'.repeat(64)).json('GET', '/v1/health'))).code).toBe('auth');
    expect(await daemon.tcpClient(daemon.token()).json('GET', '/v1/health')).toMatchObject({ ok: true });
  });

  it('lifecycle over HTTP: exec, files, runCode, list, describe', async () => {
    const c = daemon.client();
    const id = parent.sandboxId;
    const r = await c.json<Exec>('POST', `/v1/sandboxes/${id}/exec`, { cmd: 'echo $MODE $X; cat; echo err >&2; exit 3', envs: { X: 'y' }, stdin: 'from-stdin\n' });
    expect(r).toMatchObject({ exitCode: 3, stdout: 'api y\nfrom-stdin\n', stderr: 'err\n' });
    expect(await c.json<Exec>('POST', `/v1/sandboxes/${id}/exec`, { cmd: ['pwd'], cwd: '/tmp' })).toMatchObject({ stdout: '/tmp\n' });

    const bytes = Buffer.from([0, 1, 2, 255]);
    await c.json('PUT', `/v1/sandboxes/${id}/files?path=/root/d/x.bin`, bytes);
    expect(await c.bytes('GET', `/v1/sandboxes/${id}/files?path=/root/d/x.bin`)).toEqual(bytes);
    expect(await c.json('GET', `/v1/sandboxes/${id}/files/stat?path=/root/d/x.bin`)).toMatchObject({ type: 'file', size: 4 });
    expect(await c.json('POST', `/v1/sandboxes/${id}/files/mkdir`, { path: '/root/d/sub' })).toEqual({ created: true });
    expect((await c.json<{ name: string }[]>('GET', `/v1/sandboxes/${id}/files/list?path=/root/d`)).map((e) => e.name)).toEqual(['sub', 'x.bin']);
    await c.json('DELETE', `/v1/sandboxes/${id}/files?path=/root/d`);
    expect((await failure(c.json('GET', `/v1/sandboxes/${id}/files/stat?path=/root/d`))).code).toBe('not_found');

    expect(await c.json('POST', `/v1/sandboxes/${id}/code`, { code: 'counter = 41\ncounter' })).toMatchObject({ value: '41' });
    expect((await c.json<View[]>('GET', '/v1/sandboxes')).map((s) => s.sandboxId)).toContain(id);
    expect(await c.json('GET', `/v1/sandboxes/${id}`)).toMatchObject({ sandboxId: id, pid: expect.any(Number) });
  });

  it('streams exec output as NDJSON before the command ends', async () => {
    const lines: { at: number; line: Record<string, unknown> }[] = [];
    const t0 = Date.now();
    await daemon.client().ndjson('POST', `/v1/sandboxes/${parent.sandboxId}/exec?stream=1`, { cmd: 'echo first; sleep 2; echo second >&2; exit 4' }, (line) => lines.push({ at: Date.now() - t0, line }));
    expect(lines.map((l) => l.line)).toEqual([{ stdout: 'first\n' }, { stderr: 'second\n' }, { exit: { exitCode: 4 } }]);
    expect(lines[2]!.at - lines[0]!.at).toBeGreaterThan(1500);
  });

  it('forks through the API with per-child results, and enforces --max-sandboxes with 503', async () => {
    const c = daemon.client();
    const kids = await c.json<Child[]>('POST', `/v1/sandboxes/${parent.sandboxId}/fork`, { count: 2 });
    expect(kids).toHaveLength(2);
    const ids = kids.map((k) => ('sandboxId' in k ? k.sandboxId : JSON.stringify(k.error)));
    ids.forEach((id) => created.add(id));
    for (const id of ids) {
      expect(await c.json('POST', `/v1/sandboxes/${id}/code`, { code: 'counter + 1' })).toMatchObject({ value: '42' });
      expect(await c.json<Exec>('POST', `/v1/sandboxes/${id}/exec`, { cmd: 'hostname' })).toMatchObject({ stdout: `${id}\n` });
    }
    expect((await c.json<View[]>(`GET`, `/v1/sandboxes?parentId=${parent.sandboxId}`)).map((s) => s.sandboxId).sort()).toEqual([...ids].sort());

    const full = await failure(c.json('POST', '/v1/sandboxes', {}));
    expect(full.code).toBe('unavailable');
    expect(full.message).toMatch(/at most 3 sandboxes/);
    expect((await failure(c.json('POST', `/v1/sandboxes/${parent.sandboxId}/fork`, { count: 1 }))).code).toBe('unavailable');

    for (const id of ids) await c.json('DELETE', `/v1/sandboxes/${id}`);
    for (const id of ids) expect(await waitFor(() => leftNothing(id)), `left behind: ${remains(id).join(', ')}`).toBe(true);
    expect((await failure(c.json('GET', `/v1/sandboxes/${ids[0]}`))).code).toBe('not_found');
  });

  it('snapshots through the API, starts from the snapshot (whose lifetime then ends it), never shows the agent token', async () => {
    const c = daemon.client();
    const tag = `api-test-${process.pid}`;
    try {
      expect(await c.json('POST', `/v1/sandboxes/${parent.sandboxId}/snapshot`, { tag })).toMatchObject({ tag, sandboxId: parent.sandboxId });
      expect((await failure(c.json('POST', `/v1/sandboxes/${parent.sandboxId}/snapshot`, { tag }))).code).toBe('conflict');
      const inspected = await c.json<Record<string, unknown>>('GET', `/v1/snapshots/${tag}`);
      expect(inspected).toMatchObject({ tag, verified: true });
      expect(inspected.agent).toBeUndefined();
      const [started] = await c.json<Child[]>('POST', `/v1/snapshots/${tag}/start`, { count: 1, timeoutMs: 4000 });
      expect(started).toHaveProperty('sandboxId');
      const id = (started as { sandboxId: string }).sandboxId;
      created.add(id);
      expect(await c.json('POST', `/v1/sandboxes/${id}/code`, { code: 'counter' })).toMatchObject({ value: '41' });
      expect((await c.json<View[]>('GET', `/v1/sandboxes?snapshotTag=${tag}`)).map((s) => s.sandboxId)).toContain(id);
      // Its lifetime (timeoutMs) ends it without a DELETE.
      expect(await waitFor(() => leftNothing(id), 15_000), `left behind: ${remains(id).join(', ')}`).toBe(true);
      expect((await failure(c.json('GET', `/v1/sandboxes/${id}`))).code).toBe('not_found');
    } finally {
      await c.json('DELETE', `/v1/snapshots/${tag}`).catch(() => undefined);
    }
    expect((await failure(c.json('GET', `/v1/snapshots/${tag}`))).code).toBe('not_found');
  });

  it('the SDK drives a daemon sandbox with the same API and error codes', async () => {
    const daemonUrl = `unix://${daemon.socket}`;
    const sb = await Sandbox.connect(parent.sandboxId, { daemon: daemonUrl });
    const chunks: string[] = [];
    expect(await sb.commands.run('echo a; sleep 1; echo b', { onStdout: (d) => chunks.push(d) })).toMatchObject({ exitCode: 0, stdout: 'a\nb\n' });
    expect(chunks).toEqual(['a\n', 'b\n']);
    await sb.files.write('/root/remote.txt', 'hi');
    expect(await sb.files.read('/root/remote.txt')).toBe('hi');
    expect(await sb.files.exists('/root/nope')).toBe(false);
    expect((await sb.runCode('counter')).value).toBe('41');
    await expect(Sandbox.connect('sb-000000000000', { daemon: daemonUrl })).rejects.toMatchObject({ code: 'not_found' });

    // runCode output streams while the code runs.
    const printed: { at: number; text: string }[] = [];
    const t0 = Date.now();
    const code = await sb.runCode('import time\nprint("early", flush=True)\ntime.sleep(1.5)\nprint("late")\n7', { onStdout: (text) => printed.push({ at: Date.now() - t0, text }) });
    expect(code).toMatchObject({ value: '7', stdout: 'early\nlate\n' });
    expect(printed[0]!.text).toMatch(/^early/); // print() may write the newline separately
    expect(Date.now() - t0 - printed[0]!.at).toBeGreaterThan(1000);

    // A new lifetime, counted from now, through the daemon.
    await sb.setTimeout(123_000);
    const expires = Date.parse((await daemon.client().json<{ expiresAt: string }>('GET', `/v1/sandboxes/${sb.sandboxId}`)).expiresAt);
    expect(Math.abs(expires - (Date.now() + 123_000))).toBeLessThan(5000);
    await sb.setTimeout(600_000);
    await expect(sb.setTimeout(-1)).rejects.toMatchObject({ code: 'bad_request' });

    // Pre-started slots for the forks below, as in embedded mode.
    await sb.prewarmForks(1);

    // Two forks of one sandbox at once: the daemon runs them one after the other.
    const kids = (await Promise.all([sb.fork(1), sb.fork(1)])).flat();
    for (const kid of kids) {
      expect(kid).toBeInstanceOf(Sandbox);
      const child = kid as Sandbox;
      created.add(child.sandboxId);
      expect(child.getInfo()).toMatchObject({ parentId: parent.sandboxId });
      expect((await child.commands.run('hostname')).stdout).toBe(`${child.sandboxId}\n`);
      await child.kill();
      expect(await child.isRunning()).toBe(false);
    }
    expect((await sb.commands.run('echo parent-ok')).stdout).toBe('parent-ok\n');
  });

  it('background commands through the daemon: stdin, output while running, kill, reattach', async () => {
    const sb = await Sandbox.connect(parent.sandboxId, { daemon: `unix://${daemon.socket}` });
    const seen: string[] = [];
    const cat = await sb.commands.run('cat; echo done >&2', { background: true, stdin: true, onStdout: (d) => seen.push(d) });
    expect(cat.pid).toBeGreaterThan(1);
    await cat.sendStdin('ping\n');
    expect(await waitFor(() => cat.stdout === 'ping\n', 10_000)).toBe(true);
    expect(seen).toEqual(['ping\n']);
    await cat.closeStdin();
    expect(await cat.wait()).toMatchObject({ exitCode: 0, stdout: 'ping\n', stderr: 'done\n' });

    const sleeper = await sb.commands.run('sleep 300', { background: true });
    expect(await sleeper.kill()).toBe(true);
    expect((await sleeper.wait()).exitCode).not.toBe(0);
    expect(await sleeper.kill()).toBe(false);

    // Another client attaches after the end and gets the whole output again.
    const c = daemon.client();
    const listed = await c.json<{ commandId: string; running: boolean; exit?: { exitCode: number } }[]>('GET', `/v1/sandboxes/${parent.sandboxId}/commands`);
    expect(listed.length).toBeGreaterThanOrEqual(2);
    expect(listed.every((cmd) => !cmd.running)).toBe(true);
    const replay: Record<string, unknown>[] = [];
    await c.ndjson('GET', `/v1/sandboxes/${parent.sandboxId}/commands/${listed[0]!.commandId}/output`, undefined, (line) => replay.push(line));
    expect(replay).toEqual([{ stdout: 'ping\n' }, { stderr: 'done\n' }, { exit: { exitCode: 0 } }]);
    await c.json('DELETE', `/v1/sandboxes/${parent.sandboxId}/commands/${listed[0]!.commandId}`);
    expect((await failure(c.json('GET', `/v1/sandboxes/${parent.sandboxId}/commands/${listed[0]!.commandId}`))).code).toBe('not_found');
    expect((await failure(c.json('POST', `/v1/sandboxes/${parent.sandboxId}/exec`, { cmd: 'cat', stdin: true }))).code).toBe('bad_request');
  });

  it('the CLI lists, forks and runs through the daemon', async () => {
    const env = { ...process.env, CLADE_DAEMON: `unix://${daemon.socket}` };
    const clade = (args: string[], cliEnv: NodeJS.ProcessEnv = env) => run(process.execPath, ['--import', 'tsx', MAIN, ...args], { env: cliEnv, timeoutMs: 120_000 });
    const cli = (args: string[]) => clade(['--json', ...args]);
    expect((JSON.parse((await cli(['ps'])).stdout) as View[]).map((s) => s.sandboxId)).toContain(parent.sandboxId);
    const forked = await cli(['fork', parent.sandboxId, '-n', '1']);
    expect(forked.status).toBe(0);
    const [kid] = JSON.parse(forked.stdout) as { sandboxId: string }[];
    created.add(kid!.sandboxId);
    expect((await clade(['ps'])).stdout).toContain(kid!.sandboxId);
    const ran = await clade(['run', '--', 'sh', '-c', 'echo via-daemon; exit 3']);
    expect(ran.stdout).toBe('via-daemon\n');
    expect(ran.status).toBe(3);
    const noDaemon = await clade(['ps'], { ...process.env, CLADE_HOME: daemon.dir });
    expect(noDaemon.status).toBe(1);
    expect(noDaemon.stderr).toMatch(/start one with `clade serve`/);
    return daemon.client().json('DELETE', `/v1/sandboxes/${kid!.sandboxId}`);
  });

  it('a SIGKILLed daemon restarts and adopts its running sandbox; lifetimes survive; a VM whose record is gone is removed', async () => {
    const c = daemon.client();
    const [orphan, shortLived] = await Promise.all([c.json<View>('POST', '/v1/sandboxes', {}), c.json<View & { expiresAt: string }>('POST', '/v1/sandboxes', { timeoutMs: 12_000 })]);
    created.add(orphan.sandboxId);
    created.add(shortLived.sandboxId);
    const lifetime = await c.json<{ expiresAt: string }>('PATCH', `/v1/sandboxes/${parent.sandboxId}`, { timeoutMs: 500_000 });
    await daemon.stop('SIGKILL');
    expect(vmPids(parent.sandboxId)).toHaveLength(1); // the VM outlives its daemon
    rmSync(join(daemon.stateDir, 'sandboxes', `${orphan.sandboxId}.json`));
    // The short lifetime ends while no daemon runs: the next one must not adopt it.
    await new Promise((r) => setTimeout(r, Math.max(0, Date.parse(shortLived.expiresAt) - Date.now() + 200)));

    await daemon.start();
    const after = daemon.client();
    expect((await after.json<View[]>('GET', '/v1/sandboxes')).map((s) => s.sandboxId)).toEqual([parent.sandboxId]);
    expect(await after.json('GET', `/v1/sandboxes/${parent.sandboxId}`)).toMatchObject({ expiresAt: lifetime.expiresAt });
    for (const gone of [orphan.sandboxId, shortLived.sandboxId]) expect(await waitFor(() => leftNothing(gone)), `left behind: ${remains(gone).join(', ')}`).toBe(true);
    // The same VM, with its processes and the interpreter's state.
    expect(await after.json<Exec>('POST', `/v1/sandboxes/${parent.sandboxId}/exec`, { cmd: 'echo $MODE' })).toMatchObject({ exitCode: 0, stdout: 'api\n' });
    expect(await after.json('POST', `/v1/sandboxes/${parent.sandboxId}/code`, { code: 'counter' })).toMatchObject({ value: '41' });
  });
});
