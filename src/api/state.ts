import { closeSync, constants, existsSync, fsyncSync, openSync, readdirSync, readSync, renameSync, rmSync, writeSync } from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { Type } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import { memoryDir } from '../util/home.js';
import { sandboxDir } from '../core/sandboxes.js';
import type { Accelerator } from '../util/kvm-probe.js';
import type { LiveSandbox } from '../core/sandboxes.js';
import { VmmVm } from '../engines/vmm/vmm-engine.js';
import { ensurePrivateDir } from '../util/home.js';

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

const Hex64 = Type.String({ pattern: '^[0-9a-f]{64}$' });
const SandboxId = Type.String({ pattern: '^sb-[0-9a-f]{12}$' });

/** A record is read back like an API request: only a record of exactly this shape is used. */
const SandboxRecordSchema = Type.Object({
  id: SandboxId,
  engine: Type.Optional(Type.Union([Type.Literal('qemu'), Type.Literal('vmm')])),
  pid: Type.Integer({ minimum: 2, maximum: 2 ** 22 }),
  startTicks: Type.Optional(Type.String({ pattern: '^[0-9]{1,20}$' })),
  vmName: Type.String({ maxLength: 64 }),
  runDir: Type.String({ maxLength: 4096 }),
  agentSocket: Type.String({ maxLength: 4096 }),
  tokenHex: Hex64,
  accelerator: Type.Union([Type.Literal('kvm'), Type.Literal('tcg')]),
  memory: Type.Object({ file: Type.String({ maxLength: 4096 }), shared: Type.Boolean() }),
  shape: Type.Object({ imageDigest: Hex64, memoryMiB: Type.Integer({ minimum: 1, maximum: 1 << 20 }), cpus: Type.Integer({ minimum: 1, maximum: 1024 }) }),
  env: Type.Record(Type.String({ maxLength: 4096 }), Type.String({ maxLength: 1 << 20 })),
  parentId: Type.Optional(SandboxId),
  snapshotTag: Type.Optional(Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$' })),
  interpreterExecId: Type.Optional(Type.Integer({ minimum: 1, maximum: 0xffff_ffff })),
  agentIdCursor: Type.Integer({ minimum: 1, maximum: 0xffff_ffff }),
  createdAt: Type.String({ maxLength: 64 }),
  expiresAt: Type.Union([Type.Integer({ minimum: 0 }), Type.Null()]),
});

/**
 * Beyond its shape, a record may only point where clade itself puts things:
 * its run directory and sockets under its own sandbox directory, its RAM file
 * in this home's RAM directory. Nothing read from disk is used as a path to delete or connect to otherwise.
 */
export function validRecord(raw: unknown): SandboxRecord | undefined {
  if (!Value.Check(SandboxRecordSchema, raw)) return undefined;
  const rec = raw as SandboxRecord;
  const run = rec.runDir;
  if (dirname(run) !== sandboxDir(rec.id) || !/^vm-\d{1,9}$/.test(basename(run))) return undefined;
  if (rec.agentSocket !== join(run, 'agent.sock')) return undefined;
  if (rec.vmName !== `clade-${rec.id}`) return undefined;
  if (rec.memory.file !== '' && (dirname(rec.memory.file) !== memoryDir() || !/^[A-Za-z0-9._-]+\.mem$/.test(basename(rec.memory.file)))) return undefined;
  return rec;
}

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

  /** Every valid record; invalid ones are removed (and reported), since nothing in them can be trusted. */
  loadAll(onInvalid: (file: string) => void = () => undefined): SandboxRecord[] {
    const out: SandboxRecord[] = [];
    for (const f of readdirSync(this.dir)) {
      const path = join(this.dir, f);
      if (!f.endsWith('.json')) {
        rmSync(path, { force: true }); // a temp file from a write that never finished
        continue;
      }
      let rec: SandboxRecord | undefined;
      try {
        rec = validRecord(JSON.parse(readNoFollow(path)));
      } catch {
        rec = undefined;
      }
      if (rec && f === `${rec.id}.json`) out.push(rec);
      else {
        onInvalid(f);
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

/** Records are small; one bigger than this, or a symlink in their place, is not ours. */
function readNoFollow(path: string): string {
  const fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  try {
    const buf = Buffer.alloc(4 << 20);
    let n = 0;
    for (let got = 1; got > 0 && n < buf.length; n += got) got = readSyncSafe(fd, buf, n);
    if (n >= buf.length) throw new Error('record too large');
    return buf.toString('utf8', 0, n);
  } finally {
    closeSync(fd);
  }
}

function readSyncSafe(fd: number, buf: Buffer, at: number): number {
  return readSync(fd, buf, at, buf.length - at, null);
}
