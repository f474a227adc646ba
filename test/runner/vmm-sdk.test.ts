import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLADE_IN_RUNNER, cladeCarry, runInRunner, runnerAvailable, runnerTraces, type Carry } from './harness.js';

// The SDK on the vmm engine, end to end: inside the runner (whose /dev/kvm runs
// Linux guests) this Node.js runs the built SDK, which picks clade-vmm by itself,
// boots the default image, runs commands and Python, forks (children isolated,
// reseeded, renamed, interpreter kept), nests forks to depth 4, and kills
// everything. The calls are in payload/vmm-sdk-check.mjs; persistent snapshots
// (snapshot, start from it, lineage, integrity) in payload/vmm-snapshot-check.mjs.
const root = join(import.meta.dirname, '../..');
const TIMEOUT_MS = 300_000;
const HOME = CLADE_IN_RUNNER.home;
const PKG = CLADE_IN_RUNNER.package;

async function payload(): Promise<Carry[]> {
  return [
    ...(await cladeCarry()),
    { hostPath: join(root, 'test/runner/payload'), guestPath: `${PKG}/check` },
  ];
}

function buildAll(): void {
  for (const target of ['native/vmm', 'native/kvm-probe']) {
    const build = spawnSync('make', ['-s', '-C', join(root, target)], { encoding: 'utf8' });
    expect(build.status, build.stderr).toBe(0);
  }
  const tsc = spawnSync('npx', ['tsc', '-p', 'tsconfig.json'], { cwd: root, encoding: 'utf8' });
  expect(tsc.status, tsc.stdout + tsc.stderr).toBe(0);
}

describe('the SDK on the vmm engine (runner)', () => {
  it.skipIf(!runnerAvailable())('creates, runs, forks to depth 4 and cleans up, choosing clade-vmm by itself', async () => {
    buildAll();
    const before = runnerTraces();
    const r = await runInRunner({
      files: await payload(),
      command: `CLADE_HOME=${HOME} /opt/node/bin/node ${PKG}/check/vmm-sdk-check.mjs ${PKG}`,
      timeoutMs: TIMEOUT_MS,
    });
    const output = r.output.toString();
    console.log(output.split('\n').filter((l) => l.startsWith('timing')).join('\n'));
    const failed = output.split('\n').filter((l) => l.startsWith('check FAIL'));
    expect(failed, output).toEqual([]);
    expect(output).toContain('check ok nested-depth-4');
    expect(output).toContain('check ok no-vmm-left');
    expect(output).toMatch(/^done$/m);
    expect(r.exitCode).toBe(0);
    expect(runnerTraces()).toEqual(before);
  }, TIMEOUT_MS + 60_000);

  // Persistent snapshots on the vmm engine: payload/vmm-snapshot-check.mjs.
  it.skipIf(!runnerAvailable())('snapshots to disk and starts sandboxes from the snapshot', async () => {
    buildAll();
    const before = runnerTraces();
    const r = await runInRunner({
      files: await payload(),
      command: `CLADE_HOME=${HOME} /opt/node/bin/node ${PKG}/check/vmm-snapshot-check.mjs ${PKG}`,
      timeoutMs: TIMEOUT_MS,
    });
    const output = r.output.toString();
    console.log(output.split('\n').filter((l) => l.startsWith('timing')).join('\n'));
    const failed = output.split('\n').filter((l) => l.startsWith('check FAIL'));
    expect(failed, output).toEqual([]);
    expect(output).toContain('check ok restore-runs');
    expect(output).toContain('check ok tampered-refused');
    expect(output).toContain('check ok no-vmm-left');
    expect(output).toMatch(/^done$/m);
    expect(r.exitCode).toBe(0);
    expect(runnerTraces()).toEqual(before);
  }, TIMEOUT_MS + 60_000);
});
