import { createHash } from 'node:crypto';
import { closeSync, constants, fstatSync, lstatSync, openSync, readdirSync, readFileSync, readlinkSync, readSync, realpathSync, type Stats, statfsSync } from 'node:fs';
import { basename, dirname, isAbsolute, join, posix, resolve } from 'node:path';
import type { Static } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import { parse as parseYaml } from 'yaml';
import { CladeError, errorMessage } from '../util/errors.js';
import { ImageRecipe as ImageRecipeSchema } from '../wire/schemas.js';

/**
 * What an image is made of beyond clade's base (kernel, busybox, bash,
 * coreutils, python3, numpy, the agent): more Debian packages, host files
 * copied in, environment variables every command gets, and where the root
 * filesystem lives. The same shape comes from CLI flags, a JSON or YAML
 * recipe file, the SDK and the daemon.
 */
export type ImageRecipe = {
  /** The name the image gets (default "default"). */
  name?: string;
  /** Debian package names (bookworm, with backports), optionally `name=version`. */
  packages?: string[];
  /** Host file or directory → absolute guest path; a directory's contents go into the guest directory. */
  copy?: (CopySpec | string)[];
  env?: Record<string, string>;
  /** Also install what the named packages recommend (default true, as apt does): gcc's libc6-dev, git's ca-certificates. */
  recommends?: boolean;
  /**
   * initramfs: the whole tree in RAM (fast to boot, costs its size in every parent's RAM);
   * disk: a read-only erofs disk on virtio-blk with a RAM overlay for writes;
   * auto (default): disk when the tree is larger than AUTO_DISK_BYTES.
   */
  rootfs?: RootfsKind | 'auto';
};

export type CopySpec = { from: string; to: string };
export type RootfsKind = 'initramfs' | 'disk';

/**
 * Trees above this size become disk images under rootfs "auto": an initramfs
 * costs its size in RAM per parent, twice while the kernel unpacks it (a
 * 403 MiB one did not unpack in a 1 GiB guest). clade's base is about 120 MiB.
 */
export const AUTO_DISK_BYTES = 256 << 20;

/** A recipe checked and normalized: absolute host paths, sorted env, packages deduplicated. */
export type NormalizedRecipe = {
  name: string;
  packages: string[];
  copy: CopySpec[];
  env: Record<string, string>;
  recommends: boolean;
  rootfs: RootfsKind | 'auto';
};

const PACKAGE_RE = /^[a-z0-9][a-z0-9+.-]{0,99}(=[A-Za-z0-9.+~:-]{1,100})?$/;
/** An environment variable name a recipe may set (also checked in manifests read back from disk). */
export const ENV_KEY_PATTERN = '^[A-Za-z_][A-Za-z0-9_]{0,127}$';
const ENV_KEY_RE = new RegExp(ENV_KEY_PATTERN);
/** Guest directories that boot mounts over (or that the kernel owns): a copy there would be hidden or refused. */
const MOUNTED_AT_BOOT = ['/proc', '/sys', '/dev', '/tmp', '/run'];

/** A recipe file (JSON or YAML), and the body of the daemon's image build request: one schema, the daemon's. */
export const RecipeSchema = ImageRecipeSchema;
export type RecipeFile = Static<typeof RecipeSchema>;

/** Reads a recipe file; relative copy sources are taken from the file's own directory. */
export function readRecipeFile(path: string): ImageRecipe {
  let text: string;
  try {
    text = readFileSync(path, 'utf8');
  } catch (err) {
    throw new CladeError('not_found', `cannot read the recipe file ${path}: ${errorMessage(err)}`);
  }
  let raw: unknown;
  try {
    raw = /\.json$/i.test(path) ? JSON.parse(text) : parseYaml(text); // YAML is a superset of JSON
  } catch (err) {
    throw new CladeError('bad_request', `the recipe file ${path} is not valid ${/\.json$/i.test(path) ? 'JSON' : 'YAML'}: ${errorMessage(err)}`);
  }
  const recipe = checkRecipeShape(raw, `recipe file ${path}`);
  const base = dirname(resolve(path));
  return { ...recipe, ...(recipe.copy ? { copy: recipe.copy.map((c) => parseCopy(c)).map((c) => ({ from: resolve(base, c.from), to: c.to })) } : {}) };
}

/** Checks a recipe's shape (as a file or a request body would give it), with the first problem in the message. */
export function checkRecipeShape(raw: unknown, what = 'recipe'): RecipeFile {
  if (!Value.Check(RecipeSchema, raw)) {
    const first = [...Value.Errors(RecipeSchema, raw)][0];
    throw new CladeError('bad_request', `the ${what} is not valid: ${first ? `${first.path || '/'}: ${first.message}` : 'expected an object with name, packages, copy, env and rootfs'}`);
  }
  return raw;
}

