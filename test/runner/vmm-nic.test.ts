import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { resolveImage } from '../../src/images/store.js';
import { ensureVmlinux } from '../../src/images/vmlinux.js';
import { make } from '../helpers/run.js';
import { runInRunner, runnerAvailable, runnerTraces } from './harness.js';

// clade-vmm's NIC inside the runner VM (native/vmm/test/linux-net.sh): the
// default image boots with --net on vmm-agent's stand-in network process; the
// guest's eth0 has the fixed MAC and carrier, its frames reach the socket and
// one frame from the socket reaches it; a fork into a run directory connects
// the child to that directory's net.sock while the parent keeps its own; a
// snapshot needs --net to start, and starts connected with eth0 up.
const root = join(import.meta.dirname, '../..');
const TIMEOUT_MS = 480_000;

describe('clade-vmm NIC (runner)', () => {
  it.skipIf(!runnerAvailable())('boots with a network, forks onto the child network', async () => {
    await make(join(root, 'native/vmm'));
    const image = resolveImage('default');
    const vmlinux = await ensureVmlinux(image);
    const before = runnerTraces();
    const r = await runInRunner({
      files: [
        { hostPath: join(root, 'native/vmm/build/clade-vmm'), guestPath: '/opt/vmm/clade-vmm' },
        { hostPath: join(root, 'native/vmm/build/vmm-agent'), guestPath: '/opt/vmm/vmm-agent' },
        { hostPath: join(root, 'native/vmm/test/linux-net.sh'), guestPath: '/opt/vmm/linux-net.sh' },
        { hostPath: vmlinux, guestPath: '/opt/img/vmlinux' },
        { hostPath: image.initramfs, guestPath: '/opt/img/initramfs.cpio' },
      ],
      command: 'sh /opt/vmm/linux-net.sh',
      timeoutMs: TIMEOUT_MS,
    });
    const output = r.output.toString();
    console.log(output.split('\n').filter((l) => l.startsWith('guest eth0') || l.includes('sink:')).join('\n'));
    const failed = output.split('\n').filter((l) => l.startsWith('check FAIL'));
    expect(failed, output).toEqual([]);
    for (const name of ['hello', 'status-net', 'mac', 'carrier', 'guest-sent', 'guest-received', 'forks-needs-dirs', 'child-net',
      'child-agent', 'snapshot-written', 'restore-needs-net', 'restored-net', 'restored-carrier', 'parent-net', 'root-sink-frames']) {
      expect(output, output).toContain(`check ok ${name}`);
    }
    expect(output).toContain('done');
    expect(runnerTraces()).toEqual(before);
  }, TIMEOUT_MS + 30_000);
});
