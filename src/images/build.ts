import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { chmodSync, copyFileSync, cpSync, existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, renameSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CladeError, errorMessage } from '../util/errors.js';
import { ensurePrivateDir, homePaths } from '../util/home.js';
import { agentBinaryPath, guestFilesDir, packageRoot } from '../util/paths.js';
import { noProgress, type ProgressFn } from '../util/progress.js';
import { AptUniverse, type DebPackage } from './apt.js';
import { writeCpio } from './cpio.js';
import { installNetworkModules, NET_MODULES } from './net-modules.js';
import { type Alternative, alternativesOf, applyAlternatives, buildCaBundle, buildLdCache } from './maintainer.js';
import { AUTO_DISK_BYTES, type CopyEntry, type ImageRecipe, normalizeRecipe, type NormalizedRecipe, type RootfsKind, walkCopySource } from './recipe.js';
import { copyIntoRoot, DISK_BOOT_MODULES, DISK_FILE, installModules, treeBytes, writeErofs } from './rootfs.js';
import { imageDir, type ImageManifest, readManifest, setRef, validateName } from './store.js';

const run = promisify(execFile);

/** Bump when the way an image is assembled changes, so old cache entries stop matching. */
const RECIPE_VERSION = 3;
const KERNEL_PATTERN = '^linux-image-6\\.12\\..*-cloud-amd64$';
/** clade's base: what the agent, the interpreter and the default image need. A recipe's packages come on top. */
const ROOTFS_PACKAGES = ['busybox-static', 'bash', 'coreutils', 'python3', 'python3-numpy'];
/** Files in the rootfs no sandbox needs; dropping them keeps the initramfs (and boot) small. */
const PRUNE = ['usr/share/doc', 'usr/share/man', 'usr/share/info', 'usr/share/locale', 'usr/share/lintian', 'usr/share/bash-completion', 'var/cache/debconf'];

export type BuildOptions = ImageRecipe & { progress?: ProgressFn; force?: boolean };
export type BuildResult = { manifest: ImageManifest; cached: boolean; seconds: number };

/**
 * Builds a guest image: the newest Debian 6.12 cloud kernel and a root
 * filesystem of busybox, bash, python3 and numpy plus the recipe's packages,
 * with their dependency closure, the recipe's host files, and the clade agent
 * as /init. The root filesystem is an initramfs, or for big trees a read-only
 * erofs disk with a small boot initramfs (docs/architecture.md, "Images").
 * The image is named by a digest of everything that goes into it, so building
 * twice with the same inputs is a cache hit.
 */
