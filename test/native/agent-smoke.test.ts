import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { defaultManager, killSandboxesOnExit } from '../../src/core/default.js';
import { leftNothing } from '../helpers/leaks.js';
import { run } from '../helpers/run.js';

const root = join(import.meta.dirname, '../..');
const smoke = join(root, 'native/agent/test/smoke.py');

// The agent's own protocol checks (exec, files, limits, malformed, truncated,
// oversized and unauthenticated frames, realignment after a host's partial
// frame), run against the real binary in development mode over a socketpair.
describe('guest agent', () => {
  it('passes its protocol self-check', async () => {
    const r = await run('python3', [smoke], { timeoutMs: 120_000, cwd: root });
    expect(r.stdout + r.stderr).toMatch(/PASS: \d+ checks, 0 failed/);
    expect(r.status).toBe(0);
  });

  // The same checks against PID 1 of a booted guest, over its virtio-serial port,
  // plus real reconnects: the host end closes mid-frame and reopens before the
  // agent notices (at once, and while the guest is busy).
  it('realigns its stream in a real guest when the host reconnects mid-frame', async () => {
    killSandboxesOnExit();
    const sb = await defaultManager().create();
    try {
      sb.agent.close(); // the port takes one host connection at a time
      const checks = ['hello', 'exec_exit_code', 'streams', 'resync_payload', 'resync_header', 'resync_tail', 'resync_split', 'resync_too_large', 'resync_same_id', 'resync_write', 'resync_no_false_alarm', 'reconnect', 'fork_fixup'];
      const out = await run('python3', [smoke, '--socket', sb.vm.agentSocket, '--token', sb.token.toString('hex'), '--id', sb.id, '--only', checks.join(',')], { cwd: root, timeoutMs: 170_000 });
      const text = out.stdout + out.stderr;
      expect(text).toMatch(/PASS: \d+ checks, 0 failed/);
      expect(text).toMatch(/reconnects, [1-9]\d* before the agent noticed the close/);
      expect(out.status).toBe(0);
    } finally {
      await sb.kill();
    }
    expect(leftNothing(sb.id)).toBe(true);
  });
});

