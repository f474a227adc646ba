import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { CladeError } from '../../src/util/errors.js';
import { waitFor } from '../helpers/leaks.js';
import { checkRunner, RUNNER_FAST_NS, runInRunner, runnerAvailable, runnerTraces } from './harness.js';

// Each test boots a runner VM under TCG (~4 s to its payload here, ~12 s with
// a guest image booted inside): the whole file takes well under a minute.
describe.skipIf(!runnerAvailable())('runner VM', () => {
  let before: string[] = [];
  beforeEach(() => {
    before = runnerTraces();
  });
  afterEach(async () => {
    const leftNothing = await waitFor(() => runnerTraces().every((t) => before.includes(t)), 10_000);
    expect(leftNothing, `left behind: ${runnerTraces().filter((t) => !before.includes(t)).join(', ')}`).toBe(true);
  });

  it('runs a command with carried files and reports its output and exit status', async () => {
    const r = await runInRunner({
      files: [{ guestPath: '/opt/payload/greeting', content: 'carried\n' }],
      command: 'cat /opt/payload/greeting; echo "to stderr $NAME" >&2; printf "no newline"; exit 7',
      env: { NAME: "it's me" },
      timeoutMs: 120_000,
    });
    expect(r.output).toBe("carried\nto stderr it's me\nno newline");
    expect(r.exitCode).toBe(7);
    expect(r.kvm).toBe(true);
    expect(r.timings.bootMs).toBeGreaterThan(0);
  });

  it('runs guest kernel (CPL0) code at hardware-style speed on its /dev/kvm', async () => {
    const c = await checkRunner({ timeoutMs: 120_000 });
    expect(c.cpu).toEqual({ svm: true, npt: true });
    expect(c.kvmAmd.join('\n')).toMatch(/Nested Paging enabled/);
    const inside = c.probe.inside?.nsPerIteration ?? Infinity;
    expect(inside, `kvm-probe inside the runner: ${JSON.stringify(c.probe.inside)}`).toBeLessThan(RUNNER_FAST_NS);
    // Where the host's own /dev/kvm emulates CPL0 (this project's machines, ~400 ns), the runner must beat it clearly.
    if (c.probe.host.nsPerIteration > RUNNER_FAST_NS) expect(inside).toBeLessThan(c.probe.host.nsPerIteration / 3);
    expect(c.fast).toBe(true);
  });

  it('boots the default guest image with QEMU+KVM inside the runner', async () => {
    const c = await checkRunner({ bootImage: true, timeoutMs: 180_000 });
    expect(c.imageBoot?.reachedInit, `guest console:\n${c.imageBoot?.consoleTail.join('\n')}`).toBe(true);
    expect(c.imageBoot!.seconds).toBeLessThan(90);
  });

  it('kills the runner at its time limit with a clear error', async () => {
    const err = await runInRunner({ command: 'sleep 600', timeoutMs: 12_000 }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CladeError);
    expect((err as CladeError).code).toBe('timeout');
    expect((err as CladeError).message).toMatch(/did not finish within 12 s/);
  });

  it('leaves nothing behind when its process is interrupted (Ctrl-C)', async () => {
    const fixture = join(import.meta.dirname, 'fixtures', 'interrupted-run.ts');
    const child = spawn(process.execPath, ['--import', 'tsx', fixture], { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    const exited = new Promise<NodeJS.Signals | null>((resolve) => child.once('exit', (_code, signal) => resolve(signal)));
    try {
      expect(await waitFor(() => out.includes('payload-running'), 120_000), `runner output:\n${out}`).toBe(true);
      child.kill('SIGINT');
      expect(await exited).toBe('SIGINT');
    } finally {
      child.kill('SIGKILL');
    }
  });
});
