import { createHash } from 'node:crypto';
import { constants, renameSync, rmSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { mapLimited } from '../../util/concurrency.js';
import { killPidQuietly } from '../../util/process.js';
import { asCladeError, CladeError, errorMessage } from '../../util/errors.js';
import { ensureMemoryDir } from '../../util/home.js';
import { nextRunDir, type BootSpec, type Engine, type ForkResult, type MachineShape, type NewTarget, type PauseHooks, type SnapshotResult, type SnapshotSource, type Vm, type VmRecord } from '../engine.js';
import { copySparseHashed, FrozenRam, transientMemoryPath } from './frozen.js';
import { liveMigrate, loadState, saveDeviceState } from './migration.js';
import { Pools, START_CONCURRENCY, startSlot } from './pool.js';
import { isSandboxVm, launch, QemuVm, withNewRamFile } from './qemu-vm.js';
import { killNet, NetRelay, netDirOf } from '../network.js';

/** Children resumed at once; each activation is a short burst of QEMU work. */
const ACTIVATE_CONCURRENCY = 16;

/**
 * The portable engine: one QEMU process per sandbox, `-M microvm` with a
 * virtio-serial port for the agent. KVM where the host runs Linux guests at
 * hardware speed, TCG elsewhere.
 *
 * Forks: a VM's RAM is a file in tmpfs. To fork, the VM is stopped and its
 * device state saved (RAM excluded, `x-ignore-shared`); the RAM file is then
 * frozen. Children, and the parent's own continuation, are QEMU processes
 * that map that file privately (copy-on-write) and load the device state;
 * they are started before the pause (or taken from a pool of pre-started
 * ones), so the parent is stopped only to save and load ~50 KB of state.
 */
export class QemuEngine implements Engine {
  readonly name = 'qemu' as const;
  readonly processPattern = /qemu-system-[a-z0-9_]+( \(deleted\))?$/;
  private readonly pools = new Pools();

  async unavailableReason(): Promise<string | undefined> {
    return undefined; // a missing QEMU binary is reported by the first start, with the command that installs it
  }

  async boot(spec: BootSpec): Promise<QemuVm> {
    const memoryFile = join(ensureMemoryDir(), `${spec.id}.mem`);
    return withNewRamFile(memoryFile, spec.memoryMiB, async (fd) => {
      const net = spec.network ? await NetRelay.start(spec.network, netDirOf(spec.runDir)) : undefined;
      return launch({ id: spec.id, shape: spec, runDir: spec.runDir, memory: { file: memoryFile, shared: true }, memoryFd: fd, boot: { token: spec.token, hostname: spec.hostname }, ...(net ? { net } : {}) });
    });
  }

  async fork(parent: Vm, count: number, newTarget: NewTarget, hooks: PauseHooks): Promise<ForkResult> {
    let slotErrors: CladeError[] = [];
    let warmSlots = 0;
    let coldSlots = 0;
    const frozen = await this.freezeAndContinue(asQemu(parent), hooks, async (vm) => {
      const r = await this.acquireSlots(vm.shape, vm.memory.file, count, newTarget);
      slotErrors = r.errors;
      warmSlots = r.warm;
      coldSlots = r.slots.length - r.warm;
      return r.slots;
    });
    const childRestoreMs: number[] = [];
    const resumed = await mapLimited(frozen.slots, ACTIVATE_CONCURRENCY, (slot) => this.resumeSlot(slot, frozen.ram, childRestoreMs));
    frozen.ram.release(); // the fork's own hold; each child holds one while it lives
    const children = resumed.map((r) => (r.status === 'fulfilled' ? r.value : asCladeError(r.reason, 'child did not resume')));
    return { parent: frozen.continuation, children: [...children, ...slotErrors], timings: { parentPauseMs: frozen.pauseMs, promoteMs: frozen.promoteMs, warmSlots, coldSlots, childRestoreMs } };
  }

  async snapshot(vm: Vm, dir: string, hooks: PauseHooks): Promise<SnapshotResult> {
    const t0 = performance.now();
    const frozen = await this.freezeAndContinue(asQemu(vm), hooks, async () => []);
    try {
      const memory = await copySparseHashed(frozen.ram.memoryFile, join(dir, 'memory.raw'));
      const state = await open(join(dir, 'state.bin'), constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
      try {
        await state.writeFile(frozen.ram.state);
      } finally {
        await state.close();
      }
      return {
        parent: frozen.continuation,
        hashed: { 'memory.raw': memory, 'state.bin': { sha256: createHash('sha256').update(frozen.ram.state).digest('hex'), bytes: frozen.ram.state.length } },
        timings: { pauseMs: frozen.pauseMs, promoteMs: frozen.promoteMs, totalMs: performance.now() - t0 },
      };
    } finally {
      frozen.ram.release();
    }
  }

  async restore(source: SnapshotSource, count: number, newTarget: NewTarget): Promise<(Vm | CladeError)[]> {
    const ram = new FrozenRam(source.memory.path, source.state.bytes, source.shape, true, source.memory.fd);
    ram.retain();
    try {
      const { slots, errors } = await this.acquireSlots(source.shape, ram.memoryFile, count, newTarget, ram.memoryFd);
      const resumed = await mapLimited(slots, ACTIVATE_CONCURRENCY, (slot) => this.resumeSlot(slot, ram, []));
      return [...resumed.map((r) => (r.status === 'fulfilled' ? r.value : asCladeError(r.reason, `could not start a sandbox from snapshot ${source.tag}`))), ...errors];
    } finally {
      ram.release();
    }
  }

  async adopt(record: VmRecord, shape: MachineShape): Promise<QemuVm> {
    const vm = QemuVm.adopt(record, shape);
    try {
      await vm.resumeIfPaused(); // QEMU accepts a new control client once the old owner's is gone
      return vm;
    } catch (err) {
      await vm.kill();
      throw err;
    }
  }

  recordedAlive(record: VmRecord): boolean {
    return isSandboxVm(record.pid, record.id);
  }
  killRecorded(record: VmRecord): void {
    if (this.recordedAlive(record)) killPidQuietly(record.pid);
    if (record.net) killNet(record.net);
  }


  /**
   * Pre-starts `size` VM processes for the next fork of `vm` and one for its
   * continuation. They map the VM's RAM file, which must be its own shared
   * file: a VM that maps a frozen parent's RAM is first given one (a RAM copy).
   */
  async prewarm(vm: Vm, size: number, newTarget: NewTarget, hooks: PauseHooks): Promise<void> {
    const own = await this.ownRamFile(asQemu(vm), hooks);
    const pool = this.pools.ensure(own.vm.memory.file, own.vm.shape, size, false, newTarget);
    if (size > 0 && !own.vm.warmContinuation) own.vm.setWarmContinuation(this.startContinuation(own.vm));
    await Promise.all([pool.whenFull(), own.vm.warmContinuation?.catch(() => undefined)]);
  }

  async warmPool(source: SnapshotSource & { close(): Promise<void> }, size: number, newTarget: NewTarget): Promise<void> {
    await this.pools.ensure(source.memory.path, source.shape, size, true, newTarget, { fd: source.memory.fd, close: () => source.close() }).whenFull();
  }

  get preparedVms(): number {
    return this.pools.slots;
  }

  releaseAllSync(): void {
    this.pools.killAllSync();
  }

  /** Makes sure the VM's RAM is a shared file it owns, so it can be frozen: otherwise it moves to a new process with one. */
  private async ownRamFile(vm: QemuVm, hooks: PauseHooks): Promise<{ vm: QemuVm; promoteMs: number }> {
    if (vm.memory.shared) return { vm, promoteMs: 0 };
    const t0 = performance.now();
    const file = join(ensureMemoryDir(), `${vm.id}.mem`);
    const next = await this.promote(vm, file, nextRunDir(vm.runDir));
    await hooks.moved(next);
    return { vm: next, promoteMs: performance.now() - t0 };
  }

  /**
   * Freezes a running VM and resumes it at once in a new VM process that maps
   * the frozen RAM copy-on-write. `childSlots` are started before the pause,
   * so the VM is stopped only to save ~50 KB of device state and load it into
   * its continuation. Returns the frozen RAM, held once for the caller.
   */
  private async freezeAndContinue(start: QemuVm, hooks: PauseHooks, childSlots: (vm: QemuVm) => Promise<QemuVm[]>) {
    if (!start.alive()) throw new CladeError('killed', `sandbox ${start.id} is not running`);
    const { vm, promoteMs } = await this.ownRamFile(start, hooks);
    const parentFile = vm.memory.file;
    const [continuation, slots] = await Promise.all([this.takeContinuation(vm), childSlots(vm)]);
    // No VM may open the parent's RAM file by name once it is frozen and renamed.
    await this.pools.close(parentFile);
    await hooks.beforePause();
    const t0 = performance.now();
    const frozenFile = transientMemoryPath();
    let renamed = false;
    let ram: FrozenRam;
    try {
      const state = await this.freeze(vm);
      renameSync(parentFile, frozenFile);
      renamed = true;
      vm.releaseMemoryFile();
      ram = new FrozenRam(frozenFile, state, vm.shape, false);
      await this.activate(continuation, state);
    } catch (err) {
      await Promise.all([continuation.kill(), ...slots.map((k) => k.kill())]);
      // Nobody has resumed from the RAM file yet, so the VM may own it and run on it again.
      if (renamed) {
        renameSync(frozenFile, parentFile);
        vm.reclaimMemoryFile(parentFile);
      }
      if (vm.alive()) await this.resume(vm).catch(() => undefined);
      throw new CladeError('internal', `fork of ${vm.id} failed while it was paused: ${errorMessage(err)}`, { cause: err });
    }
    ram.retain(); // held for the caller until every child is resumed
    continuation.base = ram;
    ram.retain();
    await hooks.moved(continuation);
    return { continuation, ram, slots, pauseMs: performance.now() - t0, promoteMs };
  }

  /** The VM process the parent continues in after a fork: pre-started by prewarm when possible, else started now (before the pause). */
  private async takeContinuation(vm: QemuVm): Promise<QemuVm> {
    const warm = vm.takeWarmContinuation();
    if (warm) {
      const next = await warm.catch(() => undefined);
      if (next?.alive() && next.memory.file === vm.memory.file) return next;
      await next?.kill();
    }
    return this.startContinuation(vm);
  }

  private startContinuation(vm: QemuVm): Promise<QemuVm> {
    // The continuation joins the sandbox's network: its connections survive the move.
    return startSlot(vm.shape, { id: vm.id, runDir: nextRunDir(vm.runDir) }, vm.memory.file, undefined, vm.net?.retain());
  }

  /** Takes ready slots for `memoryFile` from its pool and starts the rest. */
  private async acquireSlots(shape: MachineShape, memoryFile: string, n: number, newTarget: NewTarget, memoryFd?: number): Promise<{ slots: QemuVm[]; warm: number; errors: CladeError[] }> {
    const warm = this.pools.get(memoryFile)?.take(n) ?? [];
    const started = await mapLimited(Array.from({ length: n - warm.length }), START_CONCURRENCY, () => startSlot(shape, newTarget(), memoryFile, memoryFd));
    const slots = [...warm];
    const errors: CladeError[] = [];
    for (const r of started) {
      if (r.status === 'fulfilled') slots.push(r.value);
      else errors.push(asCladeError(r.reason, 'could not start a VM for a child'));
    }
    return { slots, warm: warm.length, errors };
  }

  /** Loads the frozen state into a waiting slot and runs it; the slot then holds the frozen RAM. */
  private async resumeSlot(slot: QemuVm, ram: FrozenRam, restoreMs: number[]): Promise<QemuVm> {
    const t0 = performance.now();
    try {
      await this.activate(slot, ram.state);
    } catch (err) {
      await slot.kill();
      throw err;
    }
    slot.base = ram;
    ram.retain();
    restoreMs.push(performance.now() - t0);
    return slot;
  }

  /** Stops a VM and returns its device state; its RAM file no longer changes. */
  private async freeze(vm: QemuVm): Promise<Buffer> {
    if (!vm.memory.shared) throw new CladeError('internal', 'only a VM whose RAM is a shared file can be frozen; promote it first');
    const qmp = await vm.qmp();
    await qmp.execute('stop');
    return saveDeviceState(qmp, join(vm.runDir, 'save.sock'));
  }

  /** Loads device state into a waiting slot and starts it. */
  private async activate(slot: QemuVm, state: Buffer): Promise<void> {
    const qmp = await slot.qmp();
    await loadState(qmp, join(slot.runDir, 'load.sock'), state, true);
    await qmp.execute('cont');
  }

  /**
   * Gives a VM whose RAM is a private copy-on-write mapping a shared RAM file of
   * its own again, so it can be frozen: its whole RAM moves by live migration
   * into a new QEMU process (a RAM copy; the guest pauses only at the end).
   */
  private async promote(vm: QemuVm, memoryFile: string, runDir: string): Promise<QemuVm> {
    const target = await withNewRamFile(memoryFile, vm.shape.memoryMiB, (fd) => launch({ id: vm.id, shape: vm.shape, runDir, memory: { file: memoryFile, shared: true }, memoryFd: fd, ...(vm.net ? { net: vm.net.retain() } : {}) }));
    try {
      await liveMigrate(await vm.qmp(), await target.qmp(), join(runDir, 'promote.sock'));
      return target;
    } catch (err) {
      await target.kill();
      rmSync(runDir, { recursive: true, force: true });
      throw err;
    }
  }

  private async resume(vm: QemuVm): Promise<void> {
    await (await vm.qmp()).execute('cont');
  }
}

function asQemu(vm: Vm): QemuVm {
  if (vm instanceof QemuVm) return vm;
  throw new CladeError('internal', `the qemu engine was asked to handle a ${vm.engine} VM`);
}
