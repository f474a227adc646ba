import { describe, it } from 'vitest';
import { runCladePayload } from './clade-payload.js';
import { runnerAvailable } from './harness.js';

// The daemon on the vmm engine, end to end: inside the runner (whose /dev/kvm
// runs Linux guests) this Node.js runs `clade serve` from the built package,
// which picks clade-vmm by itself. Over HTTP it creates, runs, forks; then the
// daemon is SIGKILLed and restarted, adopts the VMs it recorded, kills the one
// whose record was removed, and leaves nothing once everything is deleted.
// One sandbox has a network with a forwarded port: it is adopted with its
// network (same host address still answering, record unchanged), a fork
// through the restarted daemon gets a port of its own, and deleting both
// ends their clade-net and passt. clade-net and passt are carried in for it.
// The calls are in payload/vmm-daemon-check.mjs.
// A run takes ~100 s here (~25 s of it the network's part); twice that, so a
// slow moment of the nested KVM is not taken for a hang.
const TIMEOUT_MS = 210_000;
const REQUIRED = [
  'engine-chosen-automatically', 'child-keeps-interpreter-state', 'vms-outlive-daemon', 'adopted-keeps-interpreter', 'unrecorded-vm-killed', 'no-vmm-left', 'no-sandbox-dir-left', 'daemon-stopped',
  'net-ports-listed', 'net-port-answers', 'net-recorded', 'network-outlives-daemon', 'adopted-net-same-vm', 'adopted-net-same-ports', 'adopted-net-record-intact',
  'adopted-port-still-answers', 'adopted-net-fork', 'adopted-fork-own-port', 'adopted-fork-port-answers', 'no-network-left',
];

describe('the daemon on the vmm engine (runner)', () => {
  it.skipIf(!runnerAvailable())('serves, forks, survives SIGKILL by adopting its VMs and their networks, and cleans up', async () => {
    await runCladePayload('vmm-daemon-check.mjs', { required: REQUIRED, timeoutMs: TIMEOUT_MS, network: true });
  }, TIMEOUT_MS + 30_000); // past the runner's own limit, so its clearer error is the one reported
});
