import { posix } from 'node:path';
import type { AgentClient, FileEntry } from '../agent-protocol/client.js';
import { CladeError } from '../util/errors.js';

export type { FileEntry } from '../agent-protocol/client.js';

const HOME = '/root';
/** Largest file read whole by default; bigger ones are read as a stream. */
export const MAX_READ_BYTES = 256 * 1024 * 1024;

/** Normalises a guest path the way the agent will, so errors name the real path. */
export function guestPath(path: string): string {
  if (typeof path !== 'string' || path.length === 0) throw new CladeError('bad_request', 'a file path is required');
  if (path.includes('\0')) throw new CladeError('bad_request', 'file paths may not contain NUL bytes');
  const full = posix.normalize(path.startsWith('/') ? path : posix.join(HOME, path));
  if (Buffer.byteLength(full) > 4095) throw new CladeError('bad_request', 'file path is longer than 4095 bytes');
  return full;
}


/** A guest file, whole, refused with `too_large` past `maxBytes` (the agent checks before sending any of it). */
export function readGuestFile(agent: AgentClient, path: string, maxBytes = MAX_READ_BYTES): Promise<Buffer> {
  if (!Number.isSafeInteger(maxBytes) || maxBytes < 0) throw new CladeError('bad_request', `maxBytes must be a non-negative integer, got ${maxBytes}`);
  return agent.readFile(guestPath(path), { maxBytes });
}

/** Chunks queued for a slow reader before the agent channel is paused. */
const STREAM_QUEUE_CHUNKS = 8;

/**
 * A file read as a web stream. While the reader is slower than the guest, the
 * sandbox's agent channel is paused (the guest waits), so memory stays at a
 * few chunks whatever the file's size. Errors before the first chunk (no such
 * file, too large) reject; later ones error the stream.
 */
export async function readGuestStream(agent: AgentClient, path: string, maxBytes?: number): Promise<ReadableStream<Uint8Array>> {
  const abort = new AbortController();
  let release: (() => void) | undefined;
  const unhold = () => {
    release?.();
    release = undefined;
  };
  let controller!: ReadableStreamDefaultController<Uint8Array>;
  const stream = new ReadableStream<Uint8Array>(
    {
      start: (c) => void (controller = c),
      pull: () => unhold(),
      cancel: () => {
        unhold();
        abort.abort();
      },
    },
    { highWaterMark: STREAM_QUEUE_CHUNKS },
  );
  let firstChunk!: () => void;
  const first = new Promise<void>((resolve) => (firstChunk = resolve));
  const done = agent.readFile(guestPath(path), {
    ...(maxBytes !== undefined ? { maxBytes } : {}),
    signal: abort.signal,
    onChunk: (chunk) => {
      controller.enqueue(new Uint8Array(chunk.buffer, chunk.byteOffset, chunk.length));
      if ((controller.desiredSize ?? 1) <= 0 && !release) release = agent.holdReading();
      firstChunk();
    },
  });
  done.then(
    () => {
      unhold();
      controller.close();
    },
    (err: unknown) => {
      unhold();
      if (!abort.signal.aborted) controller.error(err);
    },
  );
  await Promise.race([first, done]);
  return stream;
}

export type EntryInfo = {
  name: string;
  path: string;
  type: 'file' | 'dir' | 'symlink' | 'other';
  size: number;
  mode: number;
  modifiedTime: Date;
};

export type WriteInfo = { name: string; path: string; type: 'file' };


/** The file operations of a sandbox's agent; a daemon client provides the same over HTTP. */
export type FileOps = {
  readFile(path: string, maxBytes: number): Promise<Buffer>;
  /** The file as a stream that pulls from the guest only as fast as it is read; errors before the first byte reject. */
  readStream(path: string, maxBytes?: number): Promise<ReadableStream<Uint8Array>>;
  writeFile(path: string, data: Buffer | AsyncIterable<Uint8Array>, mode?: number): Promise<unknown>;
  list(path: string): Promise<{ entries: FileEntry[] }>;
  stat(path: string): Promise<FileEntry>;
  mkdir(path: string): Promise<boolean>;
  remove(path: string, recursive: boolean): Promise<void>;
};

/** Files inside the sandbox. Relative paths are taken from /root. */
export class Files {
  constructor(private readonly ops: FileOps) {}

  /**
   * Reads a file: whole, as text (default) or bytes, up to `maxBytes` (default
   * 256 MiB; a bigger file is a `too_large` error), or as a stream of any size.
   */
  read(path: string, opts?: { format?: 'text'; maxBytes?: number }): Promise<string>;
  read(path: string, opts: { format: 'bytes'; maxBytes?: number }): Promise<Uint8Array>;
  read(path: string, opts: { format: 'stream'; maxBytes?: number }): Promise<ReadableStream<Uint8Array>>;
  async read(path: string, opts: { format?: 'text' | 'bytes' | 'stream'; maxBytes?: number } = {}): Promise<string | Uint8Array | ReadableStream<Uint8Array>> {
    if (opts.maxBytes !== undefined && (!Number.isSafeInteger(opts.maxBytes) || opts.maxBytes < 0)) throw new CladeError('bad_request', `maxBytes must be a non-negative integer, got ${opts.maxBytes}`);
    if (opts.format === 'stream') return this.ops.readStream(guestPath(path), opts.maxBytes);
    const maxBytes = opts.maxBytes ?? MAX_READ_BYTES;
    const data = await this.ops.readFile(guestPath(path), maxBytes);
    return opts.format === 'bytes' ? new Uint8Array(data.buffer, data.byteOffset, data.length) : data.toString('utf8');
  }

  /**
   * Writes a whole file, creating parent directories; the file appears
   * atomically. A stream is sent as it is read (any size); if it fails, nothing appears.
   */
  async write(path: string, data: string | Uint8Array | ArrayBuffer | ReadableStream<Uint8Array> | AsyncIterable<Uint8Array>, opts: { mode?: number } = {}): Promise<WriteInfo> {
    const full = guestPath(path);
    const body =
      typeof data === 'string' ? Buffer.from(data, 'utf8')
      : data instanceof ArrayBuffer ? Buffer.from(data)
      : data instanceof Uint8Array ? Buffer.from(data.buffer, data.byteOffset, data.byteLength)
      : (data as unknown as AsyncIterable<Uint8Array>); // web streams are async-iterable in Node
    await this.ops.writeFile(full, body, opts.mode);
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

function toInfo(e: FileEntry, path: string): EntryInfo {
  return { name: e.name || posix.basename(path), path, type: e.type, size: e.size, mode: e.mode, modifiedTime: new Date(e.mtimeMs) };
}

/** File operations straight through a sandbox's agent. */
export function agentFileOps(agent: AgentClient): FileOps {
  return {
    readFile: (path, maxBytes) => readGuestFile(agent, path, maxBytes),
    readStream: (path, maxBytes) => readGuestStream(agent, path, maxBytes),
    writeFile: (path, data, mode) => agent.writeFile(path, data, mode),
    list: (path) => agent.list(path),
    stat: (path) => agent.stat(path),
    mkdir: (path) => agent.mkdir(path),
    remove: (path, recursive) => agent.remove(path, recursive),
  };
}