export async function buildImage(opts: BuildOptions = {}): Promise<BuildResult> {
  const started = Date.now();
  const progress = opts.progress ?? noProgress;
  validateName(opts.name ?? 'default');
  const recipe = normalizeRecipe(opts); // bad names, paths and missing copy sources fail before any work
  const name = recipe.name;
  const copyBudget = { bytes: 0, entries: 0 }; // the copy limits hold for the recipe, not for each copy
  const copies = recipe.copy.map((c) => ({ ...c, ...walkCopySource(c.from, copyBudget) }));
  for (const c of copies) if (c.skipped.length) progress({ phase: 'resolve', message: `${c.from}: skipping ${c.skipped.length} entries that are not files, directories or links (${c.skipped.slice(0, 3).join(', ')})` });
  const apt = new AptUniverse();

  progress({ phase: 'resolve', message: 'updating Debian package lists' });
  await apt.update();
  const kernelPkg = await apt.newest(KERNEL_PATTERN);
  if (recipe.packages.length) progress({ phase: 'resolve', message: `resolving ${recipe.packages.join(', ')} with their dependencies` });
  const recommended = recipe.recommends ? (await apt.recommendsOf(recipe.packages)).filter((p) => !recipe.packages.some((e) => e.split('=')[0] === p)) : [];
  if (recommended.length) progress({ phase: 'resolve', message: `with their recommendations: ${recommended.join(', ')}` });
  const packages = await apt.closure([...ROOTFS_PACKAGES, ...recipe.packages], recommended);
  const [kernel] = await apt.closure([kernelPkg]).then((all) => all.filter((p) => p.name === kernelPkg));
  if (!kernel) throw new CladeError('not_found', `apt could not resolve ${kernelPkg}`);
  await ensureAgentBuilt(progress);
  const agent = readFileSync(agentBinaryPath());
  const guestFiles = guestFileSet();
  const digest = imageDigest(kernel, packages, agent, guestFiles, recipe, copies);
  progress({ phase: 'resolve', message: `${packages.length} packages + ${kernel.name}, image ${digest.slice(0, 12)}` });

  const existing = opts.force ? undefined : builtBefore(digest, progress);
  if (existing) {
    setRef(name, digest);
    return { manifest: existing, cached: true, seconds: (Date.now() - started) / 1000 };
  }

  progress({ phase: 'download', message: `downloading ${packages.length + 1} packages (cached ones are reused)` });
  await apt.download(packages.map((p) => `${p.name}=${p.version}`), true);
  await apt.download([`${kernel.name}=${kernel.version}`], false);

  const work = join(ensurePrivateDir(homePaths.tmp()), `build-${digest.slice(0, 12)}-${process.pid}`);
  rmSync(work, { recursive: true, force: true });
  const root = join(work, 'root');
  mkdirSync(root, { recursive: true });
  const staging = `${imageDir(digest)}.partial-${process.pid}`;
  try {
    let n = 0;
    for (const p of packages) {
      await run('dpkg-deb', ['-x', join(apt.archives, p.file), root]);
      progress({ phase: 'unpack', message: p.name, done: ++n, total: packages.length });
    }
    const kernelDir = join(work, 'kernel');
    await run('dpkg-deb', ['-x', join(apt.archives, kernel.file), kernelDir]);
    const vmlinuz = readdirSync(join(kernelDir, 'boot')).find((f) => f.startsWith('vmlinuz-'));
    if (!vmlinuz) throw new CladeError('not_found', `${kernel.file} holds no vmlinuz`);
    const release = vmlinuz.slice('vmlinuz-'.length);
    progress({ phase: 'assemble', message: 'merging /usr, running what maintainer scripts would (alternatives, ld.so cache, CA certificates), installing the agent' });
    const alternatives = await alternativesOf(packages.map((p) => join(apt.archives, p.file)));
    const linked = await assembleRootfs(root, agent, guestFiles, alternatives);
    if (linked.length) progress({ phase: 'assemble', message: `alternatives: ${linked.join(', ')}` });
    const certs = buildCaBundle(root);
    if (certs) progress({ phase: 'assemble', message: `CA bundle of ${certs} certificates` });
    await buildLdCache(root, progress);
    await installNetworkModules(kernelDir, root);
    await precompilePython(root, progress);
    // The user's files go in last, over the finished tree: the steps above
    // write into the tree with ordinary path operations, which would follow a
    // copied symlink out of it onto the host. From here on the tree is only read.
    for (const c of copies) {
      progress({ phase: 'copy', message: `${c.from} -> ${c.to} (${c.entries.length} entries)` });
      copyIntoRoot(root, c.from, c.to, c.entries);
    }
    const bytes = treeBytes(root);
    const kind: RootfsKind = recipe.rootfs === 'auto' ? (bytes > AUTO_DISK_BYTES ? 'disk' : 'initramfs') : recipe.rootfs;

    rmSync(staging, { recursive: true, force: true });
    ensurePrivateDir(staging); // the image holds host files and env; its parents, the clade home included, are made private too
    copyFileSync(join(kernelDir, 'boot', vmlinuz), join(staging, 'vmlinuz'));
    let rootfs: ImageManifest['rootfs'] = { kind: 'initramfs' };
    let bootRoot = root;
    if (kind === 'disk') {
      progress({ phase: 'pack', message: `writing the ${(bytes / 2 ** 20).toFixed(0)} MiB tree as a read-only erofs disk` });
      const diskBytes = await writeErofs(root, join(staging, DISK_FILE), digest);
      rootfs = { kind: 'disk', fs: 'erofs', file: DISK_FILE, bytes: diskBytes };
      bootRoot = join(work, 'boot');
      makeBootTree(bootRoot, agent);
      await installModules(kernelDir, release, DISK_BOOT_MODULES, bootRoot);
    }
    progress({ phase: 'pack', message: kind === 'disk' ? 'writing the boot initramfs (agent and modules)' : 'writing initramfs' });
    const cpio = writeCpio(bootRoot, join(staging, 'initramfs.cpio'), (files) => progress({ phase: 'pack', message: `${files} files` }));
    const manifest: ImageManifest = {
      digest,
      name,
      createdAt: new Date().toISOString(),
      kernel: { package: kernel.name, version: kernel.version, release },
      packages: packages.map((p) => `${p.name}=${p.version}`),
      agentSha256: sha256(agent),
      initramfsBytes: cpio.bytes,
      kernelBytes: lstatSync(join(staging, 'vmlinuz')).size,
      files: cpio.files,
      recipe: RECIPE_VERSION,
      spec: { packages: recipe.packages, copy: recipe.copy, env: recipe.env, recommends: recipe.recommends, rootfs: recipe.rootfs },
      rootfs,
      treeBytes: bytes,
    };
    writeFileSync(join(staging, 'image.json'), JSON.stringify(manifest, null, 2) + '\n', { mode: 0o600 }); // the env values
    rmSync(imageDir(digest), { recursive: true, force: true });
    renameSync(staging, imageDir(digest));
    setRef(name, digest);
    return { manifest, cached: false, seconds: (Date.now() - started) / 1000 };
  } finally {
    rmSync(work, { recursive: true, force: true });
    rmSync(staging, { recursive: true, force: true }); // gone already when the build succeeded
  }
}

