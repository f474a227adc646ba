import { execFileSync } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeEach, describe, expect, it } from 'vitest';
import { AptUniverse } from '../../src/images/apt.js';
import { writeCpio } from '../../src/images/cpio.js';
import { writeErofs } from '../../src/images/rootfs.js';
import { imageKernelArgs, listImages, removeImage, resolveImage } from '../../src/images/store.js';
import { ensurePrivateDir, homePaths } from '../../src/util/home.js';

// The image store reading what is on disk: image.json and the name refs are
// checked before anything in them is used, and a damaged image can still be
// removed, by its own directory only.

const home = mkdtempSync(join(tmpdir(), 'clade-store-'));
process.env.CLADE_HOME = home;
afterAll(() => rmSync(home, { recursive: true, force: true }));

const GOOD = 'a'.repeat(64);
const BROKEN = 'b'.repeat(64);

function manifest(digest: string, over: Record<string, unknown> = {}): Record<string, unknown> {
  return {
    digest,
    name: 'img',
    createdAt: '2026-01-01T00:00:00.000Z',
    kernel: { package: 'linux-image-6.12.1-cloud-amd64', version: '6.12.1-1', release: '6.12.1-cloud-amd64' },
    packages: ['bash=5.2.15-2+b13'],
    agentSha256: 'c'.repeat(64),
    initramfsBytes: 10,
    kernelBytes: 10,
    files: 3,
    recipe: 3,
    spec: { packages: [], copy: [{ from: '/src', to: '/opt/src' }], env: { MODE: 'x' }, recommends: true, rootfs: 'disk' },
    rootfs: { kind: 'disk', fs: 'erofs', file: 'rootfs.erofs', bytes: 4096 },
    treeBytes: 100,
    ...over,
  };
}

function storeImage(digest: string, content: Record<string, unknown> | string, name?: string): void {
  mkdirSync(join(homePaths.images(), digest), { recursive: true });
  writeFileSync(join(homePaths.images(), digest, 'image.json'), typeof content === 'string' ? content : JSON.stringify(content));
  if (name) {
    mkdirSync(homePaths.imageRefs(), { recursive: true });
    writeFileSync(join(homePaths.imageRefs(), name), `${digest}\n`);
  }
}

beforeEach(() => {
  rmSync(home, { recursive: true, force: true });
  mkdirSync(home);
  writeFileSync(join(home, 'keep'), 'must survive');
});

describe('image manifests read from disk', () => {
  it('are used when they pass the schema', () => {
    storeImage(GOOD, manifest(GOOD), 'good');
    const image = resolveImage('good');
    expect(image.disk).toBe(join(homePaths.images(), GOOD, 'rootfs.erofs'));
    expect(imageKernelArgs(image)).toEqual(['clade.root=/dev/vda', 'clade.rootfstype=erofs']);
    expect(listImages().map((i) => [i.digest, i.names])).toEqual([[GOOD, ['good']]]);
  });

  it.each([
    ['a digest that is not its directory', { digest: '../..' }],
    ['another image\'s digest', { digest: GOOD }],
    ['a file system that is not erofs', { rootfs: { kind: 'disk', fs: 'erofs rdinit=/bin/sh', file: 'rootfs.erofs', bytes: 1 } }],
    ['a disk file that is a path', { rootfs: { kind: 'disk', fs: 'erofs', file: '../../keep', bytes: 1 } }],
    ['an unknown rootfs kind', { rootfs: { kind: 'nfs' } }],
    ['env that is not strings', { spec: { packages: [], copy: [], env: { A: 1 }, rootfs: 'auto' } }],
    ['a kernel release that is a path', { kernel: { package: 'linux-image-x', version: '1', release: '../../x' } }],
    ['a package that is an apt option', { packages: ['-o=Dir::Etc=/'] }],
    ['a field clade never writes', { extra: true }],
  ])('with %s are a damaged image, named with the ways out', (_what, over) => {
    storeImage(BROKEN, manifest(BROKEN, over), 'broken');
    expect(() => resolveImage('broken')).toThrow(new RegExp(`image bbbbbbbbbbbb is damaged .*clade image build.*clade image rm ${BROKEN}`));
    expect(listImages()).toEqual([]);
  });

  it('that are not JSON, or not a regular file, are damaged too', () => {
    storeImage(BROKEN, '{"digest":', 'broken');
    expect(() => resolveImage('broken')).toThrow(/is damaged/);
    rmSync(join(homePaths.images(), BROKEN, 'image.json'));
    symlinkSync(join(homePaths.images(), GOOD, 'image.json'), join(homePaths.images(), BROKEN, 'image.json'));
    storeImage(GOOD, manifest(GOOD));
    expect(() => resolveImage(BROKEN)).toThrow(/is damaged/);
  });
});

