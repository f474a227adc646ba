import { createHash, createHmac, randomBytes, timingSafeEqual } from 'node:crypto';
import { closeSync as closeSyncRaw, constants, existsSync, linkSync, lstatSync, openSync as openSyncRaw, readdirSync, readFileSync, renameSync, rmSync, writeSync } from 'node:fs';
import { open, type FileHandle } from 'node:fs/promises';
import { join } from 'node:path';
import { Type, type Static } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import type { MachineShape, SnapshotSource } from '../engines/engine.js';
import { resolveImage } from '../images/store.js';
import { CladeError, errorMessage } from '../util/errors.js';
import { cladeHome, ensurePrivateDir, homePaths } from '../util/home.js';
import { readFileNoFollow } from '../util/json-file.js';
import { processAlive } from '../util/process.js';
import { NetworkSpecSchema } from './records.js';

// ---------------------------------------------------------------------------
// Persistent snapshots: <home>/snapshots/<tag>/{memory.raw,state.bin,snapshot.json}

export const TAG_PATTERN = '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$';
const TAG_RE = new RegExp(TAG_PATTERN);
const HEX64 = '^[0-9a-f]{64}$';
const FILE_NAMES = ['memory.raw', 'state.bin'] as const;

const FileSchema = Type.Object({ sha256: Type.String({ pattern: HEX64 }), bytes: Type.Integer({ minimum: 0, maximum: 2 ** 46 }) }, { additionalProperties: false });

/**
 * snapshot.json, format 2. It is read back like an API request: every field
 * checked, and the HMAC (keyed by a secret of this clade home) must match, so
 * a file written by anyone else, or edited, is refused before anything in it is used.
 */
export const SnapshotMetaSchema = Type.Object(
  {
    format: Type.Literal(2),
    tag: Type.String({ pattern: TAG_PATTERN }),
    parent: Type.Union([Type.String({ pattern: TAG_PATTERN }), Type.Null()]),
    createdAt: Type.String({ maxLength: 64 }),
    sandboxId: Type.String({ pattern: '^sb-[0-9a-f]{12}$' }),
    /** Which engine took it, and the only one that starts it. */
    engine: Type.Union([Type.Literal('qemu'), Type.Literal('vmm')]),
    image: Type.String({ pattern: HEX64 }),
    memoryMiB: Type.Integer({ minimum: 1, maximum: 1 << 20 }),
    cpus: Type.Integer({ minimum: 1, maximum: 1024 }),
    /** The sandbox's network policy: a machine with a NIC resumes only with one, and its starts get their own stacks. */
    network: Type.Optional(NetworkSpecSchema),
    files: Type.Object({ 'memory.raw': FileSchema, 'state.bin': FileSchema }, { additionalProperties: false }),
    agent: Type.Object(
      {
        token: Type.String({ pattern: HEX64 }),
        nextId: Type.Integer({ minimum: 1, maximum: 0xffff_ffff }),
        interpreterExecId: Type.Optional(Type.Integer({ minimum: 1, maximum: 0xffff_ffff })),
      },
      { additionalProperties: false },
    ),
    /** HMAC-SHA256 of the other fields (canonical JSON), keyed by <home>/snapshot.key. */
    hmac: Type.String({ pattern: HEX64 }),
  },
  { additionalProperties: false },
);
export type SnapshotMeta = Static<typeof SnapshotMetaSchema>;
type UnsignedMeta = Omit<SnapshotMeta, 'hmac'>;

export function validateTag(tag: string): void {
  if (typeof tag !== 'string' || !TAG_RE.test(tag)) throw new CladeError('bad_request', `invalid snapshot tag ${JSON.stringify(tag)}: use 1-64 letters, digits, ".", "_" or "-"`);
}

export function snapshotDir(tag: string): string {
  validateTag(tag);
  return join(homePaths.snapshots(), tag);
}

// ---- the clade home's snapshot key ----------------------------------------

const KEY_BYTES = 32;

function keyPath(): string {
  return join(cladeHome(), 'snapshot.key');
}

/**
 * The secret that signs this clade home's snapshots: 32 random bytes in a
 * 0600 file beside snapshots/ (never inside it, so copying a snapshot does not
 * copy the key). Made on first use; a key file that is not a private regular
 * file of this user is refused.
 */
