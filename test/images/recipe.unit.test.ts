import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readdirSync, readFileSync, readlinkSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { missingPackages } from '../../src/images/apt.js';
import { applyAlternatives, buildCaBundle, parseAlternatives } from '../../src/images/maintainer.js';
import { MAX_COPY_BYTES, MAX_COPY_ENTRIES, normalizeRecipe, parseCopy, readRecipeFile, walkCopySource } from '../../src/images/recipe.js';
import { copyIntoRoot, pathInRoot } from '../../src/images/rootfs.js';

const dir = mkdtempSync(join(tmpdir(), 'clade-recipe-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('image recipes', () => {
  it('reads YAML and JSON recipes, with copy sources relative to the file', () => {
    mkdirSync(join(dir, 'src'), { recursive: true });
    writeFileSync(join(dir, 'r.yaml'), 'name: dev\npackages: [git, gcc]\ncopy:\n  - src:/root/src\nenv:\n  MODE: test\nrootfs: disk\n');
    const y = readRecipeFile(join(dir, 'r.yaml'));
    expect(y).toMatchObject({ name: 'dev', packages: ['git', 'gcc'], env: { MODE: 'test' }, rootfs: 'disk' });
    expect(y.copy).toEqual([{ from: join(dir, 'src'), to: '/root/src' }]);
    writeFileSync(join(dir, 'r.json'), JSON.stringify({ packages: ['nodejs'], copy: [{ from: 'src', to: '/opt/x' }] }));
    expect(readRecipeFile(join(dir, 'r.json')).copy).toEqual([{ from: join(dir, 'src'), to: '/opt/x' }]);
  });

  it('refuses bad recipes with the offending entry named', () => {
    writeFileSync(join(dir, 'bad.yaml'), 'packages: git\n');
    expect(() => readRecipeFile(join(dir, 'bad.yaml'))).toThrow(/packages/);
    writeFileSync(join(dir, 'extra.json'), '{"pakages": ["git"]}');
    expect(() => readRecipeFile(join(dir, 'extra.json'))).toThrow(/not valid/);
    expect(() => readRecipeFile(join(dir, 'missing.yaml'))).toThrow(/cannot read/);
    expect(() => normalizeRecipe({ packages: ['-o=Dir::Etc=/'] })).toThrow(/not a Debian package name/);
    expect(() => normalizeRecipe({ packages: ['Git'] })).toThrow(/"Git"/);
    expect(() => normalizeRecipe({ env: { '1X': 'y' } })).toThrow(/1X/);
    expect(() => normalizeRecipe({ copy: ['/definitely/not/here:/root/x'] })).toThrow(/copy source \/definitely\/not\/here does not exist/);
    expect(() => normalizeRecipe({ copy: [`${dir}:relative/path`] })).toThrow(/absolute guest path/);
    expect(() => normalizeRecipe({ copy: [`${dir}:/tmp/x`] })).toThrow(/mounts over at boot/);
    expect(() => normalizeRecipe({ copy: [`${dir}:/root/../etc`] })).toThrow(/\.\./);
    expect(() => parseCopy('nocolon')).toThrow(/HOSTPATH:GUESTPATH/);
    expect(parseCopy('/a:b/c:/root/x')).toEqual({ from: '/a:b/c', to: '/root/x' });
    expect(normalizeRecipe({ packages: ['git', 'gcc', 'git', 'python3=3.11.2-1+b1'] }).packages).toEqual(['gcc', 'git', 'python3=3.11.2-1+b1']);
  });

  it('names the packages apt cannot find', () => {
    const stderr = "E: Unable to locate package nosuch\nE: Package 'virt' has no installation candidate\nE: Version '9.9' for 'git' was not found\n";
    expect(missingPackages(stderr)).toEqual(['nosuch', 'virt', 'git=9.9']);
  });
});

