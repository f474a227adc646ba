import { existsSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { CladeError } from '../util/errors.js';
import { ensurePrivateDir, homePaths } from '../util/home.js';

export type ImageManifest = {
  digest: string;
  name: string;
  createdAt: string;
  kernel: { package: string; version: string; release: string };
  packages: string[];
  agentSha256: string;
  initramfsBytes: number;
  kernelBytes: number;
  files: number;
  /** The version of clade's way of assembling images (not the user's recipe, which is `spec`). */
  recipe: number;
  /** What the image was asked to hold beyond clade's base; absent in images built before recipes existed. */
  spec?: ImageSpec;
  /** Where the root filesystem lives; absent (initramfs) in older images. */
  rootfs?: { kind: 'initramfs' } | { kind: 'disk'; fs: 'erofs'; file: string; bytes: number };
  /** Bytes of regular files in the root filesystem tree. */
  treeBytes?: number;
};

/** An image's recipe as recorded: extra packages, copies (host path → guest path), env, and the rootfs asked for. */
export type ImageSpec = { packages: string[]; copy: { from: string; to: string }[]; env: Record<string, string>; recommends?: boolean; rootfs: 'initramfs' | 'disk' | 'auto' };

/** `disk`: the read-only root filesystem image to attach as the first virtio-blk disk, for disk images. */
export type ResolvedImage = { manifest: ImageManifest; kernel: string; initramfs: string; dir: string; disk?: string };

/**
 * Kernel command line words an image needs: a disk image tells the agent to
 * mount its root from the first virtio disk (docs/architecture.md, "Guest").
 */
export function imageKernelArgs(image: ResolvedImage): string[] {
  return image.disk ? ['clade.root=/dev/vda', `clade.rootfstype=${image.manifest.rootfs?.kind === 'disk' ? image.manifest.rootfs.fs : 'erofs'}`] : [];
}

/**
 * The least guest memory that boots an initramfs image: the kernel holds the
 * archive and the tree unpacked from it at once, plus itself (a 403 MiB
 * initramfs failed to unpack in 1024 MiB and booted in 1536; clade's base of
 * 120 MiB boots in 512). Disk images need no more than the kernel and agent.
 */
export function minimumMemoryMiB(image: ResolvedImage): number {
  if (image.disk) return 0;
  return Math.ceil((2 * image.manifest.initramfsBytes) / 2 ** 20) + 256;
}

/** Environment variables the image gives every command (its recipe's env). */
export function imageEnv(image: ResolvedImage): Record<string, string> {
  return { ...(image.manifest.spec?.env ?? {}) };
}

export function imageDir(digest: string): string {
  return join(homePaths.images(), digest);
}

export function readManifest(digest: string): ImageManifest | undefined {
  if (!/^[0-9a-f]{64}$/.test(digest)) return undefined;
  const file = join(imageDir(digest), 'image.json');
  if (!existsSync(file)) return undefined;
  return JSON.parse(readFileSync(file, 'utf8')) as ImageManifest;
}

/** Points a name (e.g. "default") at an image digest. */
export function setRef(name: string, digest: string): void {
  validateName(name);
  ensurePrivateDir(homePaths.imageRefs());
  writeFileSync(join(homePaths.imageRefs(), name), digest + '\n');
}

function refTarget(name: string): string | undefined {
  const file = join(homePaths.imageRefs(), name);
  return existsSync(file) ? readFileSync(file, 'utf8').trim() : undefined;
}

export function validateName(name: string): void {
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(name)) throw new CladeError('bad_request', `invalid image name ${JSON.stringify(name)}: use letters, digits, ".", "_" and "-"`);
}

/** Finds an image by name, full digest, or a unique digest prefix of at least 8 characters. */
export function resolveImage(ref = 'default'): ResolvedImage {
  let digest: string | undefined;
  if (/^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/.test(ref)) digest = refTarget(ref);
  if (!digest && /^[0-9a-f]{8,64}$/.test(ref)) {
    const matches = listDigests().filter((d) => d.startsWith(ref));
    if (matches.length > 1) throw new CladeError('conflict', `image prefix ${ref} is ambiguous; give more of the digest`);
    digest = matches[0];
  }
  const manifest = digest ? readManifest(digest) : undefined;
  if (!digest || !manifest) {
    const hint = ref === 'default' ? 'run `clade image build` first' : 'see `clade image ls` for the images you have';
    throw new CladeError('not_found', `unknown image ${JSON.stringify(ref)}: ${hint}`);
  }
  const dir = imageDir(digest);
  const rootfs = manifest.rootfs;
  return { manifest, dir, kernel: join(dir, 'vmlinuz'), initramfs: join(dir, 'initramfs.cpio'), ...(rootfs?.kind === 'disk' ? { disk: join(dir, basename(rootfs.file)) } : {}) };
}

function listDigests(): string[] {
  if (!existsSync(homePaths.images())) return [];
  return readdirSync(homePaths.images()).filter((d) => /^[0-9a-f]{64}$/.test(d) && existsSync(join(imageDir(d), 'image.json')));
}

export type ImageListing = {
  digest: string;
  names: string[];
  sizeBytes: number;
  createdAt: string;
  kernel: string;
  rootfs: 'initramfs' | 'disk';
  /** Packages beyond clade's base, copies, env and the rootfs asked for (empty for images older than recipes). */
  spec: ImageSpec;
  packageCount: number;
};

export function listImages(): ImageListing[] {
  const refs = existsSync(homePaths.imageRefs()) ? readdirSync(homePaths.imageRefs()) : [];
  const namesByDigest = new Map<string, string[]>();
  for (const r of refs) {
    const d = refTarget(r);
    if (d) namesByDigest.set(d, [...(namesByDigest.get(d) ?? []), r]);
  }
  return listDigests().map((digest) => {
    const m = readManifest(digest)!;
    const dir = imageDir(digest);
    const files = ['vmlinuz', 'vmlinux', 'initramfs.cpio', ...(m.rootfs?.kind === 'disk' ? [basename(m.rootfs.file)] : [])];
    const sizeBytes = files.reduce((a, f) => a + (existsSync(join(dir, f)) ? statSync(join(dir, f)).size : 0), 0);
    return {
      digest,
      names: namesByDigest.get(digest) ?? [],
      sizeBytes,
      createdAt: m.createdAt,
      kernel: m.kernel.release,
      rootfs: m.rootfs?.kind ?? 'initramfs',
      spec: m.spec ?? { packages: [], copy: [], env: {}, rootfs: 'initramfs' },
      packageCount: m.packages.length,
    };
  });
}

/** Removes an image and every name pointing at it. */
export function removeImage(ref: string): { digest: string; names: string[] } {
  const { manifest } = resolveImage(ref);
  const names: string[] = [];
  if (existsSync(homePaths.imageRefs())) {
    for (const r of readdirSync(homePaths.imageRefs())) {
      if (refTarget(r) === manifest.digest) {
        rmSync(join(homePaths.imageRefs(), r));
        names.push(r);
      }
    }
  }
  rmSync(imageDir(manifest.digest), { recursive: true, force: true });
  return { digest: manifest.digest, names };
}
