import { rmSync } from 'node:fs';
import { mapLimited } from '../../util/concurrency.js';
import { killPidQuietly } from '../../util/process.js';
import type { MachineShape, VmTarget } from '../engine.js';
import { NetRelay, netDirOf } from '../network.js';
import { launch, type QemuVm } from './qemu-vm.js';

/** Slots started at once; each QEMU start is CPU-bound, so more would only queue on the cores. */
export const START_CONCURRENCY = 8;

/**
 * Starts one VM that waits (`-incoming defer`) to resume a frozen machine whose RAM is `memoryFile`.
 * A machine with a network gets `net` (the same sandbox's, for a continuation) or a new one of its own.
 */
export async function startSlot(shape: MachineShape, target: VmTarget, memoryFile: string, memoryFd?: number, net?: NetRelay): Promise<QemuVm> {
  try {
    if (shape.network && !net) net = await NetRelay.start(shape.network, netDirOf(target.runDir));
    const vm = await launch({ id: target.id, shape, runDir: target.runDir, memory: { file: memoryFile, shared: false }, ...(memoryFd !== undefined ? { memoryFd } : {}), ...(net ? { net } : {}) });
    await vm.qmp();
    return vm;
  } catch (err) {
    rmSync(target.runDir, { recursive: true, force: true });
    throw err;
  }
}

/**
 * Warm slots for one frozen RAM file: VM processes already started with
 * `-incoming defer`, so a fork or a start from a snapshot only loads device
 * state and resumes. Refills in the background up to `size`.
 */
export class SlotPool {
  private readonly ready: QemuVm[] = [];
  private starting = 0;
  private inFlight: Promise<unknown> = Promise.resolve();
  private closed = false;
  private readonly waiters: (() => void)[] = [];

  /**
   * @param refillOnTake refill after slots are taken: right for a persistent
   * snapshot, whose RAM file never changes; a live sandbox's file is frozen and
   * renamed by the fork that takes the slots, so its pool must not start more.
   */
  constructor(
    readonly memoryFile: string,
    readonly shape: MachineShape,
    private size: number,
    private readonly refillOnTake: boolean,
    private readonly newTarget: () => VmTarget,
    /** A persistent snapshot's checked memory file, held open while the pool lives. */
    private readonly held?: { fd: number; close: () => Promise<void> },
  ) {}

  get available(): number {
    return this.ready.length;
  }

  resize(size: number): void {
    this.size = size;
    while (this.ready.length > size) void this.ready.pop()!.kill();
    this.refill();
  }

  /** Takes up to n ready slots (fewer if the pool is short; the caller starts the rest). */
  take(n: number): QemuVm[] {
    const taken = this.ready.splice(0, n).filter((vm) => vm.alive());
    if (this.refillOnTake) this.refill();
    return taken;
  }

  /** Resolves when the pool is full (for benchmarks and tests that want a warm start). */
  async whenFull(): Promise<void> {
    while (!this.closed && this.ready.length < this.size) await new Promise<void>((r) => this.waiters.push(r));
  }

  refill(): void {
    const missing = this.size - this.ready.length - this.starting;
    if (this.closed || missing <= 0) return;
    this.starting += missing;
    const batch = mapLimited(Array.from({ length: missing }), START_CONCURRENCY, async () => {
      try {
        const vm = await startSlot(this.shape, this.newTarget(), this.memoryFile, this.held?.fd);
        if (this.closed) await vm.kill();
        else this.ready.push(vm);
      } finally {
        this.starting--;
        for (const w of this.waiters.splice(0)) w();
      }
    });
    this.inFlight = Promise.all([this.inFlight, batch]);
  }

  /** Kills every slot, including those still starting (so none opens the RAM file after this). */
  async close(): Promise<void> {
    this.closed = true;
    for (const w of this.waiters.splice(0)) w();
    await this.inFlight;
    await Promise.all(this.ready.splice(0).map((vm) => vm.kill()));
    await this.held?.close();
  }

  /** At process exit: no time for promises. */
  killSync(): void {
    for (const vm of this.ready) {
      killPidQuietly(vm.pid);
      rmSync(vm.runDir, { recursive: true, force: true });
    }
  }
}

/** The pools of one engine, by frozen RAM file. */
export class Pools {
  private readonly pools = new Map<string, SlotPool>();

  get(memoryFile: string): SlotPool | undefined {
    return this.pools.get(memoryFile);
  }

  ensure(memoryFile: string, shape: MachineShape, size: number, refillOnTake: boolean, newTarget: () => VmTarget, held?: { fd: number; close: () => Promise<void> }): SlotPool {
    let pool = this.pools.get(memoryFile);
    if (!pool) {
      pool = new SlotPool(memoryFile, shape, size, refillOnTake, newTarget, held);
      this.pools.set(memoryFile, pool);
    } else void held?.close(); // the pool already holds the file open
    pool.resize(size);
    return pool;
  }

  async close(memoryFile: string): Promise<void> {
    const pool = this.pools.get(memoryFile);
    this.pools.delete(memoryFile);
    await pool?.close();
  }

  /** VM processes waiting in every pool. */
  get slots(): number {
    let n = 0;
    for (const pool of this.pools.values()) n += pool.available;
    return n;
  }

  killAllSync(): void {
    for (const pool of this.pools.values()) pool.killSync();
  }
}
