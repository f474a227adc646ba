import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';
import { buildImage } from '../../src/images/build.js';
import { runCladePayload } from './clade-payload.js';
import { runnerAvailable } from './harness.js';

// A disk image on the vmm engine, end to end: a small image whose root is a
// read-only erofs disk (clade's base and one copied file) is built here and
// carried into the runner as its default image; inside, the SDK boots it on
// clade-vmm (the disk on its virtio-blk device), reads the copied file from
// the disk, forks two children that share the disk while each writes only its
// own RAM overlay, checks the guest cannot write the disk, and starts a
// sandbox from a snapshot that reopens the disk (and is refused when the
// disk is gone or another file). The calls are in
// payload/vmm-disk-check.mjs.
const IMAGE = 'test-vmm-disk';
const TIMEOUT_MS = 300_000;

beforeAll(async () => {
  if (!runnerAvailable()) return;
  const built = await buildImage({ name: IMAGE, packages: [], recommends: false, rootfs: 'disk', copy: [`${join(import.meta.dirname, 'disk-fixture')}:/opt/disk-check`] });
  expect(built.manifest.rootfs).toMatchObject({ kind: 'disk', fs: 'erofs' });
}, 600_000);

describe('a disk image on the vmm engine (runner)', () => {
  it.skipIf(!runnerAvailable())('boots from the read-only disk, and forks share it while their writes stay their own', async () => {
    const required = ['image-is-disk', 'engine-vmm', 'disk-read-only-whole', 'reads-erofs-file', 'python-from-disk', 'fork-children', 'child-writes-over-disk', 'sibling-sees-disk-unchanged', 'parent-sees-disk-unchanged', 'raw-disk-write-refused', 'disk-intact-after-write-attempt', 'restore-runs', 'restored-reads-disk', 'vmm-refuses-missing-disk', 'vmm-refuses-other-disk', 'no-vmm-left'];
    await runCladePayload('vmm-disk-check.mjs', { required, timeoutMs: TIMEOUT_MS, image: IMAGE });
  }, TIMEOUT_MS + 60_000);
});
