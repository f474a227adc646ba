import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, closeSync, constants, copyFileSync, fchmodSync, lstatSync, mkdirSync, openSync, readdirSync, readlinkSync, rmSync, statSync, symlinkSync, writeSync } from 'node:fs';
import { dirname, join, posix, relative, sep } from 'node:path';
import { promisify } from 'node:util';
import { CladeError, errorMessage } from '../util/errors.js';
import { type CopyEntry, readRegularFile } from './recipe.js';

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
  chmodSync(out, 0o600); // it holds the image's copied host files: its owner's to read
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
 * Links already in the tree (the packages', or ones an earlier entry or copy
 * made) are resolved inside the tree by pathInRoot; nothing here lets the
 * host kernel follow one: every parent is checked with lstat, and files and
 * links are created new (O_EXCL, O_NOFOLLOW).
 */
export function copyIntoRoot(root: string, from: string, to: string, entries: CopyEntry[]): void {
  for (const e of entries) {
    const guest = e.rel ? posix.join(to, e.rel) : to;
    const dest = pathInRoot(root, guest, e.kind === 'dir');
    if (dest !== root) makeRealDirs(root, dirname(dest), guest);
    const src = e.rel ? join(from, e.rel) : from;
    const existing = existsOrLink(dest);
    if (e.kind === 'dir') {
      if (existing && !existing.isDirectory()) rmSync(dest, { force: true });
      makeRealDirs(root, dest, guest);
      chmodSync(dest, e.mode); // a real directory: makeRealDirs checked it with lstat
      continue;
    }
    if (existing?.isDirectory()) throw new CladeError('bad_request', `cannot copy ${src} over the directory ${guest} in the image`);
    if (existing) rmSync(dest, { force: true });
    if (e.kind === 'symlink') symlinkSync(e.target!, dest); // symlink(2) never follows an existing name
    else copyWalkedFile(src, dest, e);
  }
}

/** Creates `dir` (inside `root`) and its parents one at a time, refusing any that is not a real directory. */
function makeRealDirs(root: string, dir: string, guest: string): void {
  let at = root;
  for (const part of relative(root, dir).split(sep).filter((p) => p.length > 0)) {
    at = join(at, part);
    try {
      mkdirSync(at);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw err;
    }
    const st = lstatSync(at);
    if (st.isSymbolicLink() || !st.isDirectory()) throw new CladeError('bad_request', `cannot copy to ${guest}: /${relative(root, at)} in the image is ${st.isSymbolicLink() ? 'a symlink' : 'not a directory'}`);
  }
}

/**
 * Copies a file the walk hashed, checking it against the walk: a file that
 * changed since (or was swapped for a link or a FIFO) would make the image
 * differ from what its digest says, so the build stops instead.
 */
function copyWalkedFile(src: string, dest: string, e: CopyEntry): void {
  const out = openSync(dest, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
  const h = createHash('sha256');
  try {
    const read = readRegularFile(src, e.size, (chunk) => {
      h.update(chunk);
      for (let off = 0; off < chunk.length; ) off += writeSync(out, chunk, off, chunk.length - off);
    });
    if (!read.complete || h.digest('hex') !== e.sha256) throw new CladeError('conflict', `copy source ${src} changed while the image was being built; build again once it stops changing`);
    fchmodSync(out, e.mode);
  } finally {
    closeSync(out);
  }
}

function existsOrLink(path: string) {
  try {
    return lstatSync(path);
  } catch {
    return undefined;
  }
}
