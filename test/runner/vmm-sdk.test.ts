import { describe, it } from 'vitest';
import { runCladePayload } from './clade-payload.js';
import { runnerAvailable } from './harness.js';

// The SDK on the vmm engine, end to end: inside the runner (whose /dev/kvm runs
// Linux guests) this Node.js runs the built SDK, which picks clade-vmm by itself,
// boots the default image, runs commands and Python, forks (children isolated,
// reseeded, renamed, interpreter kept), nests forks to depth 4, and kills
// everything; no secret shows on a clade-vmm command line or environment, each
// child's serial log is its own, a child forks after its parent was killed, and
// a fork of 300 is split into batches, each pausing the parent no longer than a fork of one
// (a spawner forks the children). The calls are in payload/vmm-sdk-check.mjs;
// persistent snapshots (snapshot, start from it, lineage, integrity, clade-vmm's
// own refusals of edited files) in payload/vmm-snapshot-check.mjs.
const TIMEOUT_MS = 300_000;

describe('the SDK on the vmm engine (runner)', () => {
  it.skipIf(!runnerAvailable())('creates, runs, forks to depth 4 and cleans up, choosing clade-vmm by itself', async () => {
    const required = ['nested-depth-4', 'no-secret-on-vmm-command-lines', 'child-serial-log-own', 'fork-after-parent-killed', 'fork-300-in-batches', 'batch-pause-as-one-fork', 'no-vmm-left'];
    await runCladePayload('vmm-sdk-check.mjs', { required, timeoutMs: TIMEOUT_MS });
  }, TIMEOUT_MS + 60_000);

  it.skipIf(!runnerAvailable())('snapshots to disk and starts sandboxes from the snapshot', async () => {
    const required = ['restore-runs', 'tampered-refused', 'vmm-refuses-changed-byte', 'vmm-refuses-device-register', 'vmm-refuses-queue-outside-ram', 'vmm-starts-unedited-copy', 'no-vmm-left'];
    await runCladePayload('vmm-snapshot-check.mjs', { required, timeoutMs: TIMEOUT_MS });
  }, TIMEOUT_MS + 60_000);
});