describe('maintainer script effects', () => {
  it('reads update-alternatives calls, continued lines and known variables included', () => {
    const script = [
      'update-alternatives --install /usr/bin/awk awk /usr/bin/mawk 5 \\',
      '  --slave /usr/bin/nawk nawk /usr/bin/mawk',
      'update-alternatives --install /usr/lib/${DEB_HOST_MULTIARCH}/libblas.so.3 libblas.so.3-${DEB_HOST_MULTIARCH} /usr/lib/${DEB_HOST_MULTIARCH}/blas/libblas.so.3 10',
      'for f in a b; do update-alternatives --install /usr/bin/$f $f /usr/bin/x 1; done',
      'update-alternatives --remove awk /usr/bin/mawk',
    ].join('\n');
    const alts = parseAlternatives(script);
    expect(alts).toEqual([
      { name: 'awk', link: '/usr/bin/awk', path: '/usr/bin/mawk', priority: 5, slaves: [{ link: '/usr/bin/nawk', name: 'nawk', path: '/usr/bin/mawk' }] },
      { name: 'libblas.so.3-x86_64-linux-gnu', link: '/usr/lib/x86_64-linux-gnu/libblas.so.3', path: '/usr/lib/x86_64-linux-gnu/blas/libblas.so.3', priority: 10, slaves: [] },
    ]);
  });

  it('links the highest-priority alternative that exists, through /etc/alternatives', () => {
    const root = join(dir, 'alt-root');
    mkdirSync(join(root, 'usr/bin'), { recursive: true });
    writeFileSync(join(root, 'usr/bin/gcc'), '');
    writeFileSync(join(root, 'usr/bin/clang'), '');
    const linked = applyAlternatives(root, [
      { name: 'cc', link: '/usr/bin/cc', path: '/usr/bin/gcc', priority: 20, slaves: [] },
      { name: 'cc', link: '/usr/bin/cc', path: '/usr/bin/clang', priority: 10, slaves: [] },
      { name: 'cc', link: '/usr/bin/cc', path: '/usr/bin/missing', priority: 99, slaves: [] },
    ]);
    expect(linked).toEqual(['cc']);
    expect(readlinkSync(join(root, 'usr/bin/cc'))).toBe('/etc/alternatives/cc');
    expect(readlinkSync(join(root, 'etc/alternatives/cc'))).toBe('/usr/bin/gcc');
  });

  it('builds the CA bundle from the certificate store', () => {
    const root = join(dir, 'ca-root');
    mkdirSync(join(root, 'usr/share/ca-certificates/mozilla'), { recursive: true });
    writeFileSync(join(root, 'usr/share/ca-certificates/mozilla/B.crt'), 'B\n');
    writeFileSync(join(root, 'usr/share/ca-certificates/mozilla/A.crt'), 'A');
    expect(buildCaBundle(root)).toBe(2);
    expect(readFileSync(join(root, 'etc/ssl/certs/ca-certificates.crt'), 'utf8')).toBe('A\nB\n');
    expect(readlinkSync(join(root, 'usr/lib/ssl/cert.pem'))).toBe('/etc/ssl/certs/ca-certificates.crt');
  });
});

