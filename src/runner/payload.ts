import { copyFileSync, existsSync, linkSync, lstatSync, mkdirSync, readdirSync, readlinkSync, realpathSync, rmSync, statSync, symlinkSync, writeFileSync } from 'node:fs';
import { dirname, join, posix } from 'node:path';
import { CladeError } from '../util/errors.js';
import { writeCpio } from '../images/cpio.js';
import { COMMAND_FILE } from './init-script.js';

/**
 * Something to put inside the runner: a host file or directory (copied
 * recursively) at `guestPath`, or literal `content`. Guest paths are absolute;
 * the runner's root is a RAM file system, so everything carried costs runner RAM.
 */
export type Carry = { guestPath: string; hostPath: string } | { guestPath: string; content: string | Buffer; mode?: number };

/**
 * Builds one runner initramfs: the cached base tree, the carried files and the
 * command, as a single cpio archive. The tree is assembled from hard links
 * where it can (no copy of large payloads such as guest images), then packed.
 */
export function packInitramfs(opts: { baseRoot: string; work: string; carry: Carry[]; command: string; env?: Record<string, string> }): { file: string; bytes: number } {
  const tree = join(opts.work, 'tree');
  placeTree(opts.baseRoot, tree);
  for (const c of opts.carry) place(c, join(tree, guestRelative(c.guestPath)));
  place({ guestPath: COMMAND_FILE, content: commandScript(opts.command, opts.env ?? {}), mode: 0o755 }, join(tree, guestRelative(COMMAND_FILE)));
  const file = join(opts.work, 'initramfs.cpio');
  const { bytes } = writeCpio(tree, file);
  // The archive holds everything now; the tree of links goes so the work dir stays small.
  rmSync(tree, { recursive: true, force: true });
  return { file, bytes };
}

/** Quotes a word for a POSIX shell. */
export function shellQuote(word: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(word) ? word : `'${word.replace(/'/g, `'\\''`)}'`;
}

/** A command line from argv: one argument is taken as a shell command, several as words. */
export function commandFromArgv(argv: string[]): string {
  return argv.length === 1 ? argv[0]! : argv.map(shellQuote).join(' ');
}

function commandScript(command: string, env: Record<string, string>): string {
  const exports = Object.entries(env).map(([k, v]) => {
    if (!/^[A-Za-z_][A-Za-z0-9_]*$/.test(k)) throw new CladeError('bad_request', `invalid environment variable name ${JSON.stringify(k)}`);
    return `export ${k}=${shellQuote(v)}\n`;
  });
  return `# The runner payload's command, written by the host.\n${exports.join('')}${command}\n`;
}

function guestRelative(guestPath: string): string {
  const normal = posix.normalize(guestPath);
  if (!posix.isAbsolute(guestPath) || normal === '/' || guestPath.split('/').includes('..')) {
    throw new CladeError('bad_request', `guest path ${JSON.stringify(guestPath)} must be an absolute path below / without ".." (e.g. /opt/payload/bin)`);
  }
  if (normal === '/init') throw new CladeError('bad_request', '/init is the runner\'s own init; carry files elsewhere');
  return normal.slice(1);
}

function place(c: Carry, dest: string): void {
  mkdirSync(dirname(dest), { recursive: true });
  rmSync(dest, { recursive: true, force: true });
  if ('content' in c) {
    writeFileSync(dest, c.content, { mode: c.mode ?? 0o644 });
    return;
  }
  if (!existsSync(c.hostPath)) throw new CladeError('not_found', `cannot carry ${c.hostPath} into the runner: no such file or directory`);
  // A symlink given on the command line means its target: link the real file, not the link.
  const real = realpathSync(c.hostPath);
  if (statSync(real).isDirectory()) placeTree(real, dest);
  else linkOrCopy(real, dest);
}

/** Recreates a directory tree: directories made, files linked (or copied), symlinks kept as they are. */
function placeTree(src: string, dest: string): void {
  mkdirSync(dest, { recursive: true });
  for (const name of readdirSync(src)) {
    const from = join(src, name);
    const to = join(dest, name);
    const st = lstatSync(from);
    if (st.isSymbolicLink()) symlinkSync(readlinkSync(from), to);
    else if (st.isDirectory()) placeTree(from, to);
    else if (st.isFile()) linkOrCopy(from, to);
  }
}

/** A hard link costs nothing; across file systems, or for files the user does not own, copy instead. */
function linkOrCopy(from: string, to: string): void {
  try {
    linkSync(from, to);
  } catch {
    copyFileSync(from, to);
  }
}
