import { QemuEngine } from '../engines/qemu/qemu-engine.js';
import { VmmEngine } from '../engines/vmm/vmm-engine.js';
import { SandboxManager } from './manager.js';

let manager: SandboxManager | undefined;
let exitHandling: 'kill' | 'keep' | undefined;

/** This process's sandboxes, on the real engines. */
export function defaultManager(): SandboxManager {
  manager ??= new SandboxManager({ qemu: new QemuEngine(), vmm: new VmmEngine() });
  return manager;
}

/**
 * Sandboxes embedded in a program belong to it: when it exits, or is
 * interrupted by Ctrl-C, SIGTERM or SIGHUP, their VMs are killed and their
 * files removed (synchronously: a signal leaves no time for promises).
 */
export function killSandboxesOnExit(): void {
  if (exitHandling) return;
  exitHandling = 'kill';
  process.on('exit', () => manager?.killAllSync());
  for (const sig of ['SIGINT', 'SIGTERM', 'SIGHUP'] as const) {
    if (process.listenerCount(sig) > 0) continue;
    process.once(sig, () => {
      manager?.killAllSync();
      process.kill(process.pid, sig);
    });
  }
}

/**
 * For a daemon: its sandboxes outlive it (the next daemon adopts them), so at
 * exit only what was started ahead of time (warm slots) is killed.
 */
export function keepSandboxesOnExit(): void {
  exitHandling = 'keep';
  process.on('exit', () => manager?.releasePreparedSync());
}
