import { existsSync, readFileSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The clade package's own directory (works from src/ under tsx and from dist/). */
export function packageRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg) && (JSON.parse(readFileSync(pkg, 'utf8')) as { name?: string }).name === 'clade') return dir;
    const up = dirname(dir);
    if (up === dir) throw new Error('cannot find the clade package root');
    dir = up;
  }
}

export function agentBinaryPath(): string {
  return join(packageRoot(), 'native', 'agent', 'build', 'clade-agent');
}

export function guestFilesDir(): string {
  return join(packageRoot(), 'src', 'images', 'guest');
}
