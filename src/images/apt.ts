import { execFile } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CladeError } from '../util/errors.js';
import { ensurePrivateDir, homePaths } from '../util/home.js';

const run = promisify(execFile);

/** The Debian suites the guest image is built from. The 6.12 kernel lives in the security and backports suites. */
const SOURCES = [
  'deb http://deb.debian.org/debian bookworm main',
  'deb http://deb.debian.org/debian bookworm-updates main',
  'deb http://deb.debian.org/debian bookworm-backports main',
  'deb http://deb.debian.org/debian-security bookworm-security main',
];

export type DebPackage = { name: string; version: string; file: string };

/**
 * A private apt universe under the clade home: its own sources, package lists
 * and download cache, and an empty dpkg status, so resolving the guest's
 * packages neither reads nor changes the host's apt state.
 */
export class AptUniverse {
  readonly dir = homePaths.aptCache();
  readonly archives = join(this.dir, 'archives');

  private options(): string[] {
    const o: Record<string, string> = {
      'Dir::Etc::SourceList': join(this.dir, 'sources.list'),
      'Dir::Etc::SourceParts': join(this.dir, 'sources.list.d'),
      'Dir::Etc::Preferences': join(this.dir, 'preferences'),
      'Dir::Etc::PreferencesParts': join(this.dir, 'preferences.d'),
      'Dir::State::Lists': join(this.dir, 'lists'),
      'Dir::State::status': join(this.dir, 'status'),
      'Dir::Cache': this.dir,
      'Dir::Cache::archives': this.archives,
      'APT::Sandbox::User': 'root',
      'Debug::NoLocking': '1',
      'APT::Install-Recommends': 'false',
    };
    return Object.entries(o).flatMap(([k, v]) => ['-o', `${k}=${v}`]);
  }

  /** Creates the universe's directories (private, like the clade home they may create), its sources and its empty dpkg status. */
  prepare(): void {
    for (const d of ['lists/partial', 'archives/partial', 'sources.list.d', 'preferences.d']) ensurePrivateDir(join(this.dir, d));
    writeFileSync(join(this.dir, 'sources.list'), SOURCES.join('\n') + '\n');
    writeFileSync(join(this.dir, 'status'), '');
  }

  private async apt(tool: 'apt-get' | 'apt-cache', args: string[], cwd?: string): Promise<string> {
    try {
      const { stdout } = await run(tool, [...this.options(), ...args], { cwd, maxBuffer: 64 << 20 });
      return stdout;
    } catch (err) {
      const e = err as { code?: string; stderr?: string; message: string };
      if (e.code === 'ENOENT') throw new CladeError('unavailable', `${tool} is not installed; clade builds its guest image from Debian packages and needs apt (a Debian or Ubuntu host)`);
      const missing = missingPackages(e.stderr ?? '');
      if (missing.length > 0) {
        throw Object.assign(new CladeError('not_found', `no Debian package ${missing.map((m) => JSON.stringify(m)).join(', ')} in bookworm (with backports and security updates); check the name${missing.length > 1 ? 's' : ''} with \`apt-cache search\``), { missing });
      }
      throw new CladeError('unavailable', `${tool} ${args[0] ?? ''} failed: ${(e.stderr ?? e.message).trim().split('\n').slice(-3).join(' ')}`);
    }
  }

  async update(): Promise<void> {
    this.prepare();
    await this.apt('apt-get', ['update', '-qq']);
  }

  /** The newest package whose name matches `pattern` (a regular expression apt understands). */
  async newest(pattern: string): Promise<string> {
    const names = (await this.apt('apt-cache', ['search', '--names-only', pattern]))
      .split('\n')
      .map((l) => l.split(' ')[0] ?? '')
      .filter((n) => n.length > 0);
    if (names.length === 0) throw new CladeError('not_found', `no Debian package matches ${pattern}; check that the package lists downloaded`);
    const versions = await this.versions(names);
    let best = names[0]!;
    for (const n of names.slice(1)) if (await versionGreater(versions.get(n)!, versions.get(best)!)) best = n;
    return best;
  }

