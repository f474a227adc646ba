import { createHash, randomBytes } from 'node:crypto';
import { closeSync, existsSync, ftruncateSync, fstatSync, openSync, readdirSync, readFileSync, readSync, renameSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import type { MachineShape } from '../engines/engine.js';
import { resolveImage } from '../images/store.js';
import { CladeError } from './errors.js';
import { ensurePrivateDir, homePaths, memoryDir } from './home.js';

/** What the host must know to talk to the agent inside a resumed snapshot. */
export type AgentState = {
  /** The agent's token at freeze time; children replace it at once with FORK_FIXUP. */
  token: Buffer;
  /** Request ids below this may still be in use inside the guest. */
  nextId: number;
  /** Exec id of the persistent Python interpreter, if one was running. */
  interpreterExecId?: number;
};

/**
 * A frozen machine: RAM file, device state, and the agent state. Live forks
 * make transient ones in tmpfs, deleted when the last VM mapping them ends;
 * `snapshot({ tag })` makes persistent ones under the clade home.
 */
export class Snapshot {
  private refs = 0;

  constructor(
    readonly id: string,
    readonly memoryFile: string,
    readonly state: Buffer,
    readonly shape: MachineShape,
    readonly agent: AgentState,
    readonly persistentTag?: string,
  ) {}

  retain(): void {
    this.refs++;
  }

  /** Transient snapshots delete their RAM file when the last VM using it is gone. */
  release(): void {
    this.refs--;
    if (this.refs <= 0 && !this.persistentTag) rmSync(this.memoryFile, { force: true });
  }

  get inUse(): number {
    return this.refs;
  }
}

/** A tmpfs path for a transient snapshot's RAM; the owner pid in the name lets reapers find strays. */
export function transientMemoryPath(): string {
  return join(ensurePrivateDir(memoryDir()), `snap-${process.pid}-${randomBytes(6).toString('hex')}.mem`);
}

// ---------------------------------------------------------------------------
// Persistent snapshots: <home>/snapshots/<tag>/{memory.raw,state.bin,snapshot.json}

export type SnapshotMeta = {
  format: 1;
  tag: string;
  parent: string | null;
  createdAt: string;
  sandboxId: string;
  /** Which engine took it, and the only one that starts it (absent in older snapshots: qemu). */
  engine: 'qemu' | 'vmm';
  image: string;
  memoryMiB: number;
  cpus: number;
  files: Record<'memory.raw' | 'state.bin', { sha256: string; bytes: number }>;
  agent: { token: string; nextId: number; interpreterExecId?: number };
};

const TAG_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

export function validateTag(tag: string): void {
  if (typeof tag !== 'string' || !TAG_RE.test(tag)) throw new CladeError('bad_request', `invalid snapshot tag ${JSON.stringify(tag)}: use 1-64 letters, digits, ".", "_" or "-"`);
}

export function snapshotDir(tag: string): string {
  validateTag(tag);
  return join(homePaths.snapshots(), tag);
}

/**
 * Copies a frozen RAM file into the snapshot directory, skipping holes so the
 * copy stays sparse, and hashes it on the way.
 */
function copySparseHashed(src: string, dest: string): { sha256: string; bytes: number } {
  const hash = createHash('sha256');
  const inFd = openSync(src, 'r');
  const outFd = openSync(dest, 'w', 0o600);
  const buf = Buffer.alloc(1 << 20);
  let off = 0;
  try {
    const size = fstatSync(inFd).size;
    while (off < size) {
      const n = readSync(inFd, buf, 0, buf.length, off);
      if (n === 0) break;
      const chunk = buf.subarray(0, n);
      hash.update(chunk);
      if (!isZero(chunk)) writeSync(outFd, chunk, 0, n, off);
      off += n;
    }
    ftruncateSync(outFd, size);
  } finally {
    closeSync(inFd);
    closeSync(outFd);
  }
  return { sha256: hash.digest('hex'), bytes: off };
}

function isZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i += 8) if (b.readBigUInt64LE(i) !== 0n) return false;
  return true;
}

