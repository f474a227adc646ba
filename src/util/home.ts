import { createHash } from 'node:crypto';
import { chmodSync, closeSync, constants, existsSync, lstatSync, mkdirSync, openSync, statfsSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';
import { CladeError } from './errors.js';

/**
 * All of a user's clade state lives under one directory: `CLADE_HOME`, or
 * `~/.clade`. Nothing else is written outside it except temporary files.
 */
export function cladeHome(): string {
  const fromEnv = process.env.CLADE_HOME;
  return resolve(fromEnv && fromEnv.length > 0 ? fromEnv : join(homedir(), '.clade'));
}

export const homePaths = {
  images: () => join(cladeHome(), 'images'),
  imageRefs: () => join(cladeHome(), 'images', 'refs'),
  aptCache: () => join(cladeHome(), 'cache', 'apt'),
  sandboxes: () => join(cladeHome(), 'sandboxes'),
  snapshots: () => join(cladeHome(), 'snapshots'),
  templates: () => join(cladeHome(), 'templates'),
  tmp: () => join(cladeHome(), 'tmp'),
};

/** Creates a directory (and parents) readable only by its owner; a clade home made looser by an older clade is tightened. */
export function ensurePrivateDir(path: string): string {
  mkdirSync(path, { recursive: true, mode: 0o700 });
  tightenHome();
  return path;
}

const tightened = new Set<string>();

/**
 * Older clades created the home 0755, so other local users could read image
 * recipes (their env values) and copied files. The home is clade's own
 * directory: once per process, if it is ours and open to others, it is closed.
 */
function tightenHome(): void {
  const home = cladeHome();
  if (tightened.has(home)) return;
  tightened.add(home);
  try {
    const st = lstatSync(home);
    if (st.isDirectory() && st.uid === process.getuid?.() && st.mode & 0o077) chmodSync(home, 0o700);
  } catch {
    // no home yet (the caller made a directory elsewhere): nothing to tighten
  }
}

/**
 * Guest RAM files live in shared memory (tmpfs) so that a sandbox's memory can
 * be frozen as a snapshot and mapped copy-on-write by forks without touching a
 * disk. One directory per clade home, removed with the VMs that use it.
 */
export function memoryDir(): string {
  const base = existsSync('/dev/shm') ? '/dev/shm' : join(cladeHome(), 'run');
  const tag = createHash('sha256').update(cladeHome()).digest('hex').slice(0, 10);
  return join(base, `clade-${tag}`);
}

/**
 * Creates the RAM directory if needed and proves it private before any guest
 * RAM goes in it: created without parents, then checked with lstat (a real
 * directory, not a symlink, owned by this user, mode 0700). /dev/shm is
 * shared by every local user, so a directory someone else made at this name,
 * or loosened, is refused rather than used.
 */
export function ensureMemoryDir(): string {
  const dir = memoryDir();
  if (!dir.startsWith('/dev/shm/')) ensurePrivateDir(join(dir, '..'));
  try {
    mkdirSync(dir, { mode: 0o700 });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw new CladeError('unavailable', `cannot create the RAM directory ${dir}: ${(err as Error).message}`);
  }
  const st = lstatSync(dir);
  const uid = process.getuid?.();
  if (st.isSymbolicLink() || !st.isDirectory() || (uid !== undefined && st.uid !== uid) || (st.mode & 0o777) !== 0o700) {
    const what = st.isSymbolicLink() ? 'a symlink' : !st.isDirectory() ? 'not a directory' : `owned by uid ${st.uid} with mode ${(st.mode & 0o777).toString(8)}`;
    throw new CladeError('unavailable', `the RAM directory ${dir} is ${what}, not a private directory of yours (mode 700); guest RAM will not be put there. Remove it if it is yours (\`rm -rf ${dir}\`), or set CLADE_HOME to move clade elsewhere`);
  }
  return dir;
}

/**
 * Creates a RAM file for a VM: exclusively (never an existing file, never
 * through a symlink), mode 0600, in the checked RAM directory. Returns its
 * open descriptor, which the VM process inherits and maps.
 */
export function createRamFile(path: string): number {
  try {
    return openSync(path, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
  } catch (err) {
    throw new CladeError('internal', `cannot create the RAM file ${path}: ${(err as Error).message}`);
  }
}

export function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {
    // Already closed.
  }
}

/**
 * Refuses a VM whose RAM could not all fit in the RAM directory's filesystem:
 * a full tmpfs would kill the VM with SIGBUS when its guest touched the rest.
 */
export function assertRamFits(memoryMiB: number): void {
  const dir = memoryDir();
  const st = statfsSync(dir);
  const freeMiB = Math.floor((Number(st.bavail) * Number(st.bsize)) / (1024 * 1024));
  if (freeMiB < memoryMiB) {
    throw new CladeError('unavailable', `not enough room for ${memoryMiB} MiB of guest RAM in ${dir} (${freeMiB} MiB free): kill some sandboxes, ask for less memory (memoryMiB), or enlarge /dev/shm`);
  }
}