/** The manifest of an identical image built before; a damaged one is built again over it. */
function builtBefore(digest: string, progress: ProgressFn): ImageManifest | undefined {
  try {
    return readManifest(digest);
  } catch (err) {
    progress({ phase: 'resolve', message: `${errorMessage(err).split(';')[0]}: building it again` });
    return undefined;
  }
}

/** A disk image's boot initramfs: the agent as /init, the mount points it needs, and (added next) the modules. */
function makeBootTree(dir: string, agent: Buffer): void {
  for (const d of ['dev', 'proc', 'sys', 'tmp', 'root']) mkdirSync(join(dir, d), { recursive: true });
  writeFileSync(join(dir, 'init'), agent, { mode: 0o755 });
}

async function ensureAgentBuilt(progress: ProgressFn): Promise<void> {
  progress({ phase: 'agent', message: 'building the guest agent' });
  try {
    await run('make', ['-s', '-C', join(packageRoot(), 'native', 'agent')]);
  } catch (err) {
    if (!existsSync(agentBinaryPath())) throw new CladeError('unavailable', `could not build the guest agent (needs gcc, make and static glibc): ${(err as Error).message}`);
  }
}

/** Extra files placed in the guest, from src/images/guest. */
function guestFileSet(): Map<string, Buffer> {
  const dir = guestFilesDir();
  const files = new Map<string, Buffer>();
  if (!existsSync(dir)) return files;
  const walk = (rel: string) => {
    for (const name of readdirSync(join(dir, rel)).sort()) {
      const r = rel ? `${rel}/${name}` : name;
      if (lstatSync(join(dir, r)).isDirectory()) walk(r);
      else files.set(r, readFileSync(join(dir, r)));
    }
  };
  walk('');
  return files;
}

function imageDigest(kernel: DebPackage, packages: DebPackage[], agent: Buffer, guestFiles: Map<string, Buffer>, recipe: NormalizedRecipe, copies: { to: string; entries: CopyEntry[] }[]): string {
  const h = createHash('sha256');
  h.update(`recipe ${RECIPE_VERSION}\nkernel ${kernel.file}\n`);
  for (const p of packages) h.update(`deb ${p.file}\n`);
  h.update(`agent ${sha256(agent)}\n`);
  for (const [path, data] of guestFiles) h.update(`file ${path} ${sha256(data)}\n`);
  for (const m of NET_MODULES) h.update(`module ${m}\n`);
  h.update(`rootfs ${recipe.rootfs}\n`); // the recommendations taken are among the packages above
  for (const [k, v] of Object.entries(recipe.env)) h.update(`env ${JSON.stringify([k, v])}\n`);
  for (const c of copies) {
    h.update(`copy ${JSON.stringify(c.to)}\n`);
    for (const e of c.entries) h.update(`entry ${JSON.stringify([e.rel, e.kind, e.mode, e.sha256, e.target ?? ''])}\n`);
  }
  return h.digest('hex');
}

