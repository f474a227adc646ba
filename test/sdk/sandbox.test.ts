import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MessageType, Tag } from '../../src/agent-protocol/constants.js';
import { FieldWriter } from '../../src/agent-protocol/fields.js';
import { encodeHeader, encodeHostFrame } from '../../src/agent-protocol/frame.js';
import { defaultManager } from '../../src/core/default.js';
import { CladeError, Sandbox } from '../../src/sdk/index.js';
import { leftNothing, vmPids } from '../helpers/leaks.js';

// One warm sandbox for the whole file: every test below runs in it.
let sb: Sandbox;
beforeAll(async () => {
  sb = await Sandbox.create({ env: { SANDBOX_WIDE: 'yes' } });
});
afterAll(async () => {
  const id = sb?.sandboxId;
  await sb?.kill();
  if (id) expect(leftNothing(id)).toBe(true);
});

describe('commands', () => {
  it('returns exit codes and output; a failing command is a result', async () => {
    const ok = await sb.commands.run('echo out; echo err >&2');
    expect(ok).toMatchObject({ exitCode: 0, stdout: 'out\n', stderr: 'err\n' });
    const bad = await sb.commands.run('exit 42');
    expect(bad.exitCode).toBe(42);
  });

  it('runs an argv without a shell', async () => {
    const r = await sb.commands.run(['printf', '%s|', 'a b', '$HOME', ';']);
    expect(r.stdout).toBe('a b|$HOME|;|');
  });

  it('streams output while the command runs, in order', async () => {
    const events: { data: string; at: number }[] = [];
    const start = Date.now();
    const r = await sb.commands.run('for i in 1 2 3 4 5; do echo line$i; sleep 0.2; done', { onStdout: (data) => events.push({ data, at: Date.now() - start }) });
    const text = events.map((e) => e.data).join('');
    expect(text).toBe('line1\nline2\nline3\nline4\nline5\n');
    expect(r.stdout).toBe(text);
    // The first line arrived well before the command ended.
    expect(events[0]!.at).toBeLessThan(events[events.length - 1]!.at - 400);
  });

  it('keeps stdout and stderr apart and each in order', async () => {
    const r = await sb.commands.run('for i in $(seq 1 200); do echo o$i; echo e$i >&2; done');
    expect(r.stdout.trim().split('\n')).toEqual(Array.from({ length: 200 }, (_, i) => `o${i + 1}`));
    expect(r.stderr.trim().split('\n')).toEqual(Array.from({ length: 200 }, (_, i) => `e${i + 1}`));
  });

  it('passes stdin, env and cwd', async () => {
    expect((await sb.commands.run('tr a-z A-Z', { stdin: 'hello stdin' })).stdout).toBe('HELLO STDIN');
    const env = await sb.commands.run('echo $FOO $SANDBOX_WIDE $CLADE_SANDBOX_ID', { envs: { FOO: 'bar' } });
    expect(env.stdout.trim()).toBe(`bar yes ${sb.sandboxId}`);
    await sb.files.makeDir('/tmp/wd');
    expect((await sb.commands.run('pwd', { cwd: '/tmp/wd' })).stdout).toBe('/tmp/wd\n');
  });

  it('kills a command that runs past its timeout', async () => {
    const t0 = Date.now();
    const r = await sb.commands.run('sleep 30; echo never', { timeoutMs: 500 });
    expect(r.timedOut).toBe(true);
    expect(r.stdout).toBe('');
    expect(Date.now() - t0).toBeLessThan(10_000);
    expect((await sb.commands.run('pgrep -x sleep || echo none')).stdout.trim()).toBe('none');
  });

  it('runs in the background, takes stdin and can be killed', async () => {
    const h = await sb.commands.run('cat', { background: true, stdin: true });
    expect(h.pid).toBeGreaterThan(1);
    await h.sendStdin('ping\n');
    await new Promise((r) => setTimeout(r, 300));
    expect(h.stdout).toBe('ping\n');
    expect(await h.kill()).toBe(true);
    const res = await h.wait();
    expect(res.signal).toBe(9);
    expect(res.exitCode).toBe(137);
  });

  it('reports a missing program clearly, and the sandbox keeps working', async () => {
    await expect(sb.commands.run(['/no/such/program'])).rejects.toMatchObject({ code: 'not_found', message: expect.stringMatching(/no\/such\/program/) });
    expect((await sb.commands.run('sh -c nosuchcommand')).exitCode).toBe(127);
    expect((await sb.commands.run('echo still here')).stdout).toBe('still here\n');
  });

  it('runs python3 with numpy', async () => {
    const r = await sb.commands.run(['python3', '-c', 'import numpy; print(numpy.zeros(3).tolist())']);
    expect(r.stdout.trim()).toBe('[0.0, 0.0, 0.0]');
  });
});

