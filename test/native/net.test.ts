import { spawn, spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

// clade-net's frame filter, egress policy and DNS responder (native/net) on
// the host, no VM: a test program sends them hand-made and hostile frames and
// DNS answers under ASan/UBSan, and when clang's libFuzzer is installed a
// fuzzer feeds them arbitrary guest frames and answers for a bounded time.
const root = join(import.meta.dirname, '../..');
const dir = join(root, 'native/net');

// Asynchronous, so that the fuzzing run does not block vitest's worker.
function run(cmd: string, args: string[]): Promise<{ status: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { cwd: root, timeout: 300_000 });
    let out = '';
    child.stdout.on('data', (d) => (out += d));
    child.stderr.on('data', (d) => (out += d));
    child.on('close', (status) => resolve({ status, out }));
  });
}

function hasLibFuzzer(): boolean {
  const probe = spawnSync('bash', ['-c', 'echo "int LLVMFuzzerTestOneInput(const char *d, long n){(void)d;(void)n;return 0;}" | clang -x c -fsanitize=fuzzer -o /dev/null -'], { encoding: 'utf8' });
  return probe.status === 0;
}

describe('clade-net filter', () => {
  it('passes its test of hand-made and hostile frames', async () => {
    const r = await run('make', ['-s', '-C', dir, 'check']);
    expect(r.out).toMatch(/PASS: \d+ checks, 0 failed/);
    expect(r.status).toBe(0);
  }, 120_000);

  it.skipIf(!hasLibFuzzer())('survives a bounded fuzzing run', async () => {
    const r = await run('make', ['-s', '-C', dir, 'fuzz-run', 'FUZZ_SECONDS=15']);
    expect(r.out).not.toMatch(/ERROR: (AddressSanitizer|libFuzzer|UndefinedBehaviorSanitizer)|runtime error|deadly signal/);
    expect(r.out).toMatch(/Done \d+ runs/);
    expect(r.status).toBe(0);
  }, 120_000);
});
