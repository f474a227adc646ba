import { describe, it } from 'vitest';
import { runCladePayload } from './clade-payload.js';
import { runnerAvailable } from './harness.js';

// The SDK on the vmm engine, end to end: inside the runner (whose /dev/kvm runs
// Linux guests) this Node.js runs the built SDK, which picks clade-vmm by itself,
// boots the default image, runs commands and Python, forks (children isolated,
// reseeded, renamed, interpreter kept), nests forks to depth 4, and kills
// everything. The calls are in payload/vmm-sdk-check.mjs; persistent snapshots
// (snapshot, start from it, lineage, integrity) in payload/vmm-snapshot-check.mjs.
const TIMEOUT_MS = 300_000;

describe('the SDK on the vmm engine (runner)', () => {
  it.skipIf(!runnerAvailable())('creates, runs, forks to depth 4 and cleans up, choosing clade-vmm by itself', async () => {
    await runCladePayload('vmm-sdk-check.mjs', { required: ['nested-depth-4', 'no-vmm-left'], timeoutMs: TIMEOUT_MS });
  }, TIMEOUT_MS + 60_000);

  it.skipIf(!runnerAvailable())('snapshots to disk and starts sandboxes from the snapshot', async () => {
    await runCladePayload('vmm-snapshot-check.mjs', { required: ['restore-runs', 'tampered-refused', 'no-vmm-left'], timeoutMs: TIMEOUT_MS });
  }, TIMEOUT_MS + 60_000);
});