describe('copies into the image tree', () => {
  it('follows the tree\'s links inside the tree, never out to the host', () => {
    const root = join(dir, 'tree');
    mkdirSync(join(root, 'usr/lib'), { recursive: true });
    mkdirSync(join(root, 'etc/ssl/certs'), { recursive: true });
    symlinkSync('usr/lib', join(root, 'lib'));
    symlinkSync('/etc/ssl/certs', join(root, 'usr/lib/certs')); // absolute: must stay inside root
    expect(pathInRoot(root, '/lib/x')).toBe(join(root, 'usr/lib/x'));
    expect(pathInRoot(root, '/usr/lib/certs/my.pem')).toBe(join(root, 'etc/ssl/certs/my.pem'));
    expect(pathInRoot(root, '/lib', true)).toBe(join(root, 'usr/lib'));
    expect(pathInRoot(root, '/../../etc/passwd')).toBe(join(root, 'etc/passwd'));
  });

  it('copies a directory\'s contents with modes and links, hashed the same each time', () => {
    const src = join(dir, 'copy-src');
    mkdirSync(join(src, 'sub'), { recursive: true });
    writeFileSync(join(src, 'run.sh'), '#!/bin/sh\n', { mode: 0o755 });
    writeFileSync(join(src, 'sub/data'), 'x');
    symlinkSync('run.sh', join(src, 'link'));
    const walked = walkCopySource(src);
    expect(walked.entries.map((e) => [e.rel, e.kind])).toEqual([['', 'dir'], ['link', 'symlink'], ['run.sh', 'file'], ['sub', 'dir'], ['sub/data', 'file']]);
    expect(walkCopySource(src)).toEqual(walked);
    const root = join(dir, 'copy-root');
    mkdirSync(root);
    copyIntoRoot(root, src, '/opt/app', walked.entries);
    expect(readFileSync(join(root, 'opt/app/sub/data'), 'utf8')).toBe('x');
    expect(readlinkSync(join(root, 'opt/app/link'))).toBe('run.sh');
    writeFileSync(join(src, 'sub/data'), 'y');
    expect(walkCopySource(src).entries.find((e) => e.rel === 'sub/data')!.sha256).not.toBe(walked.entries.find((e) => e.rel === 'sub/data')!.sha256);
  });
});

describe('copies that meet links', () => {
  it('write later entries through an earlier copy\'s link inside the tree, never onto the host', () => {
    const outside = join(dir, 'outside');
    mkdirSync(outside);
    const root = join(dir, 'link-root');
    mkdirSync(root);
    const absolute = join(dir, 'abs-link');
    symlinkSync(outside, absolute);
    const relativeUp = join(dir, 'rel-link');
    symlinkSync(`${'../'.repeat(12)}${outside.slice(1)}`, relativeUp);
    const src = join(dir, 'payload');
    mkdirSync(src);
    writeFileSync(join(src, 'f'), 'x');
    for (const [link, to] of [[absolute, '/opt/a'], [relativeUp, '/opt/b']] as const) {
      copyIntoRoot(root, link, to, walkCopySource(link).entries);
      copyIntoRoot(root, src, to, walkCopySource(src).entries);
      copyIntoRoot(root, join(src, 'f'), `${to}/g`, walkCopySource(join(src, 'f')).entries);
    }
    expect(readdirSync(outside)).toEqual([]);
    expect(readdirSync(join(root, outside)).sort()).toEqual(['f', 'g']);
  });

  it('refuse a destination whose parent is a file, and a source that changed since it was hashed', () => {
    const root = join(dir, 'strict-root');
    mkdirSync(join(root, 'etc'), { recursive: true });
    writeFileSync(join(root, 'etc/passwd'), 'root\n');
    const file = join(dir, 'changing');
    writeFileSync(file, 'before');
    const walked = walkCopySource(file).entries;
    expect(() => copyIntoRoot(root, file, '/etc/passwd/x', walked)).toThrow(/\/etc\/passwd in the image is not a directory/);
    writeFileSync(file, 'after!');
    expect(() => copyIntoRoot(root, file, '/opt/changing', walked)).toThrow(/changed while the image was being built/);
    writeFileSync(file, 'before and longer');
    expect(() => copyIntoRoot(root, file, '/opt/longer', walked)).toThrow(/changed while the image was being built/);
  });
});

