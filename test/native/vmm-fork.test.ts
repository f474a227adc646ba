import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { make, run } from '../helpers/run.js';

// The fork core of clade-vmm on this host's /dev/kvm, with the small CPL3 test
// guest: fork isolation, nested forks to depth 10, 100 children, snapshots to
// disk and starts from them (corrupt or foreign ones refused), faults reported
// not hung, a killed parent's children keep running, hostile control input, and
// no VMM process left behind (native/vmm/test/fork_test.py).
const root = join(import.meta.dirname, '../..');
const hasKvm = existsSync('/dev/kvm');

describe('clade-vmm fork core', () => {
  const title = hasKvm ? 'forks a running VM on /dev/kvm' : 'forks a running VM (skipped: this host has no /dev/kvm)';
  it.skipIf(!hasKvm)(title, async () => {
    await make(join(root, 'native/vmm'));
    const r = await run('python3', [join(root, 'native/vmm/test/fork_test.py')], { timeoutMs: 120_000, cwd: root });
    expect(r.stdout + r.stderr).toMatch(/PASS: \d+ checks, 0 failed/);
    expect(r.status).toBe(0);
  });
});
