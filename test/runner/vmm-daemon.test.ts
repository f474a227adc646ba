import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { CLADE_IN_RUNNER, cladeCarry, runInRunner, runnerAvailable, runnerTraces, type Carry } from './harness.js';

// The daemon on the vmm engine, end to end: inside the runner (whose /dev/kvm
// runs Linux guests) this Node.js runs `clade serve` from the built package,
// which picks clade-vmm by itself. Over HTTP it creates, runs, forks; then the
// daemon is SIGKILLed and restarted, adopts the VMs it recorded, kills the one
// whose record was removed, and leaves nothing once everything is deleted.
// The calls are in payload/vmm-daemon-check.mjs.
const root = join(import.meta.dirname, '../..');
// A run takes ~50 s here; three times that still fits the ~3 minute budget.
const TIMEOUT_MS = 150_000;
const HOME = CLADE_IN_RUNNER.home;
const PKG = CLADE_IN_RUNNER.package;

async function payload(): Promise<Carry[]> {
  return [...(await cladeCarry({ daemon: true })), { hostPath: join(root, 'test/runner/payload'), guestPath: `${PKG}/check` }];
}

function buildAll(): void {
  for (const target of ['native/vmm', 'native/kvm-probe']) {
    const build = spawnSync('make', ['-s', '-C', join(root, target)], { encoding: 'utf8' });
    expect(build.status, build.stderr).toBe(0);
  }
  const tsc = spawnSync('npx', ['tsc', '-p', 'tsconfig.json'], { cwd: root, encoding: 'utf8' });
  expect(tsc.status, tsc.stdout + tsc.stderr).toBe(0);
}

describe('the daemon on the vmm engine (runner)', () => {
  it.skipIf(!runnerAvailable())('serves, forks, survives SIGKILL by adopting its VMs, and cleans up', async () => {
    buildAll();
    const before = runnerTraces();
    // At the time limit the runner is killed and this throws a CladeError 'timeout' naming the last stage reached.
    const r = await runInRunner({
      files: await payload(),
      command: `CLADE_HOME=${HOME} /opt/node/bin/node ${PKG}/check/vmm-daemon-check.mjs ${PKG}`,
      timeoutMs: TIMEOUT_MS,
    });
    const output = r.output.toString();
    console.log(output.split('\n').filter((l) => l.startsWith('timing')).join('\n'));
    const failed = output.split('\n').filter((l) => l.startsWith('check FAIL'));
    expect(failed, output).toEqual([]);
    for (const name of ['engine-chosen-automatically', 'child-keeps-interpreter-state', 'vms-outlive-daemon', 'adopted-keeps-interpreter', 'unrecorded-vm-killed', 'no-vmm-left', 'no-sandbox-dir-left', 'daemon-stopped']) {
      expect(output).toContain(`check ok ${name}`);
    }
    expect(output).toMatch(/^done$/m);
    expect(r.exitCode).toBe(0);
    expect(runnerTraces()).toEqual(before);
  }, TIMEOUT_MS + 30_000); // past the runner's own limit, so its clearer error is the one reported
});