/** "HOST:GUEST" (the guest path is after the last colon, so host paths may hold colons) or { from, to }. */
export function parseCopy(c: CopySpec | string): CopySpec {
  if (typeof c !== 'string') return c;
  const at = c.lastIndexOf(':');
  if (at <= 0 || at === c.length - 1) throw new CladeError('bad_request', `--copy takes HOSTPATH:GUESTPATH, got ${JSON.stringify(c)}`);
  return { from: c.slice(0, at), to: c.slice(at + 1) };
}

/** "K=V" strings as an env record. */
export function parseEnvPairs(pairs: string[], what = '--env'): Record<string, string> {
  const env: Record<string, string> = {};
  for (const kv of pairs) {
    const eq = kv.indexOf('=');
    if (eq <= 0) throw new CladeError('bad_request', `${what} takes KEY=VALUE, got ${JSON.stringify(kv)}`);
    env[kv.slice(0, eq)] = kv.slice(eq + 1);
  }
  return env;
}

/**
 * Checks everything that can be checked without apt: package names, env
 * names, guest paths, and that every copy source exists. Errors name the
 * offending entry.
 */
export function normalizeRecipe(r: ImageRecipe): NormalizedRecipe {
  const packages = [...new Set((r.packages ?? []).map((p) => p.trim()).filter((p) => p.length > 0))].sort();
  for (const p of packages) {
    if (!PACKAGE_RE.test(p)) throw new CladeError('bad_request', `${JSON.stringify(p)} is not a Debian package name (lower-case letters, digits, "+", "-", "."; optionally =VERSION)`);
  }
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(r.env ?? {}).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))) {
    if (!ENV_KEY_RE.test(k)) throw new CladeError('bad_request', `environment variable name ${JSON.stringify(k)} is not valid: use letters, digits and "_", not starting with a digit`);
    if (v.includes('\0')) throw new CladeError('bad_request', `environment variable ${k} holds a NUL byte`);
    env[k] = v;
  }
  const copy = (r.copy ?? []).map(parseCopy).map((c) => {
    const from = resolve(c.from);
    try {
      lstatSync(from);
    } catch {
      throw new CladeError('not_found', `copy source ${c.from} does not exist on this host; check the path (relative paths start in ${process.cwd()})`);
    }
    if (!isAbsolute(c.to) || !c.to.startsWith('/')) throw new CladeError('bad_request', `copy destination ${JSON.stringify(c.to)} must be an absolute guest path, like /root/repo`);
    if (c.to.split('/').includes('..')) throw new CladeError('bad_request', `copy destination ${JSON.stringify(c.to)} may not contain ".."`);
    const to = posix.normalize(c.to).replace(/\/+$/, '') || '/';
    const hidden = MOUNTED_AT_BOOT.find((m) => to === m || to.startsWith(`${m}/`));
    if (hidden) throw new CladeError('bad_request', `copy destination ${to} is under ${hidden}, which the guest mounts over at boot; copy somewhere else (e.g. /root or /opt)`);
    return { from, to };
  });
  const rootfs = r.rootfs ?? 'auto';
  if (!['initramfs', 'disk', 'auto'].includes(rootfs)) throw new CladeError('bad_request', `rootfs must be initramfs, disk or auto, got ${JSON.stringify(rootfs)}`);
  return { name: r.name ?? 'default', packages, copy, env, recommends: r.recommends ?? true, rootfs };
}

/** One entry of a copy source, as it goes into the guest and into the image digest. */
export type CopyEntry = { rel: string; kind: 'file' | 'dir' | 'symlink'; mode: number; size: number; sha256: string; target?: string };

/** Most bytes the copies of one recipe may read: an image is a system plus a project, not a host's data. */
export const MAX_COPY_BYTES = 8 * 2 ** 30;
/** Most entries (files, directories, links) the copies of one recipe may hold. */
export const MAX_COPY_ENTRIES = 200_000;
/** Host trees of kernel state and devices: their files can block, never end, or hold what no image should. */
const KERNEL_TREES = ['/proc', '/sys', '/dev'];
/** statfs types of procfs and sysfs, for such a tree mounted somewhere else (a chroot's /proc). */
const KERNEL_FS_TYPES = [0x9fa0, 0x62656572];

/** What the copies of one recipe used so far: shared by their walks, so the limits hold for the recipe. */
export type CopyBudget = { bytes: number; entries: number };

/**
 * Walks a copy source in sorted order and hashes it (contents, modes, link
 * targets): the digest of an image changes exactly when what it copies does.
 * Links are kept as links, never followed. Sockets, FIFOs and devices inside
 * a directory are skipped (they cannot be carried in a file tree); as the
 * source itself they are refused, as are kernel trees (/proc, /sys, /dev) and
 * copies beyond MAX_COPY_BYTES or MAX_COPY_ENTRIES.
 */