export function snapshotKey(): Buffer {
  const path = keyPath();
  ensurePrivateDir(cladeHome());
  if (!existsSync(path)) {
    // Written whole under a temporary name, then linked into place: a second process never reads half a key.
    const tmp = `${path}.${process.pid}.${randomBytes(4).toString('hex')}.tmp`;
    try {
      const fd = openSyncExclusive(tmp);
      try {
        writeSync(fd, randomBytes(KEY_BYTES));
      } finally {
        closeSyncRaw(fd);
      }
      linkSync(tmp, path);
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== 'EEXIST') throw new CladeError('internal', `cannot create the snapshot key ${path}: ${errorMessage(err)}`);
    } finally {
      rmSync(tmp, { force: true });
    }
  }
  const st = lstatSync(path);
  if (!st.isFile() || st.uid !== process.getuid?.() || (st.mode & 0o077) !== 0 || st.size !== KEY_BYTES) {
    throw new CladeError('integrity', `the snapshot key ${path} is not a ${KEY_BYTES}-byte file readable only by you; remove it (snapshots signed with it will no longer start) and try again`);
  }
  return readFileSync(path);
}

function openSyncExclusive(path: string): number {
  // O_NOFOLLOW: a symlink planted at the key's name is refused, not followed.
  return openSyncRaw(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
}

/** JSON with object keys sorted at every level: the same meta always gives the same bytes. */
function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(',')}]`;
  if (value && typeof value === 'object') {
    const entries = Object.entries(value as Record<string, unknown>).filter(([, v]) => v !== undefined).sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
    return `{${entries.map(([k, v]) => `${JSON.stringify(k)}:${canonicalJson(v)}`).join(',')}}`;
  }
  return JSON.stringify(value);
}

function macOf(meta: UnsignedMeta): Buffer {
  return createHmac('sha256', snapshotKey()).update(canonicalJson(meta)).digest();
}

export function signMeta(meta: UnsignedMeta): SnapshotMeta {
  return { ...meta, hmac: macOf(meta).toString('hex') };
}

// ---- reading and checking --------------------------------------------------

/** Reads and authenticates snapshot.json; every failure is `integrity` (or `not_found`). */
export function readSnapshotMeta(tag: string): SnapshotMeta {
  const file = join(snapshotDir(tag), 'snapshot.json');
  if (!existsSync(file)) throw new CladeError('not_found', `no snapshot ${JSON.stringify(tag)}; see \`clade snapshot ls\``);
  const damaged = (why: string) => new CladeError('integrity', `snapshot ${tag} ${why}; it will not be resumed (delete it with \`clade snapshot rm ${tag}\`)`);
  let raw: unknown;
  try {
    const text = readFileNoFollow(file, 1 << 20);
    raw = JSON.parse(text);
  } catch {
    throw damaged('has an unreadable snapshot.json');
  }
  if ((raw as { format?: unknown })?.format === 1) throw damaged('was written by an older clade, without a signature');
  if (!Value.Check(SnapshotMetaSchema, raw)) {
    const first = [...Value.Errors(SnapshotMetaSchema, raw)][0];
    throw damaged(`has an invalid snapshot.json (${first ? `${first.path || '/'}: ${first.message}` : 'wrong shape'})`);
  }
  const meta = raw;
  const { hmac, ...unsigned } = meta;
  const expected = macOf(unsigned);
  if (!timingSafeEqual(expected, Buffer.from(hmac, 'hex'))) throw damaged('is not signed by this clade home (snapshot.json was edited, or made with another key)');
  if (meta.tag !== tag) throw damaged(`says it is snapshot ${meta.tag}`);
  return meta;
}

/** Valid snapshots, oldest first; damaged ones are left out (`clade snapshot inspect` says what is wrong). */
export function listSnapshots(): SnapshotMeta[] {
  if (!existsSync(homePaths.snapshots())) return [];
  const out: SnapshotMeta[] = [];
  for (const t of readdirSync(homePaths.snapshots())) {
    if (!TAG_RE.test(t) || !existsSync(join(homePaths.snapshots(), t, 'snapshot.json'))) continue;
    try {
      out.push(readSnapshotMeta(t));
    } catch {
      // Damaged: not listed.
    }
  }
  return out.sort((a, b) => a.createdAt.localeCompare(b.createdAt));
}

/** Hash checks already passed in this process, by file identity, so repeated starts stay fast. */
const verified = new Map<string, string>();

