import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { sandboxDirs } from '../helpers/leaks.js';
import { run } from '../helpers/run.js';

const MAIN = join(import.meta.dirname, '../../src/cli/main.ts');

async function clade(args: string[]) {
  const r = await run(process.execPath, ['--import', 'tsx', MAIN, ...args], { timeoutMs: 170_000 });
  return { code: r.status, stdout: r.stdout, stderr: r.stderr };
}

describe('clade CLI', async () => {
  it('run prints the output and exits with the command code', async () => {
    const before = new Set(sandboxDirs());
    const r = await clade(['run', '--', 'sh', '-c', 'echo from-guest; echo oops >&2; exit 7']);
    expect(r.stdout).toBe('from-guest\n');
    expect(r.stderr).toContain('oops');
    expect(r.code).toBe(7);
    // No directory is left that was not there before (other processes' may be reaped meanwhile).
    expect(sandboxDirs().filter((d) => !before.has(d))).toEqual([]);
  });

  it('run --json gives a machine-readable result', async () => {
    const r = await clade(['--json', 'run', '-e', 'X=42', '--', 'echo $X']);
    expect(r.code).toBe(0);
    expect(JSON.parse(r.stdout)).toMatchObject({ exitCode: 0, stdout: '42\n', sandboxId: expect.stringMatching(/^sb-/) });
  });

  it('errors are clear, and JSON with --json', async () => {
    const r = await clade(['run', '--image', 'nope', '--', 'true']);
    expect(r.code).toBe(1);
    expect(r.stderr).toMatch(/unknown image "nope"/);
    const j = await clade(['--json', 'run', '--image', 'nope', '--', 'true']);
    expect(JSON.parse(j.stdout)).toMatchObject({ error: { code: 'not_found' } });
  });

  it('image ls and doctor speak JSON', async () => {
    const ls = JSON.parse((await clade(['--json', 'image', 'ls'])).stdout) as { names: string[]; sizeBytes: number }[];
    expect(ls.some((i) => i.names.includes('default') && i.sizeBytes > 50e6)).toBe(true);
    const doc = await clade(['--json', 'doctor']);
    const report = JSON.parse(doc.stdout) as { checks: { name: string; status: string }[] };
    expect(report.checks.map((c) => c.name)).toEqual(expect.arrayContaining(['qemu', 'kvm', 'memory', 'disk', 'image']));
    expect(report.checks.find((c) => c.name === 'qemu')!.status).toBe('pass');
  });

  it('snapshot create, run --from-snapshot, inspect, ls and rm', async () => {
    const tag = `cli-test-${process.pid}`;
    const made = await clade(['--json', 'snapshot', 'create', tag, '--run', 'echo warm > /root/w', '--code', 'import numpy']);
    expect(made.code).toBe(0);
    expect(JSON.parse(made.stdout)).toMatchObject({ tag, parent: null });
    try {
      const r = await clade(['run', '--from-snapshot', tag, '--', 'cat', '/root/w']);
      expect(r.stdout).toBe('warm\n');
      expect(r.code).toBe(0);
      const inspect = JSON.parse((await clade(['--json', 'snapshot', 'inspect', tag])).stdout);
      expect(inspect).toMatchObject({ tag, verified: true });
      expect(inspect.agent).toBeUndefined(); // the agent token is not printed
      const ls = JSON.parse((await clade(['--json', 'snapshot', 'ls'])).stdout) as { tag: string }[];
      expect(ls.map((m) => m.tag)).toContain(tag);
    } finally {
      expect((await clade(['snapshot', 'rm', tag])).code).toBe(0);
    }
    expect(JSON.parse((await clade(['--json', 'snapshot', 'inspect', tag])).stdout)).toMatchObject({ error: { code: 'not_found' } });
  });

  it('demo boots, forks and reports as JSON', async () => {
    const r = await clade(['--json', 'demo']);
    const out = JSON.parse(r.stdout) as { numpy: string; children: { value: string }[]; failed: { message: string }[] };
    expect(out.failed, 'children that failed').toEqual([]);
    expect(r.code, r.stderr).toBe(0);
    expect(out.numpy).toBe('[1.0, 3.0]');
    expect(out.children).toHaveLength(3);
    for (const c of out.children) expect(c.value).toMatch(/^\(6\.0, \d+\)$/);
  });
});