  private async versions(names: string[]): Promise<Map<string, string>> {
    const out = await this.apt('apt-cache', ['show', '--no-all-versions', ...names]);
    const map = new Map<string, string>();
    let current = '';
    for (const line of out.split('\n')) {
      if (line.startsWith('Package: ')) current = line.slice(9).trim();
      else if (line.startsWith('Version: ') && current) map.set(current, line.slice(9).trim());
    }
    return map;
  }

  /**
   * What the named packages recommend, one package per recommendation (the
   * first of alternatives), as `apt-get install` would add them by default:
   * gcc recommends libc6-dev, without which it cannot compile a program.
   * Only the named packages' own recommendations count, not their dependencies'.
   */
  async recommendsOf(packages: string[]): Promise<string[]> {
    if (packages.length === 0) return [];
    const out = await this.apt('apt-cache', ['show', '--no-all-versions', ...packages.map((p) => p.split('=')[0]!)]);
    const found = new Set<string>();
    for (const line of out.split('\n')) {
      if (!line.startsWith('Recommends: ')) continue;
      for (const group of line.slice(12).split(',')) {
        const first = group.split('|')[0]!.trim().split(/[\s(:]/)[0]!;
        if (first) found.add(first);
      }
    }
    return [...found].sort();
  }

  /**
   * The packages and their whole dependency closure (Pre-Depends included), as
   * apt would install them. `optional` ones (recommendations) are left out
   * when apt cannot install them; a missing required one is an error naming it.
   */
  async closure(packages: string[], optional: string[] = []): Promise<DebPackage[]> {
    let extra = [...optional];
    let out: string;
    for (;;) {
      try {
        out = await this.apt('apt-get', ['install', '-s', '-qq', '-y', ...packages, ...extra]);
        break;
      } catch (err) {
        const missing = (err as { missing?: string[] }).missing ?? [];
        const required = missing.filter((m) => !extra.includes(m));
        if (missing.length === 0 || required.length > 0) throw required.length && required.length < missing.length ? new CladeError('not_found', `no Debian package ${required.map((m) => JSON.stringify(m)).join(', ')} in bookworm; check the name with \`apt-cache search\``) : err;
        extra = extra.filter((e) => !missing.includes(e));
      }
    }
    const found: DebPackage[] = [];
    for (const line of out.split('\n')) {
      const m = /^Inst (\S+) \((\S+) .*\[(\w+)\]\)/.exec(line);
      if (!m) continue;
      const [, name = '', version = '', arch = ''] = m;
      // apt's archive file names encode the epoch colon.
      found.push({ name, version, file: `${name}_${version.replace(/:/g, '%3a')}_${arch}.deb` });
    }
    return found.sort((a, b) => a.name.localeCompare(b.name));
  }

  /** Downloads packages into the cache; apt checks each against the signed archive indexes. */
  async download(packages: string[], withDependencies: boolean): Promise<void> {
    if (withDependencies) await this.apt('apt-get', ['install', '-d', '-y', '-qq', ...packages]);
    else await this.apt('apt-get', ['download', '-qq', ...packages], this.archives);
  }
}

/** The packages apt says it cannot install at all: unknown names, virtual packages with no provider, versions it does not have. */
export function missingPackages(stderr: string): string[] {
  const found = new Set<string>();
  for (const line of stderr.split('\n')) {
    const m =
      /Unable to locate package (\S+)/.exec(line) ??
      /Package '?([^' ]+)'? has no installation candidate/.exec(line) ??
      /Version '([^']+)' for '([^']+)' was not found/.exec(line);
    if (!m) continue;
    found.add(m.length === 3 ? `${m[2]}=${m[1]}` : m[1]!);
  }
  return [...found];
}

async function versionGreater(a: string, b: string): Promise<boolean> {
  try {
    await run('dpkg', ['--compare-versions', a, 'gt', b]);
    return true;
  } catch {
    return false;
  }
}
