import { basename, dirname, join } from 'node:path';
import { Type, type Static } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import type { VmRecord } from '../engines/engine.js';
import { memoryDir } from '../util/home.js';
import { sandboxDir } from './sandbox.js';

// What is kept on disk about VMs and sandboxes, and how it is read back: like
// an API request, checked field by field, and only trusted to point where
// clade itself puts things. Nothing read from disk is used as a path to
// delete or connect to, or a pid to signal, until it passed these checks.

const Hex64 = Type.String({ pattern: '^[0-9a-f]{64}$' });
const SandboxId = Type.String({ pattern: '^sb-[0-9a-f]{12}$' });

export const VmRecordSchema = Type.Object(
  {
    engine: Type.Union([Type.Literal('qemu'), Type.Literal('vmm')]),
    id: SandboxId,
    pid: Type.Integer({ minimum: 2, maximum: 2 ** 22 }),
    startTicks: Type.Optional(Type.String({ pattern: '^[0-9]{1,20}$' })),
    runDir: Type.String({ maxLength: 4096 }),
    accelerator: Type.Union([Type.Literal('kvm'), Type.Literal('tcg')]),
    memory: Type.Object({ file: Type.String({ maxLength: 4096 }), shared: Type.Boolean() }, { additionalProperties: false }),
    shape: Type.Object({ imageDigest: Hex64, memoryMiB: Type.Integer({ minimum: 1, maximum: 1 << 20 }), cpus: Type.Integer({ minimum: 1, maximum: 1024 }) }, { additionalProperties: false }),
  },
  { additionalProperties: false },
);

/** A daemon's record of one sandbox: the VM (as the engine records it) and what the host must know about the guest. */
export const SandboxRecordSchema = Type.Object(
  {
    id: SandboxId,
    vm: VmRecordSchema,
    tokenHex: Hex64,
    env: Type.Record(Type.String({ maxLength: 4096 }), Type.String({ maxLength: 1 << 20 })),
    parentId: Type.Optional(SandboxId),
    snapshotTag: Type.Optional(Type.String({ pattern: '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$' })),
    interpreterExecId: Type.Optional(Type.Integer({ minimum: 1, maximum: 0xffff_ffff })),
    /** Persistent interpreters besides the sandbox's own (E2B code contexts), by name. */
    namedInterpreters: Type.Optional(
      Type.Array(
        Type.Object(
          { name: Type.String({ pattern: '^[A-Za-z0-9._-]{1,64}$' }), execId: Type.Integer({ minimum: 1, maximum: 0xffff_ffff }), cwd: Type.Optional(Type.String({ maxLength: 4096 })) },
          { additionalProperties: false },
        ),
        { maxItems: 256 },
      ),
    ),
    /** Request ids at or above this are unused by the guest's agent. */
    agentIdCursor: Type.Integer({ minimum: 1, maximum: 0xffff_ffff }),
    createdAt: Type.String({ maxLength: 64 }),
    /** Epoch ms after which the daemon kills the sandbox; null for no limit. */
    expiresAt: Type.Union([Type.Integer({ minimum: 0 }), Type.Null()]),
  },
  { additionalProperties: false },
);
export type SandboxRecord = Static<typeof SandboxRecordSchema>;

/** vm.json in a VM's run directory: its record and the process that owns it (reapers kill VMs whose owner is gone). */
const VmFileSchema = Type.Composite([VmRecordSchema, Type.Object({ ownerPid: Type.Integer({ minimum: 1, maximum: 2 ** 22 }) })], { additionalProperties: false });
export type VmFile = VmRecord & { ownerPid: number };

/** A VM record that points only where clade puts things: its run directory in its sandbox's directory, its RAM file in this home's RAM directory. */
function placed(vm: VmRecord): boolean {
  if (dirname(vm.runDir) !== sandboxDir(vm.id) || !/^vm-\d{1,9}$/.test(basename(vm.runDir))) return false;
  return vm.memory.file === '' || (dirname(vm.memory.file) === memoryDir() && /^[A-Za-z0-9._-]+\.mem$/.test(basename(vm.memory.file)));
}

export function validVmFile(raw: unknown): VmFile | undefined {
  return Value.Check(VmFileSchema, raw) && placed(raw) ? raw : undefined;
}

export function validSandboxRecord(raw: unknown): SandboxRecord | undefined {
  if (!Value.Check(SandboxRecordSchema, raw)) return undefined;
  return raw.vm.id === raw.id && placed(raw.vm) ? raw : undefined;
}

/** The agent socket of a recorded VM: always the one in its run directory. */
export function agentSocketOf(vm: VmRecord): string {
  return join(vm.runDir, 'agent.sock');
}