function hashFile(path: string): string {
  const hash = createHash('sha256');
  const fd = openSync(path, 'r');
  const buf = Buffer.alloc(1 << 20);
  try {
    for (;;) {
      const n = readSync(fd, buf, 0, buf.length, null);
      if (n === 0) break;
      hash.update(buf.subarray(0, n));
    }
  } finally {
    closeSync(fd);
  }
  return hash.digest('hex');
}

/** Refuses a tag that is invalid or already taken, before any work is done for it. */
export function assertTagFree(tag: string): void {
  if (existsSync(snapshotDir(tag))) throw new CladeError('conflict', `snapshot ${tag} already exists; pick another tag or delete it with \`clade snapshot rm ${tag}\``);
}

/** Writes a frozen snapshot to the clade home under `tag`. */
export function persistSnapshot(snap: Snapshot, tag: string, sandboxId: string, parent: string | null): SnapshotMeta {
  assertTagFree(tag);
  const dir = snapshotDir(tag);
  // A deleted ancestor ends the recorded lineage; the new snapshot is complete on its own.
  if (parent && !existsSync(join(snapshotDir(parent), 'snapshot.json'))) parent = null;
  ensurePrivateDir(homePaths.snapshots());
  const staging = `${dir}.partial-${process.pid}`;
  rmSync(staging, { recursive: true, force: true });
  ensurePrivateDir(staging);
  try {
    const memory = copySparseHashed(snap.memoryFile, join(staging, 'memory.raw'));
    writeFileSync(join(staging, 'state.bin'), snap.state, { mode: 0o600 });
    const meta: SnapshotMeta = {
      format: 1,
      tag,
      parent,
      createdAt: new Date().toISOString(),
      sandboxId,
      engine: 'qemu',
      image: snap.shape.image.manifest.digest,
      memoryMiB: snap.shape.memoryMiB,
      cpus: snap.shape.cpus,
      files: { 'memory.raw': memory, 'state.bin': { sha256: createHash('sha256').update(snap.state).digest('hex'), bytes: snap.state.length } },
      agent: { token: snap.agent.token.toString('hex'), nextId: snap.agent.nextId, ...(snap.agent.interpreterExecId ? { interpreterExecId: snap.agent.interpreterExecId } : {}) },
    };
    writeFileSync(join(staging, 'snapshot.json'), JSON.stringify(meta, null, 2) + '\n', { mode: 0o600 });
    renameSync(staging, dir);
    return meta;
  } catch (err) {
    rmSync(staging, { recursive: true, force: true });
    throw err;
  }
}

export function readSnapshotMeta(tag: string): SnapshotMeta {
  const file = join(snapshotDir(tag), 'snapshot.json');
  if (!existsSync(file)) throw new CladeError('not_found', `no snapshot ${JSON.stringify(tag)}; see \`clade snapshot ls\``);
  try {
    return JSON.parse(readFileSync(file, 'utf8')) as SnapshotMeta;
  } catch {
    throw new CladeError('integrity', `snapshot ${tag} has an unreadable snapshot.json; delete it with \`clade snapshot rm ${tag}\``);
  }
}

export function listSnapshots(): SnapshotMeta[] {
  if (!existsSync(homePaths.snapshots())) return [];
  return readdirSync(homePaths.snapshots())
    .filter((t) => TAG_RE.test(t) && existsSync(join(homePaths.snapshots(), t, 'snapshot.json')))
    .map((t) => readSnapshotMeta(t))
    .sort((a, b) => a.createdAt.localeCompare(b.createdAt));
}

/** Hash checks already passed in this process, keyed by file identity, so repeated starts stay fast. */
const verified = new Map<string, string>();

function fileIdentity(path: string, st = statSync(path)): string {
  return `${path}:${st.ino}:${st.size}:${st.mtimeMs}:${st.ctimeMs}`;
}

function rememberVerified(path: string, st = statSync(path)): void {
  verified.set(path, fileIdentity(path, st));
}

/**
 * Checks a snapshot before anything resumes from it: every file matches its
 * recorded hash, its parent exists, and its image is present.
 */
