import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { resolveImage } from '../../src/images/store.js';
import { ensureVmlinux } from '../../src/images/vmlinux.js';
import { make } from '../helpers/run.js';
import { runInRunner, runnerAvailable, runnerTraces } from './harness.js';

// clade-vmm boots the default image (PVH, ACPI MADT, serial, virtio-console)
// inside the runner VM, whose /dev/kvm runs Linux guests, with the agent token
// kept off its command line; userspace writes reach the serial port (its IRQ
// fires) and a flood of them leaves the log under its cap; the agent answers
// on the VMM's agent socket; the VM forks to depth 3 with isolated children,
// and into run directories of their own, where a child outlives its killed
// parent and forks again. It snapshots, starts from the snapshot through
// inherited descriptors, and refuses every edited state.bin (tamper sweep).
// The control socket keeps answering while agent clients come and go during
// boot and through parks requested back to back.
// The steps are native/vmm/test/linux-fork.sh; vmm-agent is its static client.
const root = join(import.meta.dirname, '../..');
const TIMEOUT_MS = 480_000;

describe('clade-vmm boots Linux and forks it (runner)', () => {
  it.skipIf(!runnerAvailable())('boots the default image, answers, forks to depth 3', async () => {
    await make(join(root, 'native/vmm'));
    const image = resolveImage('default');
    const vmlinux = await ensureVmlinux(image);
    const before = runnerTraces();
    const r = await runInRunner({
      files: [
        { hostPath: join(root, 'native/vmm/build/clade-vmm'), guestPath: '/opt/vmm/clade-vmm' },
        { hostPath: join(root, 'native/vmm/build/vmm-agent'), guestPath: '/opt/vmm/vmm-agent' },
        { hostPath: join(root, 'native/vmm/test/linux-fork.sh'), guestPath: '/opt/vmm/linux-fork.sh' },
        { hostPath: vmlinux, guestPath: '/opt/img/vmlinux' },
        { hostPath: image.initramfs, guestPath: '/opt/img/initramfs.cpio' },
      ],
      command: 'sh /opt/vmm/linux-fork.sh',
      timeoutMs: TIMEOUT_MS,
    });
    const output = r.output.toString();
    console.log(output.split('\n').filter((l) => l.startsWith('figure') || l.startsWith('tamper:')).join('\n'));
    const failed = output.split('\n').filter((l) => l.startsWith('check FAIL'));
    expect(failed, output).toEqual([]);
    expect(output).toContain('check ok early-clients');
    expect(output).toContain('check ok parks');
    expect(output).toContain('check ok serial-irq');
    expect(output).toContain('check ok serial-log');
    expect(output).toContain('check ok depth3');
    expect(output).toContain('check ok token-not-in-cmdline');
    expect(output).toContain('check ok serial-log-capped');
    expect(output).toContain('check ok fork-after-parent-killed');
    expect(output).toContain('check ok child-serial-own-log');
    expect(output).toContain('check ok restored-answers');
    expect(output).toContain('check ok tamper');
    expect(output).toContain('check ok no-vmm-left');
    expect(output).toContain('done');
    expect(runnerTraces()).toEqual(before);
  }, TIMEOUT_MS + 30_000);
});