/** Returns the alternatives it linked. */
async function assembleRootfs(root: string, agent: Buffer, guestFiles: Map<string, Buffer>, alternatives: Alternative[]): Promise<string[]> {
  // Debian bookworm packages still ship /bin, /lib...; a merged /usr is what the
  // distribution installs, and what its binaries' paths assume.
  for (const d of ['bin', 'sbin', 'lib', 'lib64']) {
    const top = join(root, d);
    if (existsSync(top) && !lstatSync(top).isSymbolicLink()) {
      cpSync(top, join(root, 'usr', d), { recursive: true, verbatimSymlinks: true });
      rmSync(top, { recursive: true });
    }
    if (!existsSync(join(root, 'usr', d))) mkdirSync(join(root, 'usr', d), { recursive: true });
    symlinkSync(`usr/${d}`, top);
  }
  for (const p of PRUNE) rmSync(join(root, p), { recursive: true, force: true });
  // Before busybox's applets, so a package's real tool (mawk as awk, gcc as cc) wins over an applet.
  const linked = applyAlternatives(root, alternatives);
  if (!existsSync(join(root, 'usr/bin/sh'))) symlinkSync('bash', join(root, 'usr/bin/sh'));
  await linkBusyboxApplets(root);
  for (const d of ['proc', 'sys', 'dev', 'tmp', 'run', 'root', 'etc', 'var/tmp', 'usr/lib/clade']) mkdirSync(join(root, d), { recursive: true });
  chmodSync(join(root, 'tmp'), 0o1777);
  chmodSync(join(root, 'root'), 0o700);
  writeFileSync(join(root, 'etc/passwd'), 'root:x:0:0:root:/root:/bin/bash\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n');
  writeFileSync(join(root, 'etc/group'), 'root:x:0:\nnogroup:x:65534:\n');
  writeFileSync(join(root, 'etc/hosts'), '127.0.0.1 localhost\n::1 localhost\n');
  writeFileSync(join(root, 'etc/hostname'), 'clade\n');
  rmSync(join(root, 'init'), { force: true });
  writeFileSync(join(root, 'init'), agent, { mode: 0o755 });
  for (const [path, data] of guestFiles) {
    const dest = join(root, 'usr/lib/clade', path);
    mkdirSync(join(dest, '..'), { recursive: true });
    writeFileSync(dest, data, { mode: 0o644 });
  }
  return linked;
}

/** Gives the guest the busybox tools Debian's closure lacks (ps, ip, vi...), without shadowing real ones. */
async function linkBusyboxApplets(root: string): Promise<void> {
  const { stdout } = await run(join(root, 'usr/bin/busybox'), ['--list']);
  for (const applet of stdout.split('\n').filter((a) => a && a !== 'init' && a !== 'linuxrc')) {
    const candidates = ['usr/bin', 'usr/sbin', 'usr/local/bin'].map((d) => join(root, d, applet));
    if (candidates.some((c) => existsSync(c))) continue;
    symlinkSync('busybox', join(root, 'usr/bin', applet));
  }
}

/**
 * Debian ships no .pyc files, so every cold `import numpy` in a guest would
 * compile thousands of modules under emulation. Compile them now when the host
 * Python has the guest's bytecode format; unchecked-hash pycs stay valid
 * whatever timestamps the files get.
 */
async function precompilePython(root: string, progress: ProgressFn): Promise<void> {
  const guestPy = readdirSync(join(root, 'usr/lib')).find((d) => /^python3\.\d+$/.test(d));
  if (!guestPy) return;
  try {
    const { stdout } = await run('python3', ['-c', 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")']);
    if (stdout.trim() !== guestPy) {
      progress({ phase: 'assemble', message: `host python is ${stdout.trim()}, guest is ${guestPy}: skipping bytecode precompilation` });
      return;
    }
    progress({ phase: 'assemble', message: 'precompiling Python bytecode' });
    const dirs = [join(root, 'usr/lib', guestPy), join(root, 'usr/lib/python3/dist-packages')].filter((d) => existsSync(d));
    await run('python3', ['-m', 'compileall', '-q', '-j', '0', '--invalidation-mode', 'unchecked-hash', '-s', root, '-p', '/', ...dirs], { maxBuffer: 64 << 20 }).catch(() => undefined);
  } catch {
    // No usable host python: the guest compiles on first import instead.
  }
}

function sha256(data: Buffer): string {
  return createHash('sha256').update(data).digest('hex');
}

