import { describe, expect, it } from 'vitest';
import { buildImage } from '../../src/images/build.js';
import { resolveImage } from '../../src/images/store.js';

describe('image build', () => {
  it('is a cache hit when the inputs have not changed', async () => {
    const before = resolveImage('default').manifest.digest;
    const r = await buildImage();
    expect(r.cached).toBe(true);
    expect(r.manifest.digest).toBe(before);
    expect(r.manifest.kernel.package).toMatch(/^linux-image-6\.12\..*-cloud-amd64$/);
    expect(r.manifest.packages.some((p) => p.startsWith('python3-numpy='))).toBe(true);
  });

  it('refuses bad names and unknown references', async () => {
    expect(() => resolveImage('../etc')).toThrow(/unknown image/);
    await expect(buildImage({ name: '../evil' })).rejects.toThrow(/invalid image name/);
  });
});