function identity(st: { dev: number; ino: number; size: number; mtimeMs: number; ctimeMs: number }): string {
  return `${st.dev}:${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
}

/** A snapshot whose files passed their checks, held open: what was checked is what gets used. */
export type OpenedSnapshot = {
  meta: SnapshotMeta;
  dir: string;
  /** memory.raw and state.bin, opened read-only without following symlinks. */
  files: Record<(typeof FILE_NAMES)[number], FileHandle>;
  /** state.bin's bytes, read from its checked descriptor. */
  state: Buffer;
  /** What an engine starts VMs from: these descriptors, never the paths. */
  source(shape: MachineShape): SnapshotSource;
  close(): Promise<void>;
};

/**
 * Opens a snapshot for resuming: the signed metadata, then each file opened
 * once and checked through that descriptor (size and SHA-256), its parent and
 * its image present. The caller hands the descriptors on and closes them.
 */
export async function openSnapshot(tag: string): Promise<OpenedSnapshot> {
  const meta = readSnapshotMeta(tag);
  const dir = snapshotDir(tag);
  const opened: FileHandle[] = [];
  const closeAll = async () => void (await Promise.all(opened.map((h) => h.close().catch(() => undefined))));
  try {
    const files = {} as OpenedSnapshot['files'];
    let state = Buffer.alloc(0);
    for (const name of FILE_NAMES) {
      const expected = meta.files[name];
      const handle = await open(join(dir, name), constants.O_RDONLY | constants.O_NOFOLLOW).catch((err: NodeJS.ErrnoException) => {
        throw new CladeError('integrity', `snapshot ${tag} is missing ${name} (${err.code ?? err.message}); it cannot be resumed`);
      });
      opened.push(handle);
      files[name] = handle;
      const st = await handle.stat();
      if (!st.isFile() || st.size !== expected.bytes) throw new CladeError('integrity', `snapshot ${tag}: ${name} has ${st.size} bytes, not the ${expected.bytes} recorded; it was modified or corrupted and will not be resumed`);
      const key = join(dir, name);
      if (name === 'state.bin') state = Buffer.from(await readWhole(handle, st.size));
      if (verified.get(key) === identity(st)) continue;
      const digest = name === 'state.bin' ? createHash('sha256').update(state).digest('hex') : await hashHandle(handle);
      if (digest !== expected.sha256) throw new CladeError('integrity', `snapshot ${tag}: ${name} does not match its recorded SHA-256; it was modified or corrupted and will not be resumed`);
      verified.set(key, identity(st));
    }
    if (meta.parent && !existsSync(join(snapshotDir(meta.parent), 'snapshot.json'))) {
      throw new CladeError('integrity', `snapshot ${tag} depends on snapshot ${meta.parent}, which is missing`);
    }
    try {
      resolveImage(meta.image);
    } catch {
      throw new CladeError('integrity', `snapshot ${tag} was made from image ${meta.image.slice(0, 12)}, which is not present; rebuild or restore that image`);
    }
    const source = (shape: MachineShape): SnapshotSource => ({
      dir,
      tag,
      shape,
      memory: { path: join(dir, 'memory.raw'), fd: files['memory.raw'].fd },
      state: { fd: files['state.bin'].fd, bytes: state },
    });
    return { meta, dir, files, state, source, close: closeAll };
  } catch (err) {
    await closeAll();
    throw err;
  }
}

/** Checks a snapshot as a start would (signature, every file's hash, parent, image) and returns its metadata. */
export async function verifySnapshot(tag: string): Promise<SnapshotMeta> {
  const opened = await openSnapshot(tag);
  await opened.close();
  return opened.meta;
}

/** The engine a snapshot starts on; the other one cannot read its files. */
export function snapshotEngine(meta: SnapshotMeta): 'qemu' | 'vmm' {
  return meta.engine;
}

/** Refuses to start a snapshot on an engine that did not take it. */
export function assertSnapshotEngine(meta: SnapshotMeta, wanted: 'qemu' | 'vmm', what = 'started'): void {
  const taken = snapshotEngine(meta);
  if (taken !== wanted) throw new CladeError('bad_request', `snapshot ${meta.tag} was taken on the ${taken} engine and can only be ${what} there (engine "${taken}"), not on the ${wanted} engine`);
}

// ---- writing ---------------------------------------------------------------

/** Refuses a tag that is invalid or already taken, before any work is done for it. */
export function assertTagFree(tag: string): void {
  if (existsSync(snapshotDir(tag))) throw new CladeError('conflict', `snapshot ${tag} already exists; pick another tag or delete it with \`clade snapshot rm ${tag}\``);
}

/**
 * Half-written snapshots live in snapshots/.staging/ (a name no tag can have),
 * named <tag>.<pid>.<random>; those of processes that are gone are removed.
 */
function stagingRoot(): string {
  ensurePrivateDir(homePaths.snapshots());
  return ensurePrivateDir(join(homePaths.snapshots(), '.staging'));
}