export function walkCopySource(from: string, budget: CopyBudget = { bytes: 0, entries: 0 }): { entries: CopyEntry[]; skipped: string[] } {
  const real = join(realpathSync(dirname(from)), basename(from)); // the last component is copied as it is, a link included
  const top = lstatSync(from);
  refuseKernelTree(from, from, real, top);
  if (!top.isFile() && !top.isDirectory() && !top.isSymbolicLink()) throw new CladeError('bad_request', `copy source ${from} is ${specialKind(top)}: only files, directories and symlinks can be copied into an image`);
  const entries: CopyEntry[] = [];
  const skipped: string[] = [];
  const visit = (abs: string, rel: string) => {
    if (++budget.entries > MAX_COPY_ENTRIES) throw new CladeError('too_large', `the copies hold more than ${MAX_COPY_ENTRIES} files, directories and links (reached at ${abs}): copy less, or an archive of the tree to unpack in the sandbox`);
    const st = lstatSync(abs);
    const mode = st.mode & 0o7777;
    if (st.isSymbolicLink()) entries.push({ rel, kind: 'symlink', mode: 0o777, size: 0, sha256: '', target: readlinkSync(abs) });
    else if (st.isFile()) entries.push({ rel, kind: 'file', mode, size: st.size, sha256: hashWithinBudget(abs, st.size, budget) });
    else if (st.isDirectory()) {
      refuseKernelTree(from, abs, join(real, rel), st);
      entries.push({ rel, kind: 'dir', mode, size: 0, sha256: '' });
      for (const name of readdirSync(abs).sort()) visit(join(abs, name), rel ? `${rel}/${name}` : name);
    } else skipped.push(rel || abs);
  };
  visit(from, '');
  return { entries, skipped };
}

/** Refuses `path` (at `real`, with lstat `st`) when it is in a kernel tree, by its real path or by the file system it is on. */
function refuseKernelTree(from: string, path: string, real: string, st: Stats): void {
  const tree = KERNEL_TREES.find((t) => real === t || real.startsWith(`${t}/`));
  const mounted = !tree && KERNEL_FS_TYPES.includes(statfsSync(st.isDirectory() ? real : dirname(real)).type);
  if (!tree && !mounted) return;
  const what = path === from ? `copy source ${from}` : `${path} in copy source ${from}`;
  const where = tree ? `under ${tree}${real === path ? '' : ` (it is ${real})`}` : 'on a proc or sys file system';
  throw new CladeError('bad_request', `${what} is ${where}: kernel state and devices are not files to copy into an image; copy regular files instead`);
}

function specialKind(st: Stats): string {
  return st.isFIFO() ? 'a FIFO' : st.isSocket() ? 'a socket' : 'a device';
}

/** A file's SHA-256, reading at most its size and what is left of the budget. */
function hashWithinBudget(path: string, size: number, budget: CopyBudget): string {
  if (budget.bytes + size > MAX_COPY_BYTES) throw new CladeError('too_large', `the copies hold more than ${MAX_COPY_BYTES / 2 ** 30} GiB (reached at ${path}): copy less (leave out build outputs and caches), or fetch large data from inside the sandbox`);
  const h = createHash('sha256');
  const read = readRegularFile(path, size, (chunk) => h.update(chunk));
  budget.bytes += read.bytes;
  if (!read.complete) throw new CladeError('conflict', `copy source ${path} grew while it was read, or never ends (a kernel or device file?): copy files that are not being written`);
  return h.digest('hex');
}

/**
 * Reads a regular file in chunks, without following a link or blocking on a
 * FIFO that took its place since it was looked at, and stops once more than
 * `maxBytes` came (`complete` false): a file that grows, or a kernel file that
 * never ends, cannot keep the reader going.
 */
export function readRegularFile(path: string, maxBytes: number, onChunk: (chunk: Buffer) => void): { bytes: number; complete: boolean } {
  const fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW | constants.O_NONBLOCK);
  try {
    if (!fstatSync(fd).isFile()) throw new CladeError('conflict', `${path} is no longer a regular file; build again once it stops changing`);
    const buf = Buffer.allocUnsafe(1 << 20);
    let bytes = 0;
    for (;;) {
      const n = readSync(fd, buf, 0, buf.length, null);
      if (n === 0) return { bytes, complete: true };
      bytes += n;
      if (bytes > maxBytes) return { bytes, complete: false };
      onChunk(buf.subarray(0, n));
    }
  } finally {
    closeSync(fd);
  }
}