describe('runCode', () => {
  it('keeps state between calls and returns the last expression', async () => {
    expect((await sb.runCode('a = 20\nb = 22')).value).toBeUndefined();
    expect((await sb.runCode('a + b')).value).toBe('42');
    expect((await sb.runCode('"text"')).value).toBe("'text'");
  });

  it('streams output and captures stderr', async () => {
    const chunks: string[] = [];
    const r = await sb.runCode('import sys, time\nfor i in range(3):\n    print("p", i); time.sleep(0.2)\nprint("warn", file=sys.stderr)', { onStdout: (d) => chunks.push(d) });
    expect(r.stdout).toBe('p 0\np 1\np 2\n');
    expect(r.stderr).toBe('warn\n');
    expect(chunks.length).toBeGreaterThanOrEqual(2);
  });

  it('reports exceptions with a traceback and keeps the interpreter', async () => {
    const r = await sb.runCode('kept = 1\n1 / 0');
    expect(r.error).toMatchObject({ name: 'ZeroDivisionError', traceback: expect.stringContaining('ZeroDivisionError') });
    expect((await sb.runCode('kept')).value).toBe('1');
  });

  it('interrupts code past its timeout and starts a fresh interpreter next time', async () => {
    await expect(sb.runCode('import time\ntime.sleep(30)', { timeoutMs: 500 })).rejects.toMatchObject({ code: 'timeout' });
    const r = await sb.runCode('"kept" in dir()');
    expect(r.value).toBe('False');
  });

  it('refuses other languages', async () => {
    await expect(sb.runCode('1', { language: 'ruby' as 'python' })).rejects.toMatchObject({ code: 'bad_request' });
  });
});

describe('files', () => {
  it('writes and reads back a 10 MiB binary file byte for byte', async () => {
    const data = randomBytes(10 * 1024 * 1024);
    await sb.files.write('/tmp/big.bin', data);
    const back = await sb.files.read('/tmp/big.bin', { format: 'bytes' });
    expect(Buffer.from(back).equals(data)).toBe(true);
    const sum = await sb.commands.run('sha256sum /tmp/big.bin');
    expect(sum.stdout.split(' ')[0]).toBe((await import('node:crypto')).createHash('sha256').update(data).digest('hex'));
  });

  it('lists, stats, makes and removes', async () => {
    expect(await sb.files.makeDir('/tmp/d/e')).toBe(true);
    expect(await sb.files.makeDir('/tmp/d/e')).toBe(false);
    await sb.files.write('/tmp/d/a.txt', 'aaa');
    await sb.files.write('rel.txt', 'relative');
    expect(await sb.files.read('/root/rel.txt')).toBe('relative');
    const list = await sb.files.list('/tmp/d');
    expect(list.map((e) => [e.name, e.type])).toEqual([['a.txt', 'file'], ['e', 'dir']]);
    expect(list[0]).toMatchObject({ path: '/tmp/d/a.txt', size: 3 });
    expect((await sb.files.getInfo('/tmp/d/a.txt')).size).toBe(3);
    expect(await sb.files.exists('/tmp/d/a.txt')).toBe(true);
    await sb.files.remove('/tmp/d');
    expect(await sb.files.exists('/tmp/d')).toBe(false);
    await expect(sb.files.read('/tmp/d/a.txt')).rejects.toMatchObject({ code: 'not_found' });
  });

  it('refuses paths outside what is allowed', async () => {
    await expect(sb.files.write('/proc/sys/kernel/hostname', 'x')).rejects.toMatchObject({ agentCode: 'permission' });
    await expect(sb.files.write('/tmp/../sys/x', 'x')).rejects.toMatchObject({ agentCode: 'permission' });
    await expect(sb.files.remove('/init')).rejects.toMatchObject({ agentCode: 'permission' });
    await expect(sb.files.write('', 'x')).rejects.toBeInstanceOf(CladeError);
    await expect(sb.files.read('/tmp')).rejects.toMatchObject({ agentCode: 'is_dir' });
  });
});

describe('hostile or broken input on the agent channel', () => {
  const agent = () => defaultManager().get(sb.sandboxId).agent;

  it('refuses a request with the wrong token and keeps serving', async () => {
    const wrong = encodeHostFrame(MessageType.EXEC, 4_000_000_001, randomBytes(32), new FieldWriter().str(Tag.SHELL, 'touch /tmp/pwned').toBuffer());
    await agent().sendRaw(wrong);
    await new Promise((r) => setTimeout(r, 300));
    expect(await sb.files.exists('/tmp/pwned')).toBe(false);
  });

  it('answers an oversized frame with an error and keeps serving', async () => {
    await agent().sendRaw(encodeHeader(MessageType.WRITE_DATA, 4_000_000_002, 64 * 1024 * 1024));
    // The agent discards the announced bytes; send them so the stream realigns.
    const chunk = Buffer.alloc(1024 * 1024);
    for (let i = 0; i < 64; i++) await agent().sendRaw(chunk);
    expect((await sb.commands.run('echo alive')).stdout).toBe('alive\n');
  });

  it('recovers from garbage and a truncated frame', async () => {
    await agent().sendRaw(Buffer.from('this is not a frame at all'));
    await agent().sendRaw(encodeHeader(MessageType.EXEC, 4_000_000_003, 100).subarray(0, 10));
    await new Promise((r) => setTimeout(r, 2500));
    expect((await sb.commands.run('echo alive')).stdout).toBe('alive\n');
  });

  it('rejects an exec frame too big for the protocol before sending it', async () => {
    await expect(sb.commands.run(['echo', 'x'.repeat(2 * 1024 * 1024)])).rejects.toMatchObject({ code: 'too_large' });
  });
});

describe('lifecycle', () => {
  it('reports errors for bad options without leaving anything', async () => {
    await expect(Sandbox.create({ image: 'no-such-image' })).rejects.toMatchObject({ code: 'not_found', message: expect.stringMatching(/unknown image/) });
    await expect(Sandbox.create({ memoryMiB: 1 })).rejects.toMatchObject({ code: 'bad_request' });
  });

  it('has a VM process while running', () => {
    expect(vmPids(sb.sandboxId)).toHaveLength(1);
  });
});
