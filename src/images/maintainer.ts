import { execFile } from 'node:child_process';
import { existsSync, lstatSync, mkdirSync, readdirSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { dirname, join, posix } from 'node:path';
import { promisify } from 'node:util';
import { errorMessage } from '../util/errors.js';
import type { ProgressFn } from '../util/progress.js';

// Unpacking a .deb does not run its maintainer scripts. What those scripts do
// that a sandbox needs is redone here, from the unpacked tree: alternatives
// links, the dynamic linker's cache, and the CA certificate bundle.

const run = promisify(execFile);

/** One `update-alternatives --install` of a postinst: a master link and its slaves. */
export type Alternative = { name: string; link: string; path: string; priority: number; slaves: { link: string; name: string; path: string }[] };

/** Variables maintainer scripts use in alternative paths, as they are on this architecture. */
const KNOWN_VARIABLES: Record<string, string> = { DEB_HOST_MULTIARCH: 'x86_64-linux-gnu', triplet: 'x86_64-linux-gnu', multiarch: 'x86_64-linux-gnu', MA: 'x86_64-linux-gnu' };

/**
 * The alternatives a postinst script installs, read from its text: shell
 * lines continued with backslashes are joined, known variables filled in,
 * and entries that still hold a variable (loops, computed names) skipped.
 */
export function parseAlternatives(script: string): Alternative[] {
  const joined = script.replace(/\\\n/g, ' ');
  const found: Alternative[] = [];
  for (const line of joined.split('\n')) {
    const at = line.indexOf('update-alternatives');
    if (at < 0 || !line.includes('--install')) continue;
    const words = line
      .slice(at)
      .split(/[;&|]/)[0]!
      .trim()
      .split(/\s+/)
      .map((w) => w.replace(/^["']|["']$/g, ''))
      .map((w) => w.replace(/\$\{?(\w+)\}?/g, (whole, v: string) => KNOWN_VARIABLES[v] ?? whole));
    const i = words.indexOf('--install');
    if (i < 0) continue;
    const [link, name, path, prio] = words.slice(i + 1, i + 5);
    if (!link || !name || !path || !prio || !/^-?\d+$/.test(prio)) continue;
    if ([link, name, path].some((w) => w.includes('$'))) continue;
    const alt: Alternative = { name, link, path, priority: Number(prio), slaves: [] };
    for (let j = i + 5; j < words.length; j++) {
      if (words[j] !== '--slave') continue;
      const [sl, sn, sp] = words.slice(j + 1, j + 4);
      if (sl && sn && sp && ![sl, sn, sp].some((w) => w.includes('$') || w.startsWith('--'))) alt.slaves.push({ link: sl, name: sn, path: sp });
      j += 3;
    }
    found.push(alt);
  }
  return found;
}

/** The postinst alternatives of every package file, in package order. */
export async function alternativesOf(debs: string[]): Promise<Alternative[]> {
  const all: Alternative[] = [];
  for (const deb of debs) {
    let script = '';
    try {
      script = (await run('dpkg-deb', ['--info', deb, 'postinst'], { maxBuffer: 16 << 20 })).stdout;
    } catch {
      continue; // no postinst
    }
    all.push(...parseAlternatives(script));
  }
  return all;
}

/**
 * Makes the links update-alternatives would: for each name, the candidate
 * with the highest priority whose target exists in the tree wins; `link` →
 * /etc/alternatives/<name> → target, as on an installed Debian system.
 * Links the packages already ship are left alone. Returns the names linked.
 */
export function applyAlternatives(root: string, alts: Alternative[]): string[] {
  const exists = (p: string) => existsSync(join(root, p));
  const best = new Map<string, Alternative>();
  for (const a of alts) {
    if (!exists(a.path)) continue;
    const cur = best.get(a.name);
    if (!cur || a.priority > cur.priority) best.set(a.name, a);
  }
  const linked: string[] = [];
  const makeLink = (link: string, name: string, target: string) => {
    if (!exists(target) || isPresent(join(root, link))) return false;
    const alternative = join(root, 'etc/alternatives', name);
    mkdirSync(dirname(alternative), { recursive: true });
    rmSync(alternative, { force: true });
    symlinkSync(target, alternative);
    mkdirSync(dirname(join(root, link)), { recursive: true });
    symlinkSync(posix.join('/etc/alternatives', name), join(root, link));
    return true;
  };
  for (const a of [...best.values()].sort((x, y) => x.name.localeCompare(y.name))) {
    if (makeLink(a.link, a.name, a.path)) linked.push(a.name);
    for (const s of a.slaves) makeLink(s.link, s.name, s.path);
  }
  return linked;
}

function isPresent(path: string): boolean {
  try {
    lstatSync(path);
    return true;
  } catch {
    return false;
  }
}

/**
 * The dynamic linker's cache, which libc-bin's trigger builds on a real
 * system: without it, libraries in directories that /etc/ld.so.conf.d names
 * (beyond the default multiarch ones) are not found. `ldconfig -r` works in
 * a chroot, so it needs root; elsewhere the image goes without a cache.
 */
export async function buildLdCache(root: string, progress: ProgressFn): Promise<boolean> {
  const conf = join(root, 'etc/ld.so.conf');
  if (!existsSync(conf)) writeFileSync(conf, 'include /etc/ld.so.conf.d/*.conf\n');
  if (process.getuid?.() !== 0) {
    progress({ phase: 'assemble', message: 'not root: skipping the ld.so cache (libraries outside the multiarch directories may not be found)' });
    return false;
  }
  for (const ldconfig of ['/sbin/ldconfig', '/usr/sbin/ldconfig', join(root, 'usr/sbin/ldconfig')]) {
    if (!existsSync(ldconfig)) continue;
    try {
      await run(ldconfig, ['-r', root]);
      return true;
    } catch (err) {
      progress({ phase: 'assemble', message: `ldconfig failed (${errorMessage(err).split('\n')[0]}); the image has no ld.so cache` });
      return false;
    }
  }
  progress({ phase: 'assemble', message: 'no ldconfig found: the image has no ld.so cache' });
  return false;
}

/**
 * The CA bundle that ca-certificates' postinst (update-ca-certificates)
 * writes: every certificate under /usr/share/ca-certificates, concatenated
 * in a fixed order into /etc/ssl/certs/ca-certificates.crt, with OpenSSL's
 * default file pointing at it. Returns how many certificates it holds.
 */
export function buildCaBundle(root: string): number {
  const store = join(root, 'usr/share/ca-certificates');
  if (!existsSync(store)) return 0;
  const certs: string[] = [];
  const walk = (rel: string) => {
    for (const name of readdirSync(join(store, rel)).sort()) {
      const r = rel ? `${rel}/${name}` : name;
      const st = lstatSync(join(store, r));
      if (st.isDirectory()) walk(r);
      else if (name.endsWith('.crt')) certs.push(r);
    }
  };
  walk('');
  const certsDir = join(root, 'etc/ssl/certs');
  mkdirSync(certsDir, { recursive: true });
  const bundle = certs.map((c) => readFileSync(join(store, c), 'utf8').trimEnd() + '\n').join('');
  writeFileSync(join(certsDir, 'ca-certificates.crt'), bundle, { mode: 0o644 });
  // Debian's ca-certificates.conf lists the certificates the postinst enabled: all of them.
  writeFileSync(join(root, 'etc/ca-certificates.conf'), certs.join('\n') + '\n', { mode: 0o644 });
  const ssl = join(root, 'usr/lib/ssl');
  mkdirSync(ssl, { recursive: true });
  if (!isPresent(join(ssl, 'cert.pem'))) symlinkSync('/etc/ssl/certs/ca-certificates.crt', join(ssl, 'cert.pem'));
  if (!isPresent(join(ssl, 'certs'))) symlinkSync('/etc/ssl/certs', join(ssl, 'certs'));
  return certs.length;
}
