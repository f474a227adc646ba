import { createHash } from 'node:crypto';
import { existsSync, mkdirSync } from 'node:fs';
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';

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
  tmp: () => join(cladeHome(), 'tmp'),
};

/** Creates a directory (and parents) readable only by its owner. */
export function ensurePrivateDir(path: string): string {
  mkdirSync(path, { recursive: true, mode: 0o700 });
  return path;
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
