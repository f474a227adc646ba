import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';

const MAIN = join(import.meta.dirname, '../../src/cli/main.ts');
const home = mkdtempSync(join(tmpdir(), 'clade-serve-owner-'));
afterAll(() => rmSync(home, { recursive: true, force: true }));

// A daemon started for a test run or a program (`--owner-pid`) must not outlive
// it: a killed test runner would otherwise leave daemons (and their VMs) behind.
describe('clade serve --owner-pid', () => {
  it('exits and removes its socket once its owner process ends', async () => {
    const owner = spawn('sleep', ['600'], { stdio: 'ignore' });
    const socket = join(home, 'd.sock');
    const daemon = spawn(process.execPath, ['--import', 'tsx', MAIN, 'serve', '--socket', socket, '--owner-pid', String(owner.pid)], {
      env: { ...process.env, CLADE_HOME: home },
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let log = '';
    daemon.stdout!.on('data', (d: Buffer) => (log += d.toString()));
    daemon.stderr!.on('data', (d: Buffer) => (log += d.toString()));
    const exited = new Promise<number | null>((resolve) => daemon.once('exit', (code) => resolve(code)));
    try {
      await waitUntil(() => log.includes('clade daemon listening'), 30_000, () => log);
      expect(existsSync(socket)).toBe(true);
      owner.kill('SIGKILL');
      const t0 = Date.now();
      expect(await exited).toBe(0);
      expect(Date.now() - t0).toBeLessThan(10_000);
      expect(existsSync(socket)).toBe(false);
    } finally {
      owner.kill('SIGKILL');
      daemon.kill('SIGKILL');
    }
  });

  it('refuses an owner that does not exist', async () => {
    const r = spawn(process.execPath, ['--import', 'tsx', MAIN, 'serve', '--socket', join(home, 'e.sock'), '--owner-pid', '4194000'], { env: { ...process.env, CLADE_HOME: home }, stdio: ['ignore', 'pipe', 'pipe'] });
    let err = '';
    r.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    const code = await new Promise<number | null>((resolve) => r.once('exit', resolve));
    expect(code).toBe(1);
    expect(err).toMatch(/--owner-pid 4194000: no such process/);
  });
});

async function waitUntil(ok: () => boolean, timeoutMs: number, why: () => string): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!ok()) {
    if (Date.now() > deadline) throw new Error(`timed out; output so far:\n${why()}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
