import { rmSync } from 'node:fs';
import { join } from 'node:path';
import type { MachineShape } from '../engines/engine.js';
import { type VmmSnapshotFds, type VmmSnapshotTimings, VmmVm } from '../engines/vmm/vmm-engine.js';
import { resolveImage } from '../images/store.js';
import { CladeError } from '../util/errors.js';
import { asCladeError, resumeAsNewSandbox } from './fork.js';
import { ensurePrivateDir } from '../util/home.js';
import { mapLimited, START_CONCURRENCY } from './pool.js';
import { chooseEngine, installExitCleanup, type LiveSandbox, newSandboxId, sandboxDir, vmmEngine } from './sandboxes.js';
import { assertSnapshotEngine, commitSnapshot, openSnapshot, snapshotDir, type SnapshotMeta, stagingDir } from './snapshots.js';

/**
 * Persistent snapshots on the vmm engine (docs/snapshots.md, "vmm engine").
 * clade-vmm writes memory.raw and state.bin itself, from a forked writer
 * process, so the sandbox pauses only as long as for a fork; the metadata,
 * hashes, tags and lineage are the same as the qemu engine's.
 */
export function snapshotVmmSandbox(sb: LiveSandbox, tag: string, parent: string | null): Promise<{ meta: SnapshotMeta; timings: VmmSnapshotTimings }> {
  return sb.exclusive(async () => {
    if (!sb.alive || !(sb.vm instanceof VmmVm)) throw new CladeError('killed', `sandbox ${sb.id} is not running`);
    const vm = sb.vm;
    const staging = stagingDir(tag);
    try {
      await sb.agent.drained();
      const timings = await vm.snapshot(staging);
      const meta = await commitSnapshot(staging, {
        tag,
        parent,
        sandboxId: sb.id,
        engine: 'vmm',
        image: sb.shape.image.manifest.digest,
        memoryMiB: sb.shape.memoryMiB,
        cpus: sb.shape.cpus,
        // Read after the pause: every request id the saved guest can have seen is below it.
        agent: { token: sb.token.toString('hex'), nextId: sb.agent.idCursor, ...(sb.interpreterExecId ? { interpreterExecId: sb.interpreterExecId } : {}) },
      });
      return { meta, timings };
    } catch (err) {
      rmSync(staging, { recursive: true, force: true });
      throw asCladeError(err, `snapshot of ${sb.id} failed`);
    }
  });
}

/**
 * Starts `count` sandboxes from a vmm snapshot: one clade-vmm process each,
 * mapping memory.raw copy-on-write, then the after-fork fixup (new token,
 * entropy, clock, hostname, id) before any user command. The snapshot's files
 * are opened once and checked through those descriptors (openSnapshot); each
 * clade-vmm inherits the same descriptors, so what starts is what was checked,
 * whatever happens to the paths meanwhile. clade-vmm checks state.bin once
 * more itself and refuses a damaged or forged one (CladeError 'integrity').
 */
export async function startFromVmmSnapshot(tag: string, count: number, env: Record<string, string>): Promise<(LiveSandbox | CladeError)[]> {
  const opened = await openSnapshot(tag);
  try {
    const meta = opened.meta;
    assertSnapshotEngine(meta, 'vmm');
    await chooseEngine('vmm'); // says why not, where this host cannot run it
    installExitCleanup();
    const shape: MachineShape = { image: resolveImage(meta.image), memoryMiB: meta.memoryMiB, cpus: meta.cpus };
    const fds: VmmSnapshotFds = { memory: opened.files['memory.raw'].fd, state: opened.files['state.bin'].fd };
    const results = await mapLimited(Array.from({ length: count }), START_CONCURRENCY, () => startOne(meta, shape, env, fds));
    return results.map((r) => (r.status === 'fulfilled' ? r.value : asCladeError(r.reason, `could not start a sandbox from snapshot ${tag}`)));
  } finally {
    await opened.close(); // every clade-vmm holds its own copies (and its mapping) by now
  }
}

async function startOne(meta: SnapshotMeta, shape: MachineShape, env: Record<string, string>, fds: VmmSnapshotFds): Promise<LiveSandbox> {
  const t0 = performance.now();
  const id = newSandboxId();
  const runDir = ensurePrivateDir(join(sandboxDir(id), 'vm-0'));
  const vm = await vmmEngine.restore({ id, runDir, snapshotDir: snapshotDir(meta.tag), shape, fds }).catch((err: unknown) => {
    rmSync(sandboxDir(id), { recursive: true, force: true });
    throw err;
  });
  const origin = { token: Buffer.from(meta.agent.token, 'hex'), nextId: meta.agent.nextId, interpreterExecId: meta.agent.interpreterExecId, shape, env, parentId: undefined };
  return resumeAsNewSandbox(vm, origin, t0);
}
