import { closeSync, existsSync, fsyncSync, openSync, readdirSync, readFileSync, renameSync, rmSync, writeSync } from 'node:fs';
import { basename, join } from 'node:path';
import type { Accelerator } from '../engines/qemu/accel.js';
import type { LiveSandbox } from '../core/sandboxes.js';
import { VmmVm } from '../engines/vmm/vmm-engine.js';
import { ensurePrivateDir } from '../core/home.js';

/**
 * What the daemon keeps on disk about one sandbox: enough to take over its
 * running VM after the daemon was killed and restarted. Holds the agent token,
 * so files are mode 0600 in a 0700 directory.
 */
export type SandboxRecord = {
  id: string;
  /** Absent in records written before the vmm engine existed: qemu. */
  engine?: 'qemu' | 'vmm';
  pid: number;
  /** vmm engine: the process's start time, which tells it from a reused pid. */
  startTicks?: string;
  /** QEMU's -name; a pid only counts as this VM while its command line has it. */
  vmName: string;
  runDir: string;
  agentSocket: string;
  tokenHex: string;
  accelerator: Accelerator;
  memory: { file: string; shared: boolean };
  shape: { imageDigest: string; memoryMiB: number; cpus: number };
  env: Record<string, string>;
  parentId?: string;
  snapshotTag?: string;
  interpreterExecId?: number;
  agentIdCursor: number;
  createdAt: string;
  /** Epoch ms after which the daemon kills the sandbox; null for no limit. */
  expiresAt: number | null;
};

export function recordOf(live: LiveSandbox, extra: { expiresAt: number | null; snapshotTag?: string }): SandboxRecord {
  return {
    id: live.id,
    engine: live.engineName,
    pid: live.vm.pid,
    ...(live.vm instanceof VmmVm && live.vm.startTicks ? { startTicks: live.vm.startTicks } : {}),
    vmName: `clade-${live.id}`,
    runDir: live.vm.runDir,
    agentSocket: live.vm.agentSocket,
    tokenHex: live.token.toString('hex'),
    accelerator: live.vm.accelerator,
    memory: { ...live.vm.memory },
    shape: { imageDigest: live.shape.image.manifest.digest, memoryMiB: live.shape.memoryMiB, cpus: live.shape.cpus },
    env: live.env,
    ...(live.parentId ? { parentId: live.parentId } : {}),
    ...(extra.snapshotTag ? { snapshotTag: extra.snapshotTag } : {}),
    ...(live.interpreterExecId ? { interpreterExecId: live.interpreterExecId } : {}),
    agentIdCursor: live.agent.idCursor,
    createdAt: live.createdAt.toISOString(),
    expiresAt: extra.expiresAt,
  };
}

/** One JSON file per sandbox, each replaced atomically so a crash never leaves half a record. */
export class StateStore {
  private readonly dir: string;

  constructor(stateDir: string) {
    this.dir = ensurePrivateDir(join(stateDir, 'sandboxes'));
  }

  save(rec: SandboxRecord): void {
    writeAtomic(join(this.dir, `${rec.id}.json`), JSON.stringify(rec, null, 2) + '\n');
  }

  remove(id: string): void {
    rmSync(join(this.dir, `${id}.json`), { force: true });
  }

  /** Every readable record; unreadable ones are removed (a record is only useful if it parses). */
  loadAll(): SandboxRecord[] {
    const out: SandboxRecord[] = [];
    for (const f of readdirSync(this.dir)) {
      const path = join(this.dir, f);
      if (!f.endsWith('.json')) {
        rmSync(path, { force: true }); // a temp file from a write that never finished
        continue;
      }
      try {
        out.push(JSON.parse(readFileSync(path, 'utf8')) as SandboxRecord);
      } catch {
        rmSync(path, { force: true });
      }
    }
    return out;
  }

  has(id: string): boolean {
    return existsSync(join(this.dir, `${id}.json`));
  }
}

/** write temp + fsync + rename + fsync of the directory: the file is either the old or the new one. */
export function writeAtomic(path: string, data: string): void {
  const tmp = join(path, '..', `.${basename(path)}.${process.pid}.tmp`);
  const fd = openSync(tmp, 'w', 0o600);
  try {
    writeSync(fd, data);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
  const dirFd = openSync(join(path, '..'), 'r');
  try {
    fsyncSync(dirFd);
  } finally {
    closeSync(dirFd);
  }
}
