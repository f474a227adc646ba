import { Option, type Command } from 'commander';
import { CladeError } from '../util/errors.js';
import { imageCarry, kvmProbeCarry, qemuCarry } from '../runner/carry.js';
import { checkRunner, type RunnerCheck } from '../runner/check.js';
import { commandFromArgv, type Carry } from '../runner/payload.js';
import { runInRunner } from '../runner/runner.js';
import { emit, progressPrinter } from './output.js';

/** main.ts's action wrapper: hands the global --json flag to the action, prints errors, sets the exit code. */
export type ActionWrapper = <A extends unknown[]>(fn: (json: boolean, ...args: A) => Promise<number | void>) => (...args: unknown[]) => Promise<void>;

type RunOptions = { carry: string[]; withQemu?: boolean; withImage?: string | boolean; withKvmProbe?: boolean; memory?: number; cpus?: number; timeout: number; env: string[] };

/**
 * `clade runner ...`: a VM with a working hardware-style /dev/kvm, for hosts
 * whose own /dev/kvm cannot run Linux guests. Tests of KVM code run inside it.
 */
export function registerRunnerCommands(program: Command, action: ActionWrapper): void {
  const runner = program.command('runner').description('a nested VM whose /dev/kvm runs Linux guests, for hosts whose own KVM cannot (see docs/runner.md)');

  runner
    .command('check')
    .description('boot a runner and measure its /dev/kvm against the host\'s')
    .option('--boot-image', 'also boot the guest image with QEMU+KVM inside the runner')
    .option('--image <image>', 'guest image whose kernel the runner uses (and that --boot-image boots)', 'default')
    .option('--timeout <ms>', 'give up after this many ms', (v) => parseInt(v, 10))
    .action(
      action(async (json: boolean, opts: { bootImage?: boolean; image: string; timeout?: number }) => {
        const check = await checkRunner({ bootImage: Boolean(opts.bootImage), image: opts.image, progress: progressPrinter(json), ...(opts.timeout ? { timeoutMs: opts.timeout } : {}) });
        const ok = checkPassed(check);
        emit(json, { ok, ...check }, () => describeCheck(check, ok));
        return ok ? 0 : 1;
      }),
    );

  runner
    .command('run')
    .description('boot a runner, run one command inside it (as root, busybox sh), print its output, exit with its code')
    .argument('<command...>', 'the command and its arguments (put them after --)')
    .addOption(new Option('--carry <host:guest...>', 'put a host file or directory at an absolute guest path').default([]))
    .option('--with-kvm-probe', 'carry a static kvm-probe as /opt/clade/bin/kvm-probe')
    .option('--with-qemu', 'carry this host\'s QEMU as /opt/qemu/bin/qemu-system-x86_64')
    .option('--with-image [image]', 'carry a guest image as /opt/clade/image/{vmlinuz,initramfs.cpio}')
    .option('--memory <mib>', 'runner memory in MiB (carried files live in it)', (v) => parseInt(v, 10))
    .option('--cpus <n>', 'runner vCPUs (1 is the reliable choice under emulation)', (v) => parseInt(v, 10))
    .option('--timeout <ms>', 'kill the runner after this many ms, boot included', (v) => parseInt(v, 10), 300_000)
    .addOption(new Option('-e, --env <KEY=VALUE...>', 'environment variables for the command').default([]))
    .action(
      action(async (json: boolean, argv: string[], opts: RunOptions) => {
        const carry = await carriesFor(opts);
        const r = await runInRunner({
          command: commandFromArgv(argv),
          carry,
          env: parseEnv(opts.env),
          timeoutMs: opts.timeout,
          progress: progressPrinter(json),
          ...(opts.memory ? { memoryMiB: opts.memory } : {}),
          ...(opts.cpus ? { cpus: opts.cpus } : {}),
          ...(typeof opts.withImage === 'string' ? { image: opts.withImage } : {}),
          ...(json ? {} : { onOutput: (chunk: Buffer) => process.stdout.write(chunk) }),
        });
        if (json) emit(true, r, () => '');
        else process.stderr.write(`runner: exit ${r.exitCode}; payload started ${(r.timings.bootMs / 1000).toFixed(1)} s after launch, ran ${(r.timings.payloadMs / 1000).toFixed(1)} s\n`);
        return r.exitCode;
      }),
    );
}

async function carriesFor(opts: RunOptions): Promise<Carry[]> {
  const carry = opts.carry.map(parseCarry);
  if (opts.withKvmProbe) carry.push(await kvmProbeCarry());
  if (opts.withQemu) carry.push(...(await qemuCarry()));
  if (opts.withImage) carry.push(...imageCarry(typeof opts.withImage === 'string' ? opts.withImage : 'default'));
  return carry;
}

/** `host:guest`; the guest part is the absolute path after the last ":/" (host paths may hold colons). */
export function parseCarry(spec: string): Carry {
  const at = spec.lastIndexOf(':/');
  if (at <= 0) throw new CladeError('bad_request', `--carry ${spec}: give host:guest with an absolute guest path, e.g. --carry ./build/clade-vmm:/opt/vmm/clade-vmm`);
  return { hostPath: spec.slice(0, at), guestPath: spec.slice(at + 1) };
}

function parseEnv(pairs: string[]): Record<string, string> {
  const env: Record<string, string> = {};
  for (const p of pairs) {
    const eq = p.indexOf('=');
    if (eq <= 0) throw new CladeError('bad_request', `--env ${p}: use KEY=VALUE`);
    env[p.slice(0, eq)] = p.slice(eq + 1);
  }
  return env;
}

function checkPassed(c: RunnerCheck): boolean {
  return c.fast && (c.imageBoot === undefined || c.imageBoot.reachedInit);
}

function describeCheck(c: RunnerCheck, ok: boolean): string {
  const inside = c.probe.inside?.nsPerIteration;
  const host = c.probe.host.nsPerIteration;
  const lines = [
    `${ok ? 'PASS' : 'FAIL'}  runner /dev/kvm ${c.kvm ? 'up' : 'MISSING'}; CPU ${c.cpu.svm ? 'has' : 'lacks'} SVM, ${c.cpu.npt ? 'has' : 'lacks'} nested paging`,
    ...c.kvmAmd.map((l) => `      ${l}`),
    `      boot: payload started ${(c.bootMs / 1000).toFixed(1)} s after launch (runner uptime ${c.guestUptimeAtPayloadS.toFixed(2)} s)`,
    inside === undefined
      ? '      kvm-probe: no result from inside the runner'
      : `      kvm-probe: ${inside.toFixed(1)} ns per guest-kernel loop iteration inside the runner; host /dev/kvm: ${host > 0 ? `${host.toFixed(1)} ns` : c.probe.host.reason}`,
  ];
  if (c.imageBoot) {
    lines.push(
      c.imageBoot.reachedInit
        ? `      image: booted to /init with QEMU+KVM inside the runner in ${c.imageBoot.seconds.toFixed(1)} s`
        : `      image: did NOT reach /init (qemu exit ${c.imageBoot.qemuExitCode}); console:\n${c.imageBoot.consoleTail.map((l) => `        ${l}`).join('\n')}`,
    );
  }
  return lines.join('\n');
}
