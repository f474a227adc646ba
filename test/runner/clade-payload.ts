import { join } from 'node:path';
import { expect } from 'vitest';
import { make, run } from '../helpers/run.js';
import { shellQuote } from '../../src/runner/payload.js';
import { CLADE_IN_RUNNER, cladeCarry, runInRunner, runnerTraces } from './harness.js';

const root = join(import.meta.dirname, '../..');

/** What the runner carries is built from the working tree: clade-vmm, kvm-probe, clade-net and dist/. */
async function buildAll(): Promise<void> {
  for (const target of ['native/vmm', 'native/kvm-probe', 'native/net']) await make(join(root, target));
  const tsc = await run('npx', ['tsc', '-p', 'tsconfig.json'], { cwd: root });
  expect(tsc.status, tsc.stdout + tsc.stderr).toBe(0);
}

/**
 * Runs `command` with its root on a bind mount of the runner's root. passt
 * confines itself with pivot_root(2), which the kernel refuses while the root
 * is the initial RAM file system the runner runs from; a bind mount of it
 * (a mount with a parent) is accepted. The bind mount is moved over / before
 * the chroot, as switch_root does: a plain chroot would be refused the user
 * namespace passt also makes.
 */
function inPivotableRoot(command: string): string {
  return `mkdir -p /run/root && mount -o rbind / /run/root && cd /run/root && mount -o move . / && exec chroot . sh -c ${shellQuote(command)}`;
}

/**
 * Runs test/runner/payload/<script> with this Node.js inside the runner, with
 * clade carried in (cladeCarry), and asserts what every payload promises: no
 * "check FAIL" line, each of `required` reported as "check ok", a final
 * "done", exit code 0, and no runner left behind on the host. `image` (a
 * built image's name) is carried as the runner's default image instead of "default"; with `network`,
 * clade-net and passt come along (networkCarry). At the time limit
 * the runner is killed and this throws a CladeError 'timeout' naming the last
 * stage reached.
 */
export async function runCladePayload(script: string, opts: { required: string[]; timeoutMs: number; image?: string; network?: boolean }): Promise<void> {
  await buildAll();
  const pkg = CLADE_IN_RUNNER.package;
  const before = runnerTraces();
  const command = `CLADE_HOME=${CLADE_IN_RUNNER.home} /opt/node/bin/node ${pkg}/check/${script} ${pkg}`;
  const r = await runInRunner({
    // The run-time npm packages come along for every payload: the SDK's core needs some of them too (schemas).
    files: [...(await cladeCarry({ daemon: true, ...(opts.image ? { image: opts.image } : {}), ...(opts.network ? { network: true } : {}) })), { hostPath: join(root, 'test/runner/payload'), guestPath: `${pkg}/check` }],
    command: opts.network ? inPivotableRoot(command) : command,
    timeoutMs: opts.timeoutMs,
  });
  const output = r.output.toString();
  console.log(output.split('\n').filter((l) => l.startsWith('timing')).join('\n'));
  const failed = output.split('\n').filter((l) => l.startsWith('check FAIL'));
  expect(failed, output).toEqual([]);
  for (const name of opts.required) expect(output).toContain(`check ok ${name}`);
  expect(output).toMatch(/^done$/m);
  expect(r.exitCode).toBe(0);
  expect(runnerTraces()).toEqual(before);
}
