import { networkUnavailableReason, passtBinary } from '../engines/network.js';
import { execFile } from 'node:child_process';
import { accessSync, constants, statfsSync } from 'node:fs';
import { freemem } from 'node:os';
import { promisify } from 'node:util';
import { cladeHome, ensurePrivateDir } from '../util/home.js';
import { probeKvm } from '../util/kvm-probe.js';
import { QEMU_BINARY } from '../engines/qemu/qemu-vm.js';
import { vmmUnavailableReason } from '../engines/vmm/vmm-engine.js';
import { resolveImage } from '../images/store.js';

const run = promisify(execFile);

export type Check = { name: string; status: 'pass' | 'warn' | 'fail'; detail: string; fix?: string };

export async function runChecks(): Promise<Check[]> {
  const checks: Check[] = [];
  const major = Number(process.versions.node.split('.')[0]);
  checks.push(major >= 20 ? { name: 'node', status: 'pass', detail: `Node ${process.versions.node}` } : { name: 'node', status: 'fail', detail: `Node ${process.versions.node}`, fix: 'install Node 20 or newer' });

  try {
    const { stdout } = await run(QEMU_BINARY, ['--version']);
    checks.push({ name: 'qemu', status: 'pass', detail: stdout.split('\n')[0] ?? '' });
  } catch {
    checks.push({ name: 'qemu', status: 'fail', detail: `${QEMU_BINARY} not found`, fix: 'sudo apt-get install qemu-system-x86 (or run scripts/setup.sh as root)' });
  }

  const kvm = await probeKvm();
  checks.push(
    kvm.usable
      ? { name: 'kvm', status: 'pass', detail: `KVM runs Linux guests (${kvm.nsPerIteration.toFixed(1)} ns per guest-kernel loop iteration)` }
      : { name: 'kvm', status: 'warn', detail: `not used: ${kvm.reason}${kvm.nsPerIteration ? ` (${kvm.nsPerIteration.toFixed(0)} ns per iteration)` : ''}; sandboxes run under TCG emulation, slower`, fix: 'run on a host with hardware virtualization and access to /dev/kvm for full speed' },
  );

  const vmmWhyNot = await vmmUnavailableReason();
  checks.push(
    vmmWhyNot
      ? { name: 'engine', status: 'warn', detail: `engine qemu (the vmm engine cannot run here: ${vmmWhyNot})`, fix: 'run on a host whose KVM runs Linux guests; `clade runner` tests the vmm engine on this one' }
      : { name: 'engine', status: 'pass', detail: 'engine vmm: clade-vmm forks running VMs with fork(2) on this host\'s KVM' },
  );

  const freeGiB = freemem() / 2 ** 30;
  const netWhyNot = networkUnavailableReason();
  checks.push(netWhyNot ? { name: 'network', status: 'warn', detail: `sandboxes cannot have a network: ${netWhyNot}` } : { name: 'network', status: 'pass', detail: `sandbox networks: clade-net and ${passtBinary()}` });
  checks.push({ name: 'memory', status: freeGiB >= 2 ? 'pass' : 'warn', detail: `${freeGiB.toFixed(1)} GiB free`, ...(freeGiB < 2 ? { fix: 'each sandbox needs ~100 MiB of host memory plus what its guest touches' } : {}) });

  const home = cladeHome();
  try {
    ensurePrivateDir(home);
    accessSync(home, constants.W_OK);
    const fs = statfsSync(home);
    const freeDisk = (fs.bavail * fs.bsize) / 2 ** 30;
    checks.push({ name: 'home', status: 'pass', detail: home });
    checks.push({ name: 'disk', status: freeDisk >= 2 ? 'pass' : 'warn', detail: `${freeDisk.toFixed(1)} GiB free in ${home}`, ...(freeDisk < 2 ? { fix: 'an image takes ~200 MB and a build needs ~600 MB of scratch space' } : {}) });
  } catch (err) {
    checks.push({ name: 'home', status: 'fail', detail: `${home} is not writable: ${(err as Error).message}`, fix: 'set CLADE_HOME to a writable directory' });
  }

  try {
    await run('apt-get', ['--version']);
    checks.push({ name: 'apt', status: 'pass', detail: 'apt-get available for image builds' });
  } catch {
    checks.push({ name: 'apt', status: 'warn', detail: 'apt-get not found: `clade image build` needs a Debian-family host', fix: 'build the image on a Debian or Ubuntu machine and copy ~/.clade/images' });
  }

  try {
    const img = resolveImage('default');
    checks.push({ name: 'image', status: 'pass', detail: `default image ${img.manifest.digest.slice(0, 12)} (kernel ${img.manifest.kernel.release})` });
  } catch {
    checks.push({ name: 'image', status: 'warn', detail: 'no default image yet', fix: 'clade image build' });
  }
  return checks;
}
