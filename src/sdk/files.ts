import { posix } from 'node:path';
import type { FileEntry } from '../agent-protocol/client.js';
import { CladeError } from '../core/errors.js';

export type EntryInfo = {
  name: string;
  path: string;
  type: 'file' | 'dir' | 'symlink' | 'other';
  size: number;
  mode: number;
  modifiedTime: Date;
};

export type WriteInfo = { name: string; path: string; type: 'file' };

const HOME = '/root';

/** The file operations of a sandbox's agent; a daemon client provides the same over HTTP. */
export type FileOps = {
  readFile(path: string): Promise<Buffer>;
  writeFile(path: string, data: Buffer, mode?: number): Promise<unknown>;
  list(path: string): Promise<{ entries: FileEntry[] }>;
  stat(path: string): Promise<FileEntry>;
  mkdir(path: string): Promise<boolean>;
  remove(path: string, recursive: boolean): Promise<void>;
};

/** Files inside the sandbox. Relative paths are taken from /root. */
export class Files {
  constructor(private readonly ops: FileOps) {}

  read(path: string, opts?: { format?: 'text' }): Promise<string>;
  read(path: string, opts: { format: 'bytes' }): Promise<Uint8Array>;
  async read(path: string, opts: { format?: 'text' | 'bytes' } = {}): Promise<string | Uint8Array> {
    const data = await this.ops.readFile(guestPath(path));
    return opts.format === 'bytes' ? new Uint8Array(data.buffer, data.byteOffset, data.length) : data.toString('utf8');
  }

  /** Writes a whole file, creating parent directories; the file appears atomically. */
  async write(path: string, data: string | Uint8Array | ArrayBuffer, opts: { mode?: number } = {}): Promise<WriteInfo> {
    const full = guestPath(path);
    const buf = typeof data === 'string' ? Buffer.from(data, 'utf8') : data instanceof ArrayBuffer ? Buffer.from(data) : Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    await this.ops.writeFile(full, buf, opts.mode);
    return { name: posix.basename(full), path: full, type: 'file' };
  }

  async list(path: string): Promise<EntryInfo[]> {
    const dir = guestPath(path);
    const { entries } = await this.ops.list(dir);
    return entries.map((e) => toInfo(e, posix.join(dir, e.name))).sort((a, b) => a.name.localeCompare(b.name));
  }

  async getInfo(path: string): Promise<EntryInfo> {
    const full = guestPath(path);
    return toInfo(await this.ops.stat(full), full);
  }

  async exists(path: string): Promise<boolean> {
    try {
      await this.ops.stat(guestPath(path));
      return true;
    } catch (err) {
      if (err instanceof CladeError && err.code === 'not_found') return false;
      throw err;
    }
  }

  /** Creates a directory and its parents; resolves false if it already existed. */
  makeDir(path: string): Promise<boolean> {
    return this.ops.mkdir(guestPath(path));
  }

  /** Removes a file, or a directory with everything in it. */
  async remove(path: string): Promise<void> {
    await this.ops.remove(guestPath(path), true);
  }
}

/** Normalises a guest path the way the agent will, so errors name the real path. */
export function guestPath(path: string): string {
  if (typeof path !== 'string' || path.length === 0) throw new CladeError('bad_request', 'a file path is required');
  if (path.includes('\0')) throw new CladeError('bad_request', 'file paths may not contain NUL bytes');
  const full = posix.normalize(path.startsWith('/') ? path : posix.join(HOME, path));
  if (Buffer.byteLength(full) > 4095) throw new CladeError('bad_request', 'file path is longer than 4095 bytes');
  return full;
}

function toInfo(e: FileEntry, path: string): EntryInfo {
  return { name: e.name || posix.basename(path), path, type: e.type, size: e.size, mode: e.mode, modifiedTime: new Date(e.mtimeMs) };
}