describe('copy sources', () => {
  it('refuse kernel and device files, by path or through a link, before reading them', () => {
    expect(() => walkCopySource('/proc/self/pagemap')).toThrow(/copy source \/proc\/self\/pagemap is under \/proc \(it is \/proc\/\d+\/pagemap\): kernel state and devices are not files/);
    expect(() => walkCopySource('/dev/zero')).toThrow(/under \/dev/);
    expect(() => walkCopySource('/sys/kernel')).toThrow(/under \/sys/);
    const viaLink = join(dir, 'proc-link');
    symlinkSync('/proc/self', viaLink);
    expect(() => walkCopySource(join(viaLink, 'pagemap'))).toThrow(/under \/proc \(it is \/proc\/\d+\/pagemap\)/);
    expect(walkCopySource(viaLink).entries).toEqual([{ rel: '', kind: 'symlink', mode: 0o777, size: 0, sha256: '', target: '/proc/self' }]); // a link is copied as a link, not read
  });

  it('refuse a FIFO as the source without blocking on it, and skip one inside a directory', () => {
    const fifo = join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    expect(() => walkCopySource(fifo)).toThrow(/copy source .*fifo is a FIFO: only files, directories and symlinks/);
    const tree = join(dir, 'with-fifo');
    mkdirSync(tree);
    writeFileSync(join(tree, 'a'), 'a');
    execFileSync('mkfifo', [join(tree, 'pipe')]);
    expect(walkCopySource(tree)).toMatchObject({ entries: [{ rel: '' }, { rel: 'a' }], skipped: ['pipe'] });
  });

  it('stop at the total size and entry count a recipe may copy', () => {
    const tree = join(dir, 'budget');
    mkdirSync(tree);
    writeFileSync(join(tree, 'a'), 'ab');
    expect(() => walkCopySource(tree, { bytes: MAX_COPY_BYTES - 1, entries: 0 })).toThrow(/the copies hold more than 8 GiB \(reached at .*budget\/a\)/);
    expect(() => walkCopySource(tree, { bytes: 0, entries: MAX_COPY_ENTRIES - 1 })).toThrow(/more than 200000 files, directories and links/);
    const budget = { bytes: 0, entries: 0 };
    walkCopySource(tree, budget);
    walkCopySource(tree, budget);
    expect(budget).toEqual({ bytes: 4, entries: 4 }); // shared by the copies of one recipe
  });
});

describe('disk images on clade-vmm', () => {
  it('are accepted: clade-vmm attaches the disk read-only, with a network too', async () => {
    const { VmmEngine } = await import('../../src/engines/vmm/vmm-engine.js');
    const image = { disk: '/x.erofs', manifest: { name: 'big' }, kernel: '', initramfs: '', dir: '' };
    expect(new VmmEngine().refusesShape({ image, memoryMiB: 512, cpus: 1 } as never)).toBeUndefined();
    expect(new VmmEngine().refusesShape({ image, memoryMiB: 512, cpus: 1, network: { egress: 'none', ports: [] } } as never)).toBeUndefined();
  });

  it('leave the engine choice on clade-vmm', async () => {
    const { SandboxManager } = await import('../../src/core/manager.js');
    const { VmmEngine } = await import('../../src/engines/vmm/vmm-engine.js');
    const vmm = new VmmEngine();
    const stub = (e: object) => Object.assign(e, { unavailableReason: async () => undefined });
    const manager = new SandboxManager({ vmm: stub(vmm) as never, qemu: stub({ refusesShape: undefined }) as never });
    const disk = { image: { disk: '/x.erofs', manifest: { name: 'big' } }, memoryMiB: 512, cpus: 1 } as never;
    const saved = process.env.CLADE_ENGINE;
    delete process.env.CLADE_ENGINE;
    try {
      expect(await manager.chooseEngine(undefined, disk)).toBe('vmm');
      expect(await manager.chooseEngine('vmm', disk)).toBe('vmm');
    } finally {
      if (saved !== undefined) process.env.CLADE_ENGINE = saved;
    }
  });
});

describe('guest memory for an initramfs', () => {
  it('is refused when the archive cannot unpack in it, with both ways out named', async () => {
    const { minimumMemoryMiB } = await import('../../src/images/store.js');
    const image = (initramfsBytes: number, disk?: string) => ({ manifest: { name: 'img', initramfsBytes }, ...(disk ? { disk } : {}) }) as never;
    expect(minimumMemoryMiB(image(120 * 2 ** 20))).toBe(496); // clade's base boots in 512
    expect(minimumMemoryMiB(image(403 * 2 ** 20))).toBe(1062); // did not unpack in 1024
    expect(minimumMemoryMiB(image(1 << 20, '/rootfs.erofs'))).toBe(0);
  });
});
