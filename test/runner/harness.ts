import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { homePaths } from '../../src/util/home.js';
import { resolveImage } from '../../src/images/store.js';
import { runInRunner as runInRunnerVm, type Carry, type RunnerOptions, type RunnerResult } from '../../src/runner/runner.js';

export { CLADE_IN_RUNNER, cladeCarry, GUEST_PATHS, imageCarry, kvmProbeCarry, nodeCarry, qemuCarry } from '../../src/runner/carry.js';
export { checkRunner, imageBootCommand, RUNNER_FAST_NS } from '../../src/runner/check.js';
export type { Carry, RunnerResult } from '../../src/runner/runner.js';

/**
 * Runs a payload inside a runner VM, where /dev/kvm runs Linux guests: for
 * tests of KVM code (clade-vmm's Linux boots) on hosts whose own /dev/kvm
 * cannot. `files` are host files or directories put at absolute guest paths;
 * `command` runs under busybox sh as root. Throws on timeout, boot failure or
 * a missing /dev/kvm, and leaves no process or file behind either way.
 *
 *   const r = await runInRunner({ files: [{ hostPath: vmm, guestPath: '/opt/vmm' }], command: '/opt/vmm --selftest', timeoutMs: 120_000 });
 *   expect(r.exitCode).toBe(0);
 */
export function runInRunner(opts: { files?: Carry[] } & Omit<RunnerOptions, 'carry'>): Promise<RunnerResult> {
  const { files, ...rest } = opts;
  return runInRunnerVm({ ...rest, carry: files ?? [] });
}

/** The runner boots the guest image's kernel: without a built image there is nothing to boot. */
export function runnerAvailable(): boolean {
  try {
    resolveImage('default');
    return true;
  } catch {
    return false;
  }
}

/** Runner QEMU processes and work directories that exist now, to compare before and after a test. */
export function runnerTraces(): string[] {
  const pids = readdirSync('/proc')
    .filter((entry) => /^\d+$/.test(entry))
    .filter((pid) => {
      try {
        return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').some((a) => a.startsWith('clade-runner-'));
      } catch {
        return false;
      }
    })
    .map((pid) => `pid ${pid}`);
  const dirs = existsSync(homePaths.tmp()) ? readdirSync(homePaths.tmp()).filter((d) => d.startsWith('runner-')).map((d) => `dir ${d}`) : [];
  return [...pids, ...dirs];
}