export function reapStaging(): number {
  const root = join(homePaths.snapshots(), '.staging');
  if (!existsSync(root)) return 0;
  let removed = 0;
  for (const name of readdirSync(root)) {
    const pid = Number(/\.(\d+)\.[0-9a-f]+$/.exec(name)?.[1]);
    if (Number.isInteger(pid) && pid > 0 && processAlive(pid)) continue;
    rmSync(join(root, name), { recursive: true, force: true });
    removed++;
  }
  return removed;
}

/** A private, empty directory where snapshot `tag` is written before it is committed; the caller removes it on failure. */
export function stagingDir(tag: string): string {
  assertTagFree(tag);
  reapStaging();
  return ensurePrivateDir(join(stagingRoot(), `${tag}.${process.pid}.${randomBytes(4).toString('hex')}`));
}

/**
 * Moves a snapshot written into its staging directory to its place, with
 * snapshot.json recording each file's SHA-256 (hashed without blocking the
 * event loop) and signed with the clade home's key.
 */
export async function commitSnapshot(staging: string, meta: Omit<UnsignedMeta, 'files' | 'format' | 'createdAt' | 'parent'> & { parent: string | null }, known: Partial<SnapshotMeta['files']> = {}): Promise<SnapshotMeta> {
  const files = {} as SnapshotMeta['files'];
  for (const name of FILE_NAMES) files[name] = known[name] ?? (await hashFile(join(staging, name)));
  // A deleted ancestor ends the recorded lineage; the new snapshot is complete on its own.
  const parent = meta.parent && existsSync(join(snapshotDir(meta.parent), 'snapshot.json')) ? meta.parent : null;
  const full = signMeta({ format: 2, ...meta, parent, createdAt: new Date().toISOString(), files });
  const handle = await open(join(staging, 'snapshot.json'), constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
  try {
    await handle.writeFile(JSON.stringify(full, null, 2) + '\n');
  } finally {
    await handle.close();
  }
  assertTagFree(meta.tag);
  renameSync(staging, snapshotDir(meta.tag));
  // Hashed just now by this process: the first start from it need not hash again.
  for (const name of FILE_NAMES) {
    const st = lstatSync(join(snapshotDir(meta.tag), name));
    verified.set(join(snapshotDir(meta.tag), name), identity(st));
  }
  return full;
}

export function childrenOf(tag: string): string[] {
  return listSnapshots().filter((m) => m.parent === tag).map((m) => m.tag);
}

/** Deletes a snapshot (damaged ones too); one that others descend from needs `cascade`, which deletes them too. */
export function removeSnapshot(tag: string, opts: { cascade?: boolean } = {}): string[] {
  if (!existsSync(snapshotDir(tag))) throw new CladeError('not_found', `no snapshot ${JSON.stringify(tag)}; see \`clade snapshot ls\``);
  const kids = childrenOf(tag);
  if (kids.length > 0 && !opts.cascade) {
    throw new CladeError('conflict', `snapshot ${tag} has descendants (${kids.join(', ')}); delete with cascade (\`clade snapshot rm ${tag} --cascade\`) to remove them too`);
  }
  const removed: string[] = [];
  for (const k of kids) removed.push(...removeSnapshot(k, { cascade: true }));
  rmSync(snapshotDir(tag), { recursive: true, force: true });
  removed.push(tag);
  return removed;
}

// ---- file helpers ----------------------------------------------------------

const CHUNK = 1 << 20;

async function hashHandle(handle: FileHandle): Promise<string> {
  const hash = createHash('sha256');
  const buf = Buffer.alloc(CHUNK);
  for (let off = 0; ; ) {
    const { bytesRead } = await handle.read(buf, 0, CHUNK, off);
    if (bytesRead === 0) break;
    hash.update(buf.subarray(0, bytesRead));
    off += bytesRead;
  }
  return hash.digest('hex');
}

async function hashFile(path: string): Promise<{ sha256: string; bytes: number }> {
  const handle = await open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  try {
    return { sha256: await hashHandle(handle), bytes: (await handle.stat()).size };
  } finally {
    await handle.close();
  }
}

async function readWhole(handle: FileHandle, size: number): Promise<Buffer> {
  const buf = Buffer.alloc(size);
  for (let off = 0; off < size; ) {
    const { bytesRead } = await handle.read({ buffer: buf, offset: off, length: size - off, position: off });
    if (bytesRead === 0) throw new CladeError('integrity', 'a snapshot file ended early');
    off += bytesRead;
  }
  return buf;
}
