import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { copyFileSync, existsSync, mkdirSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CladeError, errorMessage } from '../util/errors.js';
import { cladeHome, ensurePrivateDir, homePaths } from '../util/home.js';
import { noProgress, type ProgressFn } from '../util/progress.js';
import { AptUniverse } from '../images/apt.js';
import { resolveImage, type ResolvedImage } from '../images/store.js';
import { INIT_SCRIPT, KVM_MODULES, MODULE_DIR } from './init-script.js';

const run = promisify(execFile);

/** Bump when the runner's base tree is assembled differently, so old cache entries stop matching. */
const RUNNER_RECIPE = 1;

/** The runner's kernel and the tree every runner initramfs starts from (busybox, KVM modules, /init). */
export type RunnerBase = { kernel: string; root: string; kernelRelease: string };

export function runnerCacheDir(): string {
  return join(cladeHome(), 'cache', 'runner');
}

/**
 * Prepares (once, then from cache) the runner's base: the kernel of a guest
 * image, so the runner and its guests run the same Debian kernel, plus the
 * KVM modules from that kernel's package and busybox from the same Debian
 * release. Needs the image built (`clade image build`).
 */
export async function ensureRunnerBase(imageRef = 'default', progress: ProgressFn = noProgress): Promise<RunnerBase> {
  const image = resolveImage(imageRef);
  const debs = debFiles(image);
  const key = createHash('sha256').update(JSON.stringify({ RUNNER_RECIPE, debs, INIT_SCRIPT, KVM_MODULES })).digest('hex').slice(0, 16);
  const dir = join(runnerCacheDir(), `base-${key}`);
  const base = { kernel: join(dir, 'vmlinuz'), root: join(dir, 'root'), kernelRelease: image.manifest.kernel.release };
  if (existsSync(join(dir, 'ready'))) return base;

  progress({ phase: 'runner', message: `preparing the runner base (kernel ${image.manifest.kernel.release})` });
  const apt = new AptUniverse();
  await fetchDebs(apt, debs);
  ensurePrivateDir(runnerCacheDir());
  const staging = `${dir}.partial-${process.pid}`;
  const unpacked = join(ensurePrivateDir(homePaths.tmp()), `runner-unpack-${key}-${process.pid}`);
  rmSync(staging, { recursive: true, force: true });
  try {
    await unpackBase(apt, debs, unpacked, join(staging, 'root'), image.manifest.kernel.release);
    copyFileSync(image.kernel, join(staging, 'vmlinuz'));
    writeFileSync(join(staging, 'ready'), new Date().toISOString() + '\n');
    // Another process may have finished the same base meanwhile (and may be using it): keep theirs.
    if (existsSync(join(dir, 'ready'))) rmSync(staging, { recursive: true, force: true });
    else {
      rmSync(dir, { recursive: true, force: true });
      renameSync(staging, dir);
    }
  } catch (err) {
    rmSync(staging, { recursive: true, force: true });
    throw err;
  } finally {
    rmSync(unpacked, { recursive: true, force: true });
  }
  return base;
}

type DebRef = { spec: string; file: string };

/** The kernel package the image was built from, and the busybox of the same Debian release. */
function debFiles(image: ResolvedImage): { kernel: DebRef; busybox: DebRef } {
  const busybox = image.manifest.packages.find((p) => p.startsWith('busybox-static='));
  if (!busybox) throw new CladeError('not_found', `image ${image.manifest.digest.slice(0, 12)} lists no busybox-static package; rebuild it with \`clade image build --force\``);
  const k = image.manifest.kernel;
  return { kernel: debRef(`${k.package}=${k.version}`), busybox: debRef(busybox) };
}

function debRef(spec: string): DebRef {
  const [name = '', version = ''] = spec.split('=');
  // The same archive file name apt gives the download (the epoch colon is encoded).
  return { spec, file: `${name}_${version.replace(/:/g, '%3a')}_amd64.deb` };
}

async function fetchDebs(apt: AptUniverse, debs: { kernel: DebRef; busybox: DebRef }): Promise<void> {
  const missing = Object.values(debs).filter((d) => !existsSync(join(apt.archives, d.file)));
  if (missing.length === 0) return;
  await apt.update();
  await apt.download(missing.map((d) => d.spec), false);
  for (const d of missing) {
    if (!existsSync(join(apt.archives, d.file))) throw new CladeError('not_found', `apt did not download ${d.spec}; Debian may have dropped that version: rebuild the image with \`clade image build\``);
  }
}

async function unpackBase(apt: AptUniverse, debs: { kernel: DebRef; busybox: DebRef }, unpacked: string, root: string, release: string): Promise<void> {
  mkdirSync(unpacked, { recursive: true });
  await run('dpkg-deb', ['-x', join(apt.archives, debs.busybox.file), join(unpacked, 'busybox')]);
  await run('dpkg-deb', ['-x', join(apt.archives, debs.kernel.file), join(unpacked, 'kernel')]);
  for (const d of ['bin', 'proc', 'sys', 'dev', 'tmp', 'run', 'root', 'runner', MODULE_DIR.slice(1)]) mkdirSync(join(root, d), { recursive: true });
  copyFileSync(join(unpacked, 'busybox', 'bin', 'busybox'), join(root, 'bin', 'busybox'));
  const moduleRoot = join(unpacked, 'kernel', 'lib', 'modules', release, 'kernel');
  for (const m of KVM_MODULES) await decompressModule(moduleRoot, m.path, join(root, MODULE_DIR.slice(1), `${m.name}.ko`));
  writeFileSync(join(root, 'init'), INIT_SCRIPT, { mode: 0o755 });
}

/**
 * Debian ships modules xz-compressed; busybox's insmod loads plain ELF only,
 * so they are decompressed here, once.
 */
async function decompressModule(moduleRoot: string, path: string, dest: string): Promise<void> {
  const candidates = [`${path}.ko`, `${path}.ko.xz`].map((p) => join(moduleRoot, p));
  const found = candidates.find((c) => existsSync(c));
  if (!found) throw new CladeError('not_found', `the kernel package has no ${path}.ko (looked in ${moduleRoot}: ${existsSync(moduleRoot) ? readdirSync(moduleRoot).join(', ') : 'missing'})`);
  if (found.endsWith('.ko')) {
    copyFileSync(found, dest);
    return;
  }
  try {
    const { stdout } = await run('xz', ['-dc', found], { encoding: 'buffer', maxBuffer: 256 << 20 });
    writeFileSync(dest, stdout);
  } catch (err) {
    const hint = (err as NodeJS.ErrnoException).code === 'ENOENT' ? 'xz is not installed: run `sudo apt-get install xz-utils` (or scripts/setup.sh as root)' : errorMessage(err);
    throw new CladeError('unavailable', `cannot decompress ${found}: ${hint}`);
  }
}
