import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { hasLibFuzzer, run } from '../helpers/run.js';

// clade-vmm's device library (native/vmm/devices) on the host, no KVM: a test
// program plays the guest's PCI, virtio and 8250 drivers against fake guest
// RAM, including hostile rings and registers, and saves and restores the
// devices' plain-data state (hostile states refused); the fuzz targets (rings,
// PCI, the disk, the NIC against a hostile network socket, and the loader of a
// snapshot's state.bin) replay their seed corpus, and
// when clang's libFuzzer is installed each fuzzer also runs for a bounded time
// (native/vmm/devices/Makefile: fuzz-run).
const root = join(import.meta.dirname, '../..');
const dir = join(root, 'native/vmm/devices');
const build = join(root, 'native/vmm/build/devices');


const make = (...args: string[]) => run('make', ['-s', '-C', dir, ...args], { cwd: root, timeoutMs: 300_000 });


describe('vmm devices', () => {
  it('pass the host-side driver test', async () => {
    const b = await make('check-build');
    expect(b.output).not.toMatch(/error/);
    expect(b.status).toBe(0);
    const r = await run(join(build, 'devices-test'), [], { cwd: root, timeoutMs: 300_000 });
    expect(r.output).toMatch(/PASS: \d+ checks, 0 failed/);
    expect(r.status).toBe(0);
  }, 360_000);

  it('replay the fuzz seed corpus', async () => {
    const r = await make('replay-check');
    expect(r.output).toMatch(/replayed \d+ inputs/);
    expect(r.status).toBe(0);
  }, 360_000);

  it.skipIf(!hasLibFuzzer())('survive a bounded fuzzing run', async () => {
    // 4 targets x 20 s, and the NIC's 12 s (its build included, under 20 s more), keep the suite's fuzzing budget near a minute and a half.
    const r = await make('fuzz-run', 'FUZZ_SECONDS=20', 'FUZZ_SECONDS_NET=12');
    const out = r.output;
    expect(out).not.toMatch(/ERROR: (AddressSanitizer|libFuzzer|UndefinedBehaviorSanitizer)|runtime error|deadly signal/);
    expect(existsSync(join(build, 'fuzz-virtq'))).toBe(true);
    expect(existsSync(join(build, 'fuzz-state'))).toBe(true);
    expect(existsSync(join(build, 'fuzz-net'))).toBe(true);
    expect(r.status).toBe(0);
  }, 360_000);
});
