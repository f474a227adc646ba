import { join } from 'node:path';
import type { MachineShape } from '../engines/engine.js';
import type { QemuVm } from '../engines/qemu/qemu-engine.js';
import { ensurePrivateDir } from '../util/home.js';
import { engine, installExitCleanup, killPidQuietly, newSandboxId, onProcessExit, sandboxDir } from './sandboxes.js';
import { rmSync } from 'node:fs';

/** Slots started at once; each QEMU start is CPU-bound, so more would only queue on the cores. */
export const START_CONCURRENCY = 8;

/** Starts one VM that waits to resume a snapshot whose RAM is `memoryFile`; its id becomes the new sandbox's id. */
export async function startSlot(shape: MachineShape, memoryFile: string, memoryFd?: number): Promise<QemuVm> {
  const id = newSandboxId();
  const runDir = ensurePrivateDir(join(sandboxDir(id), 'vm-0'));
  try {
    const vm = await engine.startSlot({ id, ...shape, runDir, baseMemoryFile: memoryFile, ...(memoryFd !== undefined ? { baseMemoryFd: memoryFd } : {}) });
    await vm.qmp();
    return vm;
  } catch (err) {
    rmSync(sandboxDir(id), { recursive: true, force: true });
    throw err;
  }
}

/** Runs `fn` over `items` with at most `limit` in flight; results keep the input order. */
export async function mapLimited<T, R>(items: T[], limit: number, fn: (item: T, i: number) => Promise<R>): Promise<PromiseSettledResult<R>[]> {
  const results: PromiseSettledResult<R>[] = new Array(items.length);
  let next = 0;
  const worker = async () => {
    while (next < items.length) {
      const i = next++;
      try {
        results[i] = { status: 'fulfilled', value: await fn(items[i]!, i) };
      } catch (reason) {
        results[i] = { status: 'rejected', reason };
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(limit, items.length) }, worker));
  return results;
}

/**
 * Warm slots for one snapshot RAM file: VM processes already started with
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
    /** A persistent snapshot's checked memory file, held open while the pool lives. */
    private readonly held?: { fd: number; close: () => Promise<void> },
  ) {
    installExitCleanup();
    onProcessExit(() => this.killSync());
  }

  get available(): number {
    return this.ready.length;
  }

  get target(): number {
    return this.size;
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
        const vm = await startSlot(this.shape, this.memoryFile, this.held?.fd);
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
    await Promise.all(this.ready.splice(0).map((vm) => vm.kill().then(() => rmSync(sandboxDir(vm.id), { recursive: true, force: true }))));
    await this.held?.close();
  }

  private killSync(): void {
    for (const vm of this.ready) {
      killPidQuietly(vm.pid);
      rmSync(sandboxDir(vm.id), { recursive: true, force: true });
    }
  }
}

const pools = new Map<string, SlotPool>();

export function poolFor(memoryFile: string): SlotPool | undefined {
  return pools.get(memoryFile);
}

export function ensurePool(memoryFile: string, shape: MachineShape, size: number, refillOnTake: boolean, held?: { fd: number; close: () => Promise<void> }): SlotPool {
  let pool = pools.get(memoryFile);
  if (!pool) {
    pool = new SlotPool(memoryFile, shape, size, refillOnTake, held);
    pools.set(memoryFile, pool);
  } else void held?.close(); // the pool already holds the file open
  pool.resize(size);
  return pool;
}

export async function closePool(memoryFile: string): Promise<void> {
  const pool = pools.get(memoryFile);
  pools.delete(memoryFile);
  await pool?.close();
}

/** VM processes waiting in all pools, for monitoring. */
export function pooledSlots(): number {
  let n = 0;
  for (const pool of pools.values()) n += pool.available;
  return n;
}
