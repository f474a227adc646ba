import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { hasLibFuzzer, run } from '../helpers/run.js';

// clade-net's frame filter, egress policy and DNS responder (native/net) on
// the host, no VM: a test program sends them hand-made and hostile frames and
// DNS answers under ASan/UBSan, and when clang's libFuzzer is installed a
// fuzzer feeds them arbitrary guest frames and answers for a bounded time.
const root = join(import.meta.dirname, '../..');
const dir = join(root, 'native/net');



describe('clade-net filter', () => {
  it('passes its test of hand-made and hostile frames, and its seccomp filter allows relaying and kills the rest', async () => {
    const r = await run('make', ['-s', '-C', dir, 'check'], { cwd: root, timeoutMs: 300_000 });
    expect(r.output).toMatch(/^PASS: \d+ checks, 0 failed/m);
    expect(r.output).toMatch(/^sandbox: PASS: \d+ checks, 0 failed/m);
    expect(r.status).toBe(0);
  }, 120_000);

  it.skipIf(!hasLibFuzzer())('survives a bounded fuzzing run', async () => {
    const r = await run('make', ['-s', '-C', dir, 'fuzz-run', 'FUZZ_SECONDS=15'], { cwd: root, timeoutMs: 300_000 });
    expect(r.output).not.toMatch(/ERROR: (AddressSanitizer|libFuzzer|UndefinedBehaviorSanitizer)|runtime error|deadly signal/);
    expect(r.output).toMatch(/Done \d+ runs/);
    expect(r.status).toBe(0);
  }, 120_000);
});
