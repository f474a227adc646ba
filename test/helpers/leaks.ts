import { existsSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { homePaths, memoryDir } from '../../src/util/home.js';
import { isSandboxVm } from '../../src/engines/qemu/qemu-vm.js';
import { CladeError, type Sandbox } from '../../src/sdk/index.js';

/** Pids of VM processes started for this sandbox id (found by their -name). */
export function vmPids(id: string): number[] {
  return readdirSync('/proc')
    .filter((entry) => /^\d+$/.test(entry))
    .map(Number)
    .filter((pid) => isSandboxVm(pid, id));
}

/** True if nothing of the sandbox remains: no VM process, no run directory. */
export function leftNothing(id: string): boolean {
  return vmPids(id).length === 0 && !existsSync(join(homePaths.sandboxes(), id)) && !existsSync(join(memoryDir(), `${id}.mem`));
}

export function sandboxDirs(): string[] {
  return existsSync(homePaths.sandboxes()) ? readdirSync(homePaths.sandboxes()) : [];
}

export async function waitFor(cond: () => boolean, timeoutMs = 10_000): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  while (Date.now() < end) {
    if (cond()) return true;
    await new Promise((r) => setTimeout(r, 50));
  }
  return cond();
}

/** What remains of a sandbox, for failure messages. */
export function remains(id: string): string[] {
  const left: string[] = vmPids(id).map((p) => `pid ${p}`);
  if (existsSync(join(homePaths.sandboxes(), id))) left.push(`dir ${join(homePaths.sandboxes(), id)}`);
  if (existsSync(join(memoryDir(), `${id}.mem`))) left.push(`ram ${join(memoryDir(), `${id}.mem`)}`);
  return left;
}

/** Unwraps a fork's per-child results (throwing the first error) and tracks the sandboxes for cleanup. */
export function okAndTracked(results: (Sandbox | CladeError)[], tracked: Sandbox[]): Sandbox[] {
  const kids = results.map((r) => {
    if (r instanceof CladeError) throw r;
    return r;
  });
  tracked.push(...kids);
  return kids;
}
