import { timestampFromMs } from '@bufbuild/protobuf/wkt';
import type { MessageInitShape } from '@bufbuild/protobuf';
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from '@connectrpc/connect';
import { runCommand, type CommandResult } from '../core/commands.js';
import { guestPath, type FileEntry } from '../core/files.js';
import type { LiveSandbox } from '../core/sandbox.js';
import { CladeError } from '../util/errors.js';
import { checkUser, connectErrors, pacedStream, targetOf, toConnectError } from './envd-context.js';
import { type EntryInfoSchema, Filesystem, FileType } from './gen/filesystem_pb.js';
import { PacedQueue } from './paced.js';
import { DirWatch, WatcherTable, type WatchEvent } from './watch.js';

/** Entries one ListDir answers at most. */
const MAX_LISTED = 20_000;
type EntryInit = MessageInitShape<typeof EntryInfoSchema>;

/** A guest file entry as envd's EntryInfo. clade's agent reports permission bits, not owners: those are left empty. */
export function entryInfo(e: Pick<FileEntry, 'type' | 'size' | 'mode' | 'mtimeMs'>, path: string): EntryInit {
  const type = e.type === 'file' ? FileType.FILE : e.type === 'dir' ? FileType.DIRECTORY : e.type === 'symlink' ? FileType.SYMLINK : FileType.UNSPECIFIED;
  return {
    name: path === '/' ? '/' : path.slice(path.lastIndexOf('/') + 1),
    type,
    path,
    size: BigInt(e.size),
    mode: e.mode,
    permissions: permissionString(e.type, e.mode),
    owner: '',
    group: '',
    modifiedTime: timestampFromMs(e.mtimeMs),
  };
}

/** `drwxr-xr-x`, as `ls -l` (and envd) write it. */
export function permissionString(type: FileEntry['type'], mode: number): string {
  const kind = type === 'dir' ? 'd' : type === 'symlink' ? 'L' : type === 'file' ? '-' : '?';
  let bits = '';
  for (let shift = 6; shift >= 0; shift -= 3) {
    const b = (mode >> shift) & 7;
    bits += (b & 4 ? 'r' : '-') + (b & 2 ? 'w' : '-') + (b & 1 ? 'x' : '-');
  }
  return kind + bits;
}

/** A request's path in the guest: relative paths are taken from root's home, as clade's own files API does. */
function pathOf(p: string): string {
  try {
    return guestPath(p);
  } catch (err) {
    throw toConnectError(err);
  }
}

async function stat(sandbox: LiveSandbox, path: string): Promise<EntryInit> {
  return entryInfo(await sandbox.agent.stat(path), path);
}

/**
 * rename(2) with envd's behaviour (missing parents of the destination are
 * made; an existing file is replaced), run by the guest's Python: the agent
 * protocol has no rename of its own.
 */
const MOVE_SCRIPT = [
  'import os, sys',
  'src, dst = sys.argv[1], sys.argv[2]',
  'try:',
  '    os.lstat(src)',
  '    os.makedirs(os.path.dirname(dst) or "/", exist_ok=True)',
  '    os.rename(src, dst)',
  'except FileNotFoundError as e:',
  '    print(e, file=sys.stderr); sys.exit(3)',
  'except OSError as e:',
  '    print(e, file=sys.stderr); sys.exit(4)',
].join('\n');

async function move(sandbox: LiveSandbox, source: string, destination: string): Promise<void> {
  const r = (await runCommand(sandbox, ['python3', '-c', MOVE_SCRIPT, source, destination], { timeoutMs: 60_000 })) as CommandResult;
  if (r.exitCode === 0) return;
  const why = r.stderr.trim() || r.stdout.trim() || `exit code ${r.exitCode}`;
  if (r.exitCode === 3) throw new CladeError('not_found', `cannot move ${source}: ${why}`);
  if (r.exitCode === 127) throw new CladeError('agent_error', 'moving files needs python3 in the sandbox image, and this one has none');
  throw new CladeError('agent_error', `cannot move ${source} to ${destination}: ${why}`);
}

