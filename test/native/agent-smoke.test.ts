import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';

// The agent's own protocol checks (22 of them: exec, files, limits, malformed,
// truncated, oversized and unauthenticated frames), run against the real binary
// in development mode over a socketpair.
describe('guest agent', () => {
  it('passes its protocol self-check', () => {
    const root = join(import.meta.dirname, '../..');
    const r = spawnSync('python3', [join(root, 'native/agent/test/smoke.py')], { encoding: 'utf8', timeout: 120_000, cwd: root });
    expect(r.stdout + r.stderr).toMatch(/PASS: \d+ checks, 0 failed/);
    expect(r.status).toBe(0);
  });
});
