import { randomUUID } from 'node:crypto';
import { posix } from 'node:path';
import type { FileEntry } from '../core/files.js';
import type { LiveSandbox } from '../core/sandbox.js';
import { CladeError } from '../util/errors.js';
import { EventType } from './gen/filesystem_pb.js';

/** The guest agent has no change notifications: watches poll the directory this often. */
export const POLL_MS = 500;
/** Entries a recursive watch follows at most; a bigger tree is refused rather than watched in part. */
const MAX_WATCHED_ENTRIES = 20_000;
/** Events a polled watcher (CreateWatcher) keeps until they are fetched; older ones are dropped first. */
const MAX_BUFFERED_EVENTS = 10_000;
/** Polled watchers per sandbox. */
const MAX_WATCHERS = 32;

export type WatchEvent = { name: string; type: EventType; entry?: FileEntry & { path: string } };
type Tree = Map<string, FileEntry>;

/** The entries under `root`, by path relative to it (one level, or the whole tree). */
export async function scanTree(sandbox: LiveSandbox, root: string, recursive: boolean): Promise<Tree> {
  const tree: Tree = new Map();
  const dirs = [''];
  while (dirs.length > 0) {
    const rel = dirs.shift()!;
    let entries: FileEntry[];
    try {
      entries = (await sandbox.agent.list(rel ? posix.join(root, rel) : root)).entries;
    } catch (err) {
      // A subdirectory removed between two listings is a removal, seen at the next poll; the root itself is an error.
      if (rel && err instanceof CladeError && err.code === 'not_found') continue;
      throw err;
    }
    for (const e of entries) {
      const name = rel ? `${rel}/${e.name}` : e.name;
      tree.set(name, e);
      if (tree.size > MAX_WATCHED_ENTRIES) throw new CladeError('too_large', `${root} holds more than ${MAX_WATCHED_ENTRIES} entries; watch a smaller directory (or not recursively)`);
      if (recursive && e.type === 'dir') dirs.push(name);
    }
  }
  return tree;
}

/** What changed between two scans, as E2B's events (writes by size or time, chmod by mode). */
export function diffTrees(before: Tree, after: Tree, root: string, includeEntry: boolean): WatchEvent[] {
  const events: WatchEvent[] = [];
  const withEntry = (name: string, e: FileEntry, type: EventType): WatchEvent => ({ name, type, ...(includeEntry ? { entry: { ...e, path: posix.join(root, name) } } : {}) });
  for (const [name, e] of after) {
    const old = before.get(name);
    if (!old || old.type !== e.type) events.push(withEntry(name, e, EventType.CREATE));
    else if (old.size !== e.size || old.mtimeMs !== e.mtimeMs) events.push(withEntry(name, e, EventType.WRITE));
    else if (old.mode !== e.mode) events.push(withEntry(name, e, EventType.CHMOD));
  }
  for (const name of before.keys()) if (!after.has(name)) events.push({ name, type: EventType.REMOVE });
  return events;
}

/**
 * A watch on one directory: scans it every POLL_MS and reports what changed.
 * A scan takes one agent request per directory, so a watch costs the guest
 * little; a failing scan (the directory removed) ends the watch.
 */
export class DirWatch {
  private tree: Tree = new Map();
  private timer?: NodeJS.Timeout;
  private stopped = false;

  constructor(
    private readonly sandbox: LiveSandbox,
    readonly path: string,
    private readonly recursive: boolean,
    private readonly includeEntry: boolean,
    private readonly onEvents: (events: WatchEvent[]) => void,
    private readonly onError: (err: unknown) => void,
  ) {}

  /** The first scan: the watch exists (and the start event may be sent) once this resolves. */
  async start(): Promise<void> {
    const info = await this.sandbox.agent.stat(this.path);
    if (info.type !== 'dir') throw new CladeError('bad_request', `${this.path} is not a directory`);
    this.tree = await scanTree(this.sandbox, this.path, this.recursive);
    this.schedule();
  }

  stop(): void {
    this.stopped = true;
    clearTimeout(this.timer);
  }

  private schedule(): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => void this.poll(), POLL_MS);
    this.timer.unref();
  }

  private async poll(): Promise<void> {
    try {
      const next = await scanTree(this.sandbox, this.path, this.recursive);
      if (this.stopped) return;
      const events = diffTrees(this.tree, next, this.path, this.includeEntry);
      this.tree = next;
      if (events.length) this.onEvents(events);
      this.schedule();
    } catch (err) {
      if (!this.stopped) this.onError(err);
      this.stop();
    }
  }
}

/** Polled watchers of one sandbox (CreateWatcher / GetWatcherEvents / RemoveWatcher). */
export class WatcherTable {
  private readonly watchers = new Map<string, { watch: DirWatch; events: WatchEvent[]; error?: unknown }>();

  async create(sandbox: LiveSandbox, path: string, recursive: boolean, includeEntry: boolean): Promise<string> {
    if (this.watchers.size >= MAX_WATCHERS) throw new CladeError('unavailable', `this sandbox already has ${MAX_WATCHERS} watchers; remove some first`);
    const id = randomUUID();
    const slot: { watch: DirWatch; events: WatchEvent[]; error?: unknown } = {
      events: [],
      watch: new DirWatch(
        sandbox,
        path,
        recursive,
        includeEntry,
        (events) => {
          slot.events.push(...events);
          if (slot.events.length > MAX_BUFFERED_EVENTS) slot.events.splice(0, slot.events.length - MAX_BUFFERED_EVENTS);
        },
        (err) => (slot.error = err),
      ),
    };
    await slot.watch.start();
    this.watchers.set(id, slot);
    return id;
  }

  /** The events since the last call; a watch that failed reports its error once its events are taken. */
  take(id: string): WatchEvent[] {
    const slot = this.watchers.get(id);
    if (!slot) throw new CladeError('not_found', `no watcher ${JSON.stringify(id)}; it was removed, or the sandbox restarted`);
    const events = slot.events.splice(0);
    if (events.length === 0 && slot.error !== undefined) {
      this.remove(id);
      throw slot.error;
    }
    return events;
  }

  remove(id: string): void {
    this.watchers.get(id)?.watch.stop();
    this.watchers.delete(id);
  }

  dropAll(): void {
    for (const id of [...this.watchers.keys()]) this.remove(id);
  }
}
