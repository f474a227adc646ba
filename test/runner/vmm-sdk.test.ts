import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { resolveImage } from '../../src/images/store.js';
import { ensureVmlinux } from '../../src/images/vmlinux.js';
import { kvmProbeCarry, nodeCarry, runInRunner, runnerAvailable, runnerTraces, type Carry } from './harness.js';

// The SDK on the vmm engine, end to end: inside the runner (whose /dev/kvm runs
// Linux guests) this Node.js runs the built SDK, which picks clade-vmm by itself,
// boots the default image, runs commands and Python, forks (children isolated,
// reseeded, renamed, interpreter kept), nests forks to depth 4, and kills
// everything. The calls are in payload/vmm-sdk-check.mjs; persistent snapshots
// (snapshot, start from it, lineage, integrity) in payload/vmm-snapshot-check.mjs.
const root = join(import.meta.dirname, '../..');
const TIMEOUT_MS = 300_000;
const HOME = '/root/clade-home';
const PKG = '/opt/clade';

async function payload(): Promise<Carry[]> {
  const image = resolveImage('default');
  const vmlinux = await ensureVmlinux(image);
  const imageDir = `${HOME}/images/${image.manifest.digest}`;
  const probe = await kvmProbeCarry();
  return [
    ...(await nodeCarry()),
    { hostPath: join(root, 'package.json'), guestPath: `${PKG}/package.json` },
    { hostPath: join(root, 'dist'), guestPath: `${PKG}/dist` },
    { hostPath: join(root, 'native/vmm/build/clade-vmm'), guestPath: `${PKG}/native/vmm/build/clade-vmm` },
    { hostPath: probe.hostPath, guestPath: `${PKG}/native/kvm-probe/build/kvm-probe` },
    { hostPath: join(root, 'test/runner/payload/vmm-sdk-check.mjs'), guestPath: `${PKG}/check/vmm-sdk-check.mjs` },
    { hostPath: join(root, 'test/runner/payload/vmm-snapshot-check.mjs'), guestPath: `${PKG}/check/vmm-snapshot-check.mjs` },
    { hostPath: join(image.dir, 'image.json'), guestPath: `${imageDir}/image.json` },
    { hostPath: image.kernel, guestPath: `${imageDir}/vmlinuz` },
    { hostPath: vmlinux, guestPath: `${imageDir}/vmlinux` },
    { hostPath: image.initramfs, guestPath: `${imageDir}/initramfs.cpio` },
    { guestPath: `${HOME}/images/refs/default`, content: `${image.manifest.digest}\n` },
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