export function verifySnapshot(tag: string): SnapshotMeta {
  const meta = readSnapshotMeta(tag);
  const dir = snapshotDir(tag);
  for (const [name, expected] of Object.entries(meta.files)) {
    const path = join(dir, name);
    if (!existsSync(path)) throw new CladeError('integrity', `snapshot ${tag} is missing ${name}; it cannot be resumed`);
    const st = statSync(path);
    if (verified.get(path) === fileIdentity(path, st)) continue;
    if (st.size !== expected.bytes || hashFile(path) !== expected.sha256) {
      throw new CladeError('integrity', `snapshot ${tag}: ${name} does not match its recorded SHA-256; it was modified or corrupted and will not be resumed`);
    }
    rememberVerified(path, st);
  }
  if (meta.parent && !existsSync(join(snapshotDir(meta.parent), 'snapshot.json'))) {
    throw new CladeError('integrity', `snapshot ${tag} depends on snapshot ${meta.parent}, which is missing`);
  }
  try {
    resolveImage(meta.image);
  } catch {
    throw new CladeError('integrity', `snapshot ${tag} was made from image ${meta.image.slice(0, 12)}, which is not present; rebuild or restore that image`);
  }
  return meta;
}

/** The engine a snapshot starts on; the other one cannot read its files. */
export function snapshotEngine(meta: SnapshotMeta): 'qemu' | 'vmm' {
  return meta.engine ?? 'qemu';
}

/** Refuses to start a snapshot on an engine that did not take it. */
export function assertSnapshotEngine(meta: SnapshotMeta, wanted: 'qemu' | 'vmm', what = 'started'): void {
  const taken = snapshotEngine(meta);
  if (taken !== wanted) throw new CladeError('bad_request', `snapshot ${meta.tag} was taken on the ${taken} engine and can only be ${what} there (engine "${taken}"), not on the ${wanted} engine`);
}

/**
 * Moves a snapshot written into its staging directory (`stagingDir(tag)`) to
 * its place, with snapshot.json recording each file's SHA-256.
 */
export function commitSnapshot(staging: string, meta: Omit<SnapshotMeta, 'files' | 'format' | 'createdAt'>): SnapshotMeta {
  const files = {} as SnapshotMeta['files'];
  for (const name of ['memory.raw', 'state.bin'] as const) files[name] = { sha256: hashFile(join(staging, name)), bytes: statSync(join(staging, name)).size };
  const parent = meta.parent && existsSync(join(snapshotDir(meta.parent), 'snapshot.json')) ? meta.parent : null;
  const full: SnapshotMeta = { format: 1, ...meta, parent, createdAt: new Date().toISOString(), files };
  writeFileSync(join(staging, 'snapshot.json'), JSON.stringify(full, null, 2) + '\n', { mode: 0o600 });
  assertTagFree(meta.tag);
  renameSync(staging, snapshotDir(meta.tag));
  // Hashed just now by this process: the first start from it need not hash again.
  for (const name of Object.keys(files)) rememberVerified(join(snapshotDir(meta.tag), name));
  return full;
}

/** A private, empty directory next to where snapshot `tag` will live; the caller removes it on failure. */
export function stagingDir(tag: string): string {
  assertTagFree(tag);
  ensurePrivateDir(homePaths.snapshots());
  const staging = `${snapshotDir(tag)}.partial-${process.pid}`;
  rmSync(staging, { recursive: true, force: true });
  return ensurePrivateDir(staging);
}

/** Loads a verified persistent snapshot for resuming on the qemu engine. */
export function loadSnapshot(tag: string): Snapshot {
  const meta = verifySnapshot(tag);
  assertSnapshotEngine(meta, 'qemu');
  const dir = snapshotDir(tag);
  const shape: MachineShape = { image: resolveImage(meta.image), memoryMiB: meta.memoryMiB, cpus: meta.cpus };
  return new Snapshot(`persist:${tag}`, join(dir, 'memory.raw'), readFileSync(join(dir, 'state.bin')), shape, {
    token: Buffer.from(meta.agent.token, 'hex'),
    nextId: meta.agent.nextId,
    ...(meta.agent.interpreterExecId ? { interpreterExecId: meta.agent.interpreterExecId } : {}),
  }, tag);
}

export function childrenOf(tag: string): string[] {
  return listSnapshots().filter((m) => m.parent === tag).map((m) => m.tag);
}

/** Deletes a snapshot; one that others descend from needs `cascade`, which deletes them too. */
export function removeSnapshot(tag: string, opts: { cascade?: boolean } = {}): string[] {
  readSnapshotMeta(tag);
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
