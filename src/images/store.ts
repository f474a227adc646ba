import { existsSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
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
  recipe: number;
};

export type ResolvedImage = { manifest: ImageManifest; kernel: string; initramfs: string; dir: string };

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
  return { manifest, dir, kernel: join(dir, 'vmlinuz'), initramfs: join(dir, 'initramfs.cpio') };
}

function listDigests(): string[] {
  if (!existsSync(homePaths.images())) return [];
  return readdirSync(homePaths.images()).filter((d) => /^[0-9a-f]{64}$/.test(d) && existsSync(join(imageDir(d), 'image.json')));
}

export type ImageListing = { digest: string; names: string[]; sizeBytes: number; createdAt: string; kernel: string };

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
    const sizeBytes = ['vmlinuz', 'vmlinux', 'initramfs.cpio'].reduce((a, f) => a + (existsSync(join(dir, f)) ? statSync(join(dir, f)).size : 0), 0);
    return { digest, names: namesByDigest.get(digest) ?? [], sizeBytes, createdAt: m.createdAt, kernel: m.kernel.release };
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
