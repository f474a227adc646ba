import { describe, it } from 'vitest';
import { runCladePayload } from './clade-payload.js';
import { runnerAvailable } from './harness.js';

// Sandbox networks on the vmm engine, end to end, inside the runner (whose
// KVM runs clade-vmm's Linux guests): clade-net and passt are carried in with
// clade. A sandbox with egress 'none' and a forwarded port boots; its guest
// HTTP server answers on the runner's side; egress and DNS are refused; two
// forked children each get their own network and host port and serve their
// own state, and a killed child leaves its sibling alone; a start from a
// snapshot gets a network of its own; an allow-list admits the address it
// names and no other; and nothing (clade-vmm, clade-net, passt) outlives the
// kills. The calls are in payload/vmm-net-check.mjs.
const TIMEOUT_MS = 180_000;

describe('sandbox networks on the vmm engine (runner)', () => {
  it.skipIf(!runnerAvailable())('boot, forwarded port, egress and DNS policy, forks with networks of their own, snapshot start, no leftovers', async () => {
    const required = [
      'engine-vmm', 'guest-has-nic', 'ports-listed', 'port-forward-answers', 'egress-none-refuses-tcp', 'dns-outside-list-fails',
      'fork-children', 'children-own-host-ports', 'child-a-serves-own-state', 'child-b-serves-own-state', 'parent-serves-own-state', 'child-keeps-egress-none',
      'sibling-unaffected', 'killed-child-port-closed', 'restore-runs', 'restored-serves-on-own-port',
      'egress-list-allows-named-address', 'egress-list-refuses-other-address', 'no-vmm-left', 'no-network-left',
    ];
    await runCladePayload('vmm-net-check.mjs', { required, timeoutMs: TIMEOUT_MS, network: true });
  }, TIMEOUT_MS + 60_000);
});
