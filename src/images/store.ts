import { existsSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { basename, join } from 'node:path';
import { Type, type Static } from '@sinclair/typebox';
import { CladeError } from '../util/errors.js';
import { ensurePrivateDir, homePaths } from '../util/home.js';
import { readCheckedJson } from '../util/json-file.js';
import { ENV_KEY_PATTERN } from './recipe.js';

// image.json is read back like an API request: every field checked against
// this schema, and its digest must be its directory's name. Nothing read from
// it is used as a path, a command line word or an apt argument before that.

const NAME_PATTERN = '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$';
const DIGEST_PATTERN = '^[0-9a-f]{64}$';
const DIGEST_RE = new RegExp(DIGEST_PATTERN);
const NAME_RE = new RegExp(NAME_PATTERN);
const Digest = Type.String({ pattern: DIGEST_PATTERN });
const Bytes = Type.Integer({ minimum: 0, maximum: 2 ** 50 });
/** `name=version` as apt takes it: the runner downloads the image's packages again by these. */
const PinnedPackage = Type.String({ pattern: '^[a-z0-9][a-z0-9+.-]{0,99}=[A-Za-z0-9.+~:-]{1,100}$' });

/** An image's recipe as recorded: extra packages, copies (host path → guest path), env, and the rootfs asked for. */
const ImageSpecSchema = Type.Object(
  {
    packages: Type.Array(Type.String({ maxLength: 256 }), { maxItems: 1000 }),
    copy: Type.Array(Type.Object({ from: Type.String({ maxLength: 4096 }), to: Type.String({ maxLength: 4096 }) }, { additionalProperties: false }), { maxItems: 1000 }),
    // Every command in the image gets these.
    env: Type.Record(Type.String({ pattern: ENV_KEY_PATTERN }), Type.String({ maxLength: 65536 }), { additionalProperties: false }),
    recommends: Type.Optional(Type.Boolean()),
    rootfs: Type.Union([Type.Literal('initramfs'), Type.Literal('disk'), Type.Literal('auto')]),
  },
  { additionalProperties: false },
);
export type ImageSpec = Static<typeof ImageSpecSchema>;

const ImageManifestSchema = Type.Object(
  {
    digest: Digest,
    name: Type.String({ pattern: NAME_PATTERN }),
    createdAt: Type.String({ maxLength: 64 }),
    // The release names the kernel's module directory; package and version are an apt argument.
    kernel: Type.Object(
      { package: Type.String({ pattern: '^[a-z0-9][a-z0-9+.-]{0,99}$' }), version: Type.String({ pattern: '^[A-Za-z0-9.+~:-]{1,100}$' }), release: Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9.+_~-]{0,127}$' }) },
      { additionalProperties: false },
    ),
    packages: Type.Array(PinnedPackage, { maxItems: 100_000 }),
    agentSha256: Digest,
    initramfsBytes: Bytes,
    kernelBytes: Bytes,
    files: Bytes,
    /** The version of clade's way of assembling images (not the user's recipe, which is `spec`). */
    recipe: Type.Integer({ minimum: 1, maximum: 1_000_000 }),
    /** What the image was asked to hold beyond clade's base; absent in images built before recipes existed. */
    spec: Type.Optional(ImageSpecSchema),
    /** Where the root filesystem lives; absent (initramfs) in older images. `fs` goes on the kernel command line, `file` is a name in the image's directory. */
    rootfs: Type.Optional(
      Type.Union([
        Type.Object({ kind: Type.Literal('initramfs') }, { additionalProperties: false }),
        Type.Object({ kind: Type.Literal('disk'), fs: Type.Literal('erofs'), file: Type.String({ pattern: NAME_PATTERN }), bytes: Bytes }, { additionalProperties: false }),
      ]),
    ),
    /** Bytes of regular files in the root filesystem tree. */
    treeBytes: Type.Optional(Bytes),
  },
  { additionalProperties: false },
);
export type ImageManifest = Static<typeof ImageManifestSchema>;

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

/**
 * The manifest of image `digest`; undefined when there is no such image. An
 * image.json that fails the schema (edited, damaged, or not clade's) is an
 * `integrity` error that says how to rebuild or remove the image.
 */
export function readManifest(digest: string): ImageManifest | undefined {
  if (!DIGEST_RE.test(digest)) return undefined;
  const file = join(imageDir(digest), 'image.json');
  if (!existsSync(file)) return undefined;
  const read = readCheckedJson(file, ImageManifestSchema);
  if ('problem' in read) throw damagedImage(digest, read.problem);
  if (read.value.digest !== digest) throw damagedImage(digest, 'names another image\'s digest');
  return read.value;
}

function damagedImage(digest: string, why: string): CladeError {
  return new CladeError('integrity', `image ${digest.slice(0, 12)} is damaged (its image.json: ${why}); build it again with its recipe (\`clade image build\`), or remove it with \`clade image rm ${digest}\``);
}

/** Points a name (e.g. "default") at an image digest. */
export function setRef(name: string, digest: string): void {
  validateName(name);
  ensurePrivateDir(homePaths.imageRefs());
  writeFileSync(join(homePaths.imageRefs(), name), digest + '\n');
}

/** The digest a name points at; a ref file that holds anything but a digest points nowhere. */
function refTarget(name: string): string | undefined {
  const file = join(homePaths.imageRefs(), name);
  const target = existsSync(file) ? readFileSync(file, 'utf8').trim() : undefined;
  return target && DIGEST_RE.test(target) ? target : undefined;
}

export function validateName(name: string): void {
  if (!NAME_RE.test(name)) throw new CladeError('bad_request', `invalid image name ${JSON.stringify(name)}: use letters, digits, ".", "_" and "-"`);
}

/** Finds an image by name, full digest, or a unique digest prefix of at least 8 characters. */
export function resolveImage(ref = 'default'): ResolvedImage {
  const digest = digestOf(ref);
  const manifest = readManifest(digest);
  if (!manifest) throw unknownImage(ref);
  const dir = imageDir(digest);
  const rootfs = manifest.rootfs;
  return { manifest, dir, kernel: join(dir, 'vmlinuz'), initramfs: join(dir, 'initramfs.cpio'), ...(rootfs?.kind === 'disk' ? { disk: join(dir, basename(rootfs.file)) } : {}) };
}

/**
 * The digest of the stored image `ref` names, without reading its manifest
 * (a damaged image can still be removed). It is always a directory name
 * that passed the digest pattern, never text from inside an image.
 */
function digestOf(ref: string): string {
  const named = NAME_RE.test(ref) ? refTarget(ref) : undefined;
  if (named && listDigests().includes(named)) return named;
  if (!/^[0-9a-f]{8,64}$/.test(ref)) throw unknownImage(ref);
  const matches = listDigests().filter((d) => d.startsWith(ref));
  if (matches.length > 1) throw new CladeError('conflict', `image prefix ${ref} is ambiguous; give more of the digest`);
  if (!matches[0]) throw unknownImage(ref);
  return matches[0];
}

function unknownImage(ref: string): CladeError {
  const hint = ref === 'default' ? 'run `clade image build` first' : 'see `clade image ls` for the images you have';
  return new CladeError('not_found', `unknown image ${JSON.stringify(ref)}: ${hint}`);
}

function listDigests(): string[] {
  if (!existsSync(homePaths.images())) return [];
  return readdirSync(homePaths.images()).filter((d) => DIGEST_RE.test(d) && existsSync(join(imageDir(d), 'image.json')));
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

/** The images with their names; a damaged one is left out (using it says what is wrong and how to remove it). */
export function listImages(): ImageListing[] {
  const refs = existsSync(homePaths.imageRefs()) ? readdirSync(homePaths.imageRefs()) : [];
  const namesByDigest = new Map<string, string[]>();
  for (const r of refs) {
    const d = refTarget(r);
    if (d) namesByDigest.set(d, [...(namesByDigest.get(d) ?? []), r]);
  }
  return listDigests().flatMap((digest) => {
    try {
      const m = readManifest(digest);
      return m ? [listing(m, namesByDigest.get(digest) ?? [])] : [];
    } catch {
      return [];
    }
  });
}

function listing(m: ImageManifest, names: string[]): ImageListing {
  const dir = imageDir(m.digest);
  const files = ['vmlinuz', 'vmlinux', 'initramfs.cpio', ...(m.rootfs?.kind === 'disk' ? [m.rootfs.file] : [])];
  const sizeBytes = files.reduce((a, f) => a + (existsSync(join(dir, f)) ? statSync(join(dir, f)).size : 0), 0);
  return {
    digest: m.digest,
    names,
    sizeBytes,
    createdAt: m.createdAt,
    kernel: m.kernel.release,
    rootfs: m.rootfs?.kind ?? 'initramfs',
    spec: m.spec ?? { packages: [], copy: [], env: {}, rootfs: 'initramfs' },
    packageCount: m.packages.length,
  };
}

/**
 * Removes an image and every name pointing at it. Its manifest is not read,
 * so a damaged image can be removed too; what is removed is the directory
 * the digest names under the images directory, and nothing else.
 */
export function removeImage(ref: string): { digest: string; names: string[] } {
  const digest = digestOf(ref);
  const names: string[] = [];
  if (existsSync(homePaths.imageRefs())) {
    for (const r of readdirSync(homePaths.imageRefs())) {
      if (refTarget(r) === digest) {
        rmSync(join(homePaths.imageRefs(), r));
        names.push(r);
      }
    }
  }
  rmSync(imageDir(digest), { recursive: true, force: true });
  return { digest, names };
}
