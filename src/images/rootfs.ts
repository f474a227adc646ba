import { execFile } from 'node:child_process';
import { chmodSync, copyFileSync, lstatSync, mkdirSync, readdirSync, readlinkSync, rmSync, statSync, symlinkSync } from 'node:fs';
import { join, posix } from 'node:path';
import { promisify } from 'node:util';
import { CladeError, errorMessage } from '../util/errors.js';
import type { CopyEntry } from './recipe.js';

const run = promisify(execFile);

/** The file a disk image's root filesystem is written to, beside the kernel and the boot initramfs. */
export const DISK_FILE = 'rootfs.erofs';

/**
 * Kernel modules a disk image's boot initramfs carries, in load order: the
 * Debian cloud kernel builds virtio-blk, erofs (and its crc32c helper) and
 * overlayfs as modules. The agent loads them before it mounts the disk.
 */
export const DISK_BOOT_MODULES = ['virtio_blk', 'libcrc32c', 'erofs', 'overlay'];

/** Where the agent looks for modules to load at boot (sorted by file name); docs/architecture.md, "Guest". */
export const GUEST_MODULES_DIR = 'usr/lib/clade/modules';

/**
 * Writes `root` as a read-only erofs image: every file owned by root, every
 * time 0 and the UUID taken from the image digest, so the same tree gives
 * the same bytes. Uncompressed: under emulation the guest would pay for
 * every decompression in kernel mode, and the host page cache holds one copy
 * of the file for every VM that reads it.
 */
export async function writeErofs(root: string, out: string, digest: string): Promise<number> {
  const h = digest.slice(0, 32);
  const uuid = `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20, 32)}`;
  try {
    await run('mkfs.erofs', ['--quiet', '-x-1', '--all-root', '-T0', `-U${uuid}`, out, root], { maxBuffer: 16 << 20 });
  } catch (err) {
    rmSync(out, { force: true });
    if ((err as NodeJS.ErrnoException).code === 'ENOENT') throw new CladeError('unavailable', 'disk images need mkfs.erofs: run `apt-get install erofs-utils` (or `npm run setup` as root)');
    throw new CladeError('internal', `mkfs.erofs failed: ${errorMessage(err)}`);
  }
  return statSync(out).size;
}

/**
 * Copies kernel modules out of the unpacked kernel package into
 * `root/usr/lib/clade/modules` as NN-name.ko (decompressed: the guest then
 * loads them without running a decompressor in emulated kernel code).
 */
export async function installModules(kernelDir: string, release: string, names: string[], root: string): Promise<void> {
  const base = join(kernelDir, 'lib/modules', release, 'kernel');
  const index = new Map<string, string>();
  const walk = (dir: string) => {
    for (const name of readdirSync(dir)) {
      const p = join(dir, name);
      if (lstatSync(p).isDirectory()) walk(p);
      else {
        const m = /^(.+)\.ko(\.xz|\.zst|\.gz)?$/.exec(name);
        if (m) index.set(m[1]!, p);
      }
    }
  };
  walk(base);
  const dest = join(root, GUEST_MODULES_DIR);
  mkdirSync(dest, { recursive: true });
  let n = 0;
  for (const name of names) {
    const src = index.get(name);
    if (!src) throw new CladeError('not_found', `the kernel ${release} has no module ${name}; it cannot boot from a disk image`);
    const target = join(dest, `${String(++n).padStart(2, '0')}-${name}.ko`);
    try {
      if (src.endsWith('.xz')) await run('sh', ['-c', 'xz -dc "$1" > "$2"', 'sh', src, target]);
      else if (src.endsWith('.zst')) await run('zstd', ['-d', '-q', '-f', src, '-o', target]);
      else if (src.endsWith('.gz')) await run('sh', ['-c', 'gzip -dc "$1" > "$2"', 'sh', src, target]);
      else copyFileSync(src, target);
    } catch (err) {
      throw new CladeError('unavailable', `could not decompress kernel module ${name} (needs xz-utils): ${errorMessage(err)}`);
    }
    chmodSync(target, 0o644);
  }
}

/** Total bytes of the regular files under `root`: what an initramfs of it would hold in RAM. */
export function treeBytes(root: string): number {
  let total = 0;
  const walk = (dir: string) => {
    for (const name of readdirSync(dir)) {
      const st = lstatSync(join(dir, name));
      if (st.isDirectory()) walk(join(dir, name));
      else if (st.isFile()) total += st.size;
    }
  };
  walk(root);
  return total;
}

const MAX_LINKS = 40;

/**
 * The host path of guest path `guest` inside the tree `root`, following the
 * tree's symlinks as the guest would (an absolute link target is taken
 * inside `root`, never on the host). The last component is followed too
 * when `followLast` (a directory copied onto /lib lands in /usr/lib).
 */
export function pathInRoot(root: string, guest: string, followLast = false): string {
  const parts = guest.split('/').filter((p) => p && p !== '.');
  const resolved: string[] = [];
  let links = 0;
  while (parts.length > 0) {
    const part = parts.shift()!;
    if (part === '..') {
      resolved.pop();
      continue;
    }
    const host = join(root, ...resolved, part);
    let st;
    try {
      st = lstatSync(host);
    } catch {
      resolved.push(part);
      continue;
    }
    if (st.isSymbolicLink() && (parts.length > 0 || followLast)) {
      if (++links > MAX_LINKS) throw new CladeError('bad_request', `too many symlinks under ${guest} in the image`);
      const target = readlinkSync(host);
      if (target.startsWith('/')) resolved.length = 0;
      parts.unshift(...target.split('/').filter((p) => p && p !== '.'));
      continue;
    }
    resolved.push(part);
  }
  return join(root, ...resolved);
}

/**
 * Copies one walked source into the tree at guest path `to`: a directory's
 * contents merge into the guest directory, a file (or link) becomes `to`.
 */
export function copyIntoRoot(root: string, from: string, to: string, entries: CopyEntry[]): void {
  for (const e of entries) {
    const guest = e.rel ? posix.join(to, e.rel) : to;
    const dest = pathInRoot(root, guest, e.kind === 'dir');
    mkdirSync(join(dest, '..'), { recursive: true });
    const src = e.rel ? join(from, e.rel) : from;
    const existing = existsOrLink(dest);
    if (e.kind === 'dir') {
      if (existing && !existing.isDirectory()) rmSync(dest, { force: true });
      mkdirSync(dest, { recursive: true });
      chmodSync(dest, e.mode);
      continue;
    }
    if (existing?.isDirectory()) throw new CladeError('bad_request', `cannot copy ${src} over the directory ${guest} in the image`);
    if (existing) rmSync(dest, { force: true });
    if (e.kind === 'symlink') symlinkSync(e.target!, dest);
    else {
      copyFileSync(src, dest);
      chmodSync(dest, e.mode);
    }
  }
}

function existsOrLink(path: string) {
  try {
    return lstatSync(path);
  } catch {
    return undefined;
  }
}