describe('removing images', () => {
  it('removes a damaged image whose manifest names "../..", by name or digest, and nothing else', () => {
    storeImage(GOOD, manifest(GOOD), 'good');
    storeImage(BROKEN, manifest(BROKEN, { digest: '../..' }), 'broken');
    expect(removeImage('broken')).toEqual({ digest: BROKEN, names: ['broken'] });
    expect(readdirSync(homePaths.images()).sort()).toEqual([GOOD, 'refs']);
    expect(existsSync(join(home, 'keep'))).toBe(true);
    storeImage(BROKEN, manifest(BROKEN, { digest: '../..' }));
    expect(removeImage(BROKEN.slice(0, 8)).digest).toBe(BROKEN);
    expect(readdirSync(homePaths.images()).sort()).toEqual([GOOD, 'refs']);
    expect(resolveImage('good').manifest.digest).toBe(GOOD);
  });

  it('treats a name whose ref file holds a path as no image at all', () => {
    mkdirSync(homePaths.imageRefs(), { recursive: true });
    writeFileSync(join(homePaths.imageRefs(), 'evil'), '../..\n');
    expect(() => resolveImage('evil')).toThrow(/unknown image "evil"/);
    expect(() => removeImage('evil')).toThrow(/unknown image "evil"/);
    expect(existsSync(join(home, 'keep'))).toBe(true);
  });
});

describe('what a build writes', () => {
  const mode = (path: string) => statSync(path).mode & 0o777;
  const hasMkfsErofs = (() => {
    try {
      execFileSync('mkfs.erofs', ['--help'], { stdio: 'ignore' });
      return true;
    } catch {
      return false;
    }
  })();

  it('makes the clade home and the image directories private when it creates them', () => {
    rmSync(home, { recursive: true, force: true });
    new AptUniverse().prepare(); // the first thing a build writes
    for (const dir of [home, join(home, 'cache'), homePaths.aptCache(), join(homePaths.aptCache(), 'lists/partial')]) expect(mode(dir)).toBe(0o700);
    rmSync(home, { recursive: true, force: true });
    const staging = ensurePrivateDir(`${join(homePaths.images(), GOOD)}.partial-1`); // as the build makes its staging directory
    for (const dir of [home, homePaths.images(), staging]) expect(mode(dir)).toBe(0o700);
  });

  it('closes a clade home an older clade left open to other users', () => {
    const older = mkdtempSync(join(tmpdir(), 'clade-older-home-'));
    chmodSync(older, 0o755);
    process.env.CLADE_HOME = older;
    try {
      ensurePrivateDir(homePaths.tmp());
      expect(mode(older)).toBe(0o700);
    } finally {
      process.env.CLADE_HOME = home;
      rmSync(older, { recursive: true, force: true });
    }
  });

  it.runIf(hasMkfsErofs)('writes the initramfs and the disk readable by their owner only', async () => {
    const tree = join(home, 'tree');
    mkdirSync(tree);
    writeFileSync(join(tree, 'secret'), 'copied host file', { mode: 0o644 });
    writeCpio(tree, join(home, 'initramfs.cpio'));
    expect(mode(join(home, 'initramfs.cpio'))).toBe(0o600);
    await writeErofs(tree, join(home, 'rootfs.erofs'), GOOD);
    expect(mode(join(home, 'rootfs.erofs'))).toBe(0o600);
  });
});