async function listDir(sandbox: LiveSandbox, root: string, depth: number): Promise<EntryInit[]> {
  const info = await sandbox.agent.stat(root);
  if (info.type !== 'dir') throw new CladeError('bad_request', `${root} is not a directory`);
  const out: EntryInit[] = [];
  let level: string[] = [root];
  for (let d = 1; d <= depth && level.length > 0; d++) {
    const next: string[] = [];
    for (const dir of level) {
      for (const e of (await sandbox.agent.list(dir)).entries) {
        const path = dir === '/' ? `/${e.name}` : `${dir}/${e.name}`;
        out.push(entryInfo(e, path));
        if (out.length > MAX_LISTED) throw new CladeError('too_large', `${root} holds more than ${MAX_LISTED} entries to depth ${depth}; list a smaller depth or directory`);
        if (e.type === 'dir') next.push(path);
      }
    }
    level = next;
  }
  return out;
}

function watchEvent(e: WatchEvent) {
  return { name: e.name, type: e.type, ...(e.entry ? { entry: entryInfo(e.entry, e.entry.path) } : {}) };
}

/** A watch as a stream: `start` once the first scan is done, then events, keep-alives while quiet. */
async function* watchStream(sandbox: LiveSandbox, path: string, recursive: boolean, includeEntry: boolean, ctx: HandlerContext) {
  const queue = new PacedQueue<WatchEvent[]>({ merge: (a, b) => (a.length < 1000 ? [...a, ...b] : undefined) });
  const watch = new DirWatch(sandbox, path, recursive, includeEntry, (events) => queue.push(events), (err) => queue.fail(err instanceof Error ? err : new Error(String(err))));
  try {
    await connectErrors(() => watch.start());
    yield { event: { case: 'start' as const, value: {} } };
    for await (const next of pacedStream(queue, ctx)) {
      if (next.idle) yield { event: { case: 'keepalive' as const, value: {} } };
      else for (const e of next.value) yield { event: { case: 'filesystem' as const, value: watchEvent(e) } };
    }
  } finally {
    watch.stop();
    queue.close();
  }
}

function watchersOf(e2b: { watchers?: unknown }): WatcherTable {
  if (!(e2b.watchers instanceof WatcherTable)) e2b.watchers = new WatcherTable();
  return e2b.watchers as WatcherTable;
}

/** envd's filesystem service on clade's agent file operations. */
export const filesystemService: Partial<ServiceImpl<typeof Filesystem>> = {
  async stat(req, ctx) {
    const { live } = targetOf(ctx);
    checkUser(ctx);
    const path = pathOf(req.path);
    return { entry: await connectErrors(() => stat(live, path)) };
  },

  async makeDir(req, ctx) {
    const { live } = targetOf(ctx);
    checkUser(ctx);
    const path = pathOf(req.path);
    const created = await connectErrors(() => live.agent.mkdir(path));
    if (!created) throw new ConnectError(`${path} already exists`, Code.AlreadyExists);
    return { entry: await connectErrors(() => stat(live, path)) };
  },

  async move(req, ctx) {
    const { live } = targetOf(ctx);
    checkUser(ctx);
    const source = pathOf(req.source);
    const destination = pathOf(req.destination);
    await connectErrors(() => move(live, source, destination));
    return { entry: await connectErrors(() => stat(live, destination)) };
  },

  async listDir(req, ctx) {
    const { live } = targetOf(ctx);
    checkUser(ctx);
    const path = pathOf(req.path);
    const depth = req.depth === 0 ? 1 : req.depth;
    if (depth > 64) throw new ConnectError('depth must be at most 64', Code.InvalidArgument);
    return { entries: await connectErrors(() => listDir(live, path, depth)) };
  },

  async remove(req, ctx) {
    const { live } = targetOf(ctx);
    checkUser(ctx);
    const path = pathOf(req.path);
    await connectErrors(() => live.agent.remove(path, true));
    return {};
  },

  async *watchDir(req, ctx) {
    const { live } = targetOf(ctx);
    checkUser(ctx);
    yield* watchStream(live, pathOf(req.path), req.recursive, req.includeEntry, ctx);
  },

  async createWatcher(req, ctx) {
    const { live, e2b } = targetOf(ctx);
    checkUser(ctx);
    const path = pathOf(req.path);
    return { watcherId: await connectErrors(() => watchersOf(e2b).create(live, path, req.recursive, req.includeEntry)) };
  },

  async getWatcherEvents(req, ctx) {
    const { e2b } = targetOf(ctx);
    const events = await connectErrors(async () => watchersOf(e2b).take(req.watcherId));
    return { events: events.map((e) => watchEvent(e)) };
  },

  async removeWatcher(req, ctx) {
    const { e2b } = targetOf(ctx);
    watchersOf(e2b).remove(req.watcherId);
    return {};
  },
};

