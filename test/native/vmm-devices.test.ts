import { spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

// clade-vmm's device library (native/vmm/devices) on the host, no KVM: a test
// program plays the guest's PCI, virtio and 8250 drivers against fake guest
// RAM, including hostile rings and registers, and saves and restores the
// devices' plain-data state (hostile states refused); the fuzz targets (rings,
// PCI, and the loader of a snapshot's state.bin) replay their seed corpus, and
// when clang's libFuzzer is installed each fuzzer also runs for a bounded time
// (native/vmm/devices/Makefile: fuzz-run).
const root = join(import.meta.dirname, '../..');
const dir = join(root, 'native/vmm/devices');
const build = join(root, 'native/vmm/build/devices');

// Asynchronous, so that a minute of fuzzing does not block vitest's worker.
function run(cmd: string, args: string[]): Promise<{ status: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { cwd: root, timeout: 300_000 });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    child.on('close', (status) => resolve({ status, out }));
  });
}

const make = (...args: string[]) => run('make', ['-s', '-C', dir, ...args]);

function hasLibFuzzer(): boolean {
  const r = spawnSync('clang', ['--version'], { encoding: 'utf8' });
  if (r.status !== 0) return false;
  const probe = spawnSync('bash', ['-c', 'echo "int LLVMFuzzerTestOneInput(const char *d, long n){(void)d;(void)n;return 0;}" | clang -x c -fsanitize=fuzzer -o /dev/null -'], { encoding: 'utf8' });
  return probe.status === 0;
}

describe('vmm devices', () => {
  it('pass the host-side driver test', async () => {
    const b = await make('check-build');
    expect(b.out).not.toMatch(/error/);
    expect(b.status).toBe(0);
    const r = await run(join(build, 'devices-test'), []);
    expect(r.out).toMatch(/PASS: \d+ checks, 0 failed/);
    expect(r.status).toBe(0);
  }, 360_000);

  it('replay the fuzz seed corpus', async () => {
    const r = await make('replay-check');
    expect(r.out).toMatch(/replayed \d+ inputs/);
    expect(r.status).toBe(0);
  }, 360_000);

  it.skipIf(!hasLibFuzzer())('survive a bounded fuzzing run', async () => {
    // 3 targets x 20 s keeps the suite's fuzzing budget near one minute.
    const r = await make('fuzz-run', 'FUZZ_SECONDS=20');
    const out = r.out;
    expect(out).not.toMatch(/ERROR: (AddressSanitizer|libFuzzer|UndefinedBehaviorSanitizer)|runtime error|deadly signal/);
    expect(existsSync(join(build, 'fuzz-virtq'))).toBe(true);
    expect(existsSync(join(build, 'fuzz-state'))).toBe(true);
    expect(r.status).toBe(0);
  }, 360_000);
});
