import { errorMessage } from '../util/errors.js';
import type { ProgressFn } from '../util/progress.js';
import { probeKvm, type KvmProbe } from '../util/kvm-probe.js';
import { GUEST_PATHS, imageCarry, kvmProbeCarry, qemuCarry } from './carry.js';
import type { Carry } from './payload.js';
import { runInRunner } from './runner.js';

export type ImageBoot = {
  /** From starting QEMU inside the runner to its exit: kernel boot, the agent as /init, power-off. */
  seconds: number;
  /** The guest reached /init (its agent wrote to the console). */
  reachedInit: boolean;
  qemuExitCode: number;
  consoleTail: string[];
};

/**
 * Guest-kernel loop speed under which the runner's /dev/kvm counts as
 * hardware-style. Inside the runner the loop is still translated by TCG
 * (40-70 ns measured), so kvm-probe's own bare-metal bar (50 ns) does not
 * apply; the host's emulated /dev/kvm needs ~400 ns.
 */
export const RUNNER_FAST_NS = 150;

export type RunnerCheck = {
  /** /dev/kvm came up and kvm-probe inside ran under RUNNER_FAST_NS per iteration. */
  fast: boolean;
  kvm: boolean;
  cpu: { svm: boolean; npt: boolean };
  /** What kvm_amd said as it loaded ("Nested Paging enabled"...). */
  kvmAmd: string[];
  probe: { inside?: KvmProbe; host: KvmProbe };
  bootMs: number;
  guestUptimeAtPayloadS: number;
  totalMs: number;
  imageBoot?: ImageBoot;
};

/**
 * Boots a runner and measures what it is for: that /dev/kvm inside runs guest
 * kernel code at hardware-style speed (kvm-probe, against the host's figure),
 * and, with `bootImage`, that a guest image boots under QEMU+KVM inside it.
 */
export async function checkRunner(opts: { bootImage?: boolean; image?: string; timeoutMs?: number; progress?: ProgressFn } = {}): Promise<RunnerCheck> {
  const image = opts.image ?? 'default';
  const carry: Carry[] = [await kvmProbeCarry()];
  const lines = [
    'echo "cpu svm=$(grep -c -w svm /proc/cpuinfo) npt=$(grep -c -w npt /proc/cpuinfo)"',
    `dmesg | grep kvm_amd | sed -e 's/^\\[[^]]*\\] //' -e 's/^/kvm_amd /'`,
    `${GUEST_PATHS.kvmProbe} | sed 's/^/probe /'`,
  ];
  if (opts.bootImage) {
    carry.push(...(await qemuCarry()), ...imageCarry(image));
    lines.push(imageBootCommand());
  }
  const host = await probeKvm();
  const r = await runInRunner({ command: lines.join('\n'), carry, image, timeoutMs: opts.timeoutMs ?? (opts.bootImage ? 300_000 : 120_000), ...(opts.progress ? { progress: opts.progress } : {}) });
  const probe = { ...parseProbe(r.output), host };
  const fast = r.kvm && probe.inside !== undefined && probe.inside.nsPerIteration > 0 && probe.inside.nsPerIteration < RUNNER_FAST_NS;
  return { ...parseReport(r.output, opts.bootImage === true), fast, kvm: r.kvm, probe, bootMs: r.timings.bootMs, guestUptimeAtPayloadS: r.timings.guestUptimeAtPayloadS, totalMs: r.timings.totalMs };
}

/**
 * Shell lines that boot the carried guest image with QEMU+KVM inside the
 * runner and time it. The image's agent finds no session token on the command
 * line, says so on the console and powers off: that marks /init reached.
 */
export function imageBootCommand(opts: { memoryMiB?: number; timeoutS?: number } = {}): string {
  const qemu = [
    GUEST_PATHS.qemu, '-M microvm,pcie=on,rtc=on', '-accel kvm -cpu host', `-m ${opts.memoryMiB ?? 512}`, '-smp 1',
    '-nodefaults -no-user-config -display none -no-reboot', '-serial file:/tmp/image-console.log',
    `-kernel ${GUEST_PATHS.imageKernel}`, `-initrd ${GUEST_PATHS.imageInitramfs}`, "-append 'console=ttyS0 quiet panic=-1 mitigations=off'",
  ].join(' ');
  return [
    't0=$(cut -d" " -f1 /proc/uptime)',
    `timeout ${opts.timeoutS ?? 180} ${qemu} > /tmp/image-qemu.log 2>&1`,
    'rc=$?',
    "sed 's/^/image-qemu /' /tmp/image-qemu.log",
    't1=$(cut -d" " -f1 /proc/uptime)',
    'echo "image-boot rc=$rc seconds=$(awk "BEGIN{print $t1-$t0}")"',
    "grep -q clade-agent /tmp/image-console.log && echo 'image-init yes'",
    "tail -n 8 /tmp/image-console.log | sed 's/^/image-console /'",
  ].join('\n');
}

function parseReport(output: string, imageBooted: boolean): Pick<RunnerCheck, 'cpu' | 'kvmAmd' | 'imageBoot'> {
  const lines = output.split('\n').map((l) => l.replace(/\r$/, ''));
  const cpu = /^cpu svm=(\d+) npt=(\d+)/m.exec(output);
  const kvmAmd = lines.filter((l) => l.startsWith('kvm_amd ')).map((l) => l.slice('kvm_amd '.length));
  const report: Pick<RunnerCheck, 'cpu' | 'kvmAmd' | 'imageBoot'> = { cpu: { svm: Number(cpu?.[1] ?? 0) > 0, npt: Number(cpu?.[2] ?? 0) > 0 }, kvmAmd };
  if (imageBooted) {
    const boot = /^image-boot rc=(\d+) seconds=([\d.]+)/m.exec(output);
    report.imageBoot = {
      seconds: Number(boot?.[2] ?? NaN),
      qemuExitCode: Number(boot?.[1] ?? NaN),
      reachedInit: lines.includes('image-init yes'),
      consoleTail: lines.filter((l) => l.startsWith('image-console ') || l.startsWith('image-qemu ')).map((l) => l.replace(/^image-\w+ /, '')),
    };
  }
  return report;
}

function parseProbe(output: string): { inside?: KvmProbe } {
  const line = /^probe (\{.*\})$/m.exec(output)?.[1];
  if (!line) return {};
  try {
    return { inside: JSON.parse(line) as KvmProbe };
  } catch (err) {
    throw new Error(`kvm-probe inside the runner printed unreadable JSON (${errorMessage(err)}): ${line}`);
  }
}
