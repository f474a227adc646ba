import { randomBytes } from 'node:crypto';
import { renameSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { AgentClient } from '../agent-protocol/client.js';
import { MessageType, Tag } from '../agent-protocol/constants.js';
import { FieldWriter } from '../agent-protocol/fields.js';
import type { QemuVm } from '../engines/qemu/qemu-engine.js';
import { VmmVm } from '../engines/vmm/vmm-engine.js';
import { CladeError, errorMessage } from '../util/errors.js';
import { ensureMemoryDir, ensurePrivateDir } from '../util/home.js';
import { closePool, mapLimited, poolFor, START_CONCURRENCY, startSlot } from './pool.js';
import { engine, LiveSandbox, newSandboxId, registerLive, sandboxDir } from './sandboxes.js';
import { Snapshot, transientMemoryPath } from './snapshots.js';
import { reseedInterpreter } from './interpreter.js';

export const MAX_FORK_COUNT = 1000;
/** Children resumed at once; each activation is a short burst of QEMU work. */
const ACTIVATE_CONCURRENCY = 16;

export type ForkTimings = {
  /** Parent stopped → parent running again in its new process, ms. */
  parentPauseMs: number;
  /** Promotion of a copy-on-write parent to its own RAM file (a RAM copy), ms; 0 if not needed. */
  promoteMs: number;
  /** Slots taken warm from a pool, and started for this fork. */
  warmSlots: number;
  coldSlots: number;
  /**
   * qemu engine: per child, its device state loaded into its pre-started VM
   * process until that VM runs (a snapshot restore), ms. Empty on the vmm
   * engine, whose children time themselves (VmmVm.status()).
   */
  childRestoreMs: number[];
};

export type ForkOutcome = { children: (LiveSandbox | CladeError)[]; timings: ForkTimings };

/** Makes sure the sandbox's RAM is a shared file it owns, so it can be frozen. */
export function ensureFreezable(sb: LiveSandbox): Promise<number> {
  return sb.exclusive(() => promoteUnlessShared(sb));
}

async function promoteUnlessShared(sb: LiveSandbox): Promise<number> {
  const vm = sb.qemu('pre-started fork slots');
  if (vm.memory.shared) return 0;
  const t0 = performance.now();
  const file = join(ensureMemoryDir(), `${sb.id}.mem`);
  const next = await engine.promote(vm, file, sb.nextRunDir());
  await sb.replaceVm(next, undefined);
  return performance.now() - t0;
}

/**
 * Freezes a running sandbox into a snapshot and resumes it at once in a new VM
 * process that maps the frozen RAM copy-on-write. `slots` are started before
 * the pause, so the parent is stopped only to save ~50 KB of device state and
 * load it into its continuation.
 */
export function freezeAndContinue(sb: LiveSandbox, childSlots: () => Promise<{ slots: QemuVm[]; warm: number }>) {
  return sb.exclusive(() => freezeAndContinueNow(sb, childSlots));
}

async function freezeAndContinueNow(sb: LiveSandbox, childSlots: () => Promise<{ slots: QemuVm[]; warm: number }>) {
  if (!sb.alive) throw new CladeError('killed', `sandbox ${sb.id} is not running`);
  sb.qemu('snapshots to disk');
  const promoteMs = await promoteUnlessShared(sb);
  const vm = sb.qemu('snapshots to disk'); // promotion may have moved it to a new process
  const parentFile = vm.memory.file;
  const [continuation, kids] = await Promise.all([takeContinuation(sb), childSlots()]);
  // No VM may open the parent's RAM file by name once it is frozen and renamed.
  await closePool(parentFile);
  await sb.agent.drained();
  const t0 = performance.now();
  const frozenFile = transientMemoryPath();
  let renamed = false;
  let snapshot: Snapshot;
  try {
    const state = await engine.freeze(vm);
    renameSync(parentFile, frozenFile);
    renamed = true;
    vm.releaseMemoryFile();
    snapshot = new Snapshot(`fork-${sb.id}-${Date.now()}`, frozenFile, state, sb.shape, {
      token: sb.token,
      nextId: sb.agent.idCursor, // read after the freeze: every id the frozen guest can have seen is below it
      ...(sb.interpreterExecId ? { interpreterExecId: sb.interpreterExecId } : {}),
    });
    await engine.activate(continuation, state);
  } catch (err) {
    await Promise.all([continuation.kill(), ...kids.slots.map((k) => k.kill())]);
    // Nobody has resumed from the RAM file yet, so the parent may own it and run on it again.
    if (renamed) {
      renameSync(frozenFile, parentFile);
      vm.reclaimMemoryFile(parentFile);
    }
    if (vm.alive()) await engine.resume(vm).catch(() => undefined);
    throw new CladeError('internal', `fork of ${sb.id} failed while the parent was paused: ${errorMessage(err)}`, { cause: err });
  }
  snapshot.retain(); // held by this fork until every child is resumed
  // The device state is the parent's; the continuation is the parent, so its request ids carry on.
  sb.agent.idCursor = snapshot.agent.nextId;
  await sb.replaceVm(continuation, snapshot);
  const parentPauseMs = performance.now() - t0;
  return { snapshot, kids, parentPauseMs, promoteMs };
}

/**
 * The VM process the parent continues in after a fork: pre-started by
 * prewarmForks() when possible, else started now (before the pause).
 */
async function takeContinuation(sb: LiveSandbox): Promise<QemuVm> {
  const warm = sb.takeWarmContinuation();
  if (warm) {
    const vm = await warm.catch(() => undefined);
    if (vm?.alive() && vm.memory.file === sb.vm.memory.file) return vm;
    await vm?.kill();
  }
  return startContinuation(sb);
}

export async function startContinuation(sb: LiveSandbox): Promise<QemuVm> {
  const vm = await engine.startSlot({ id: sb.id, ...sb.shape, runDir: sb.nextRunDir(), baseMemoryFile: sb.vm.memory.file });
  await vm.qmp();
  return vm;
}

/** Takes warm slots for `memoryFile` from its pool and starts the rest. */
export async function acquireSlots(sb: { shape: LiveSandbox['shape'] }, memoryFile: string, n: number, memoryFd?: number): Promise<{ slots: QemuVm[]; warm: number; errors: CladeError[] }> {
  const warm = poolFor(memoryFile)?.take(n) ?? [];
  const missing = n - warm.length;
  const started = await mapLimited(Array.from({ length: missing }), START_CONCURRENCY, () => startSlot(sb.shape, memoryFile, memoryFd));
  const slots = [...warm];
  const errors: CladeError[] = [];
  for (const r of started) {
    if (r.status === 'fulfilled') slots.push(r.value);
    else errors.push(asCladeError(r.reason, 'could not start a VM for a child'));
  }
  return { slots, warm: warm.length, errors };
}

type ForkWaiter = { count: number; resolve: (o: ForkOutcome) => void; reject: (e: unknown) => void };

/** Fork requests for a parent that have not yet reached its freeze: they are served by one fork. */
const openBatches = new WeakMap<LiveSandbox, ForkWaiter[]>();

/**
 * Forks a running sandbox into `count` children; failures are reported per
 * child. Forks of one parent run one after another, and requests that arrive
 * while one is under way are merged into the next: one pause serves them all.
 */
export function forkSandbox(parent: LiveSandbox, count: number): Promise<ForkOutcome> {
  if (!Number.isInteger(count) || count < 1 || count > MAX_FORK_COUNT) throw new CladeError('bad_request', `fork count must be an integer from 1 to ${MAX_FORK_COUNT}, got ${count}`);
  return new Promise<ForkOutcome>((resolve, reject) => {
    const open = openBatches.get(parent);
    if (open && total(open) + count <= MAX_FORK_COUNT) {
      open.push({ count, resolve, reject });
      return;
    }
    const batch = [{ count, resolve, reject }];
    openBatches.set(parent, batch);
    forkBatch(parent, batch).then(
      (outcome) => splitOutcome(outcome, batch),
      (err: unknown) => batch.forEach((w) => w.reject(err)),
    );
  });
}

function total(batch: ForkWaiter[]): number {
  return batch.reduce((n, w) => n + w.count, 0);
}

async function forkBatch(parent: LiveSandbox, batch: ForkWaiter[]): Promise<ForkOutcome> {
  if (parent.vm instanceof VmmVm) return forkInVmm(parent, batch);
  let slotErrors: CladeError[] = [];
  let warmSlots = 0;
  try {
    const { snapshot, kids, parentPauseMs, promoteMs } = await freezeAndContinue(
      parent,
      async () => {
        closeBatch(parent, batch);
        const r = await acquireSlots(parent, parent.vm.memory.file, total(batch));
        slotErrors = r.errors;
        warmSlots = r.warm;
        return r;
      },
    );
    const childRestoreMs: number[] = [];
    const children = await resumeChildren(snapshot, kids.slots, parent.env, parent.id, childRestoreMs);
    snapshot.release();
    return { children: [...children, ...slotErrors], timings: { parentPauseMs, promoteMs, warmSlots, coldSlots: kids.slots.length - warmSlots, childRestoreMs } };
  } finally {
    closeBatch(parent, batch);
  }
}

/** From here on the batch's count is fixed: later requests wait for the next fork. */
function closeBatch(parent: LiveSandbox, batch: ForkWaiter[]): void {
  if (openBatches.get(parent) === batch) openBatches.delete(parent);
}

/**
 * A fork on the vmm engine: clade-vmm fork(2)s itself once per child in one
 * pause of the parent, which keeps running in its own process. Each child
 * then gets the after-fork fixup over its own agent socket.
 */
function forkInVmm(parent: LiveSandbox, batch: ForkWaiter[]): Promise<ForkOutcome> {
  return parent.exclusive(async () => {
    closeBatch(parent, batch);
    if (!parent.alive) throw new CladeError('killed', `sandbox ${parent.id} is not running`);
    const ids = Array.from({ length: total(batch) }, newSandboxId);
    const targets = ids.map((id) => ({ id, runDir: ensurePrivateDir(join(sandboxDir(id), 'vm-0')) }));
    await parent.agent.drained();
    const cursor = parent.agent.idCursor; // every id the guest can have seen is below it
    const t0 = performance.now();
    let forked: Awaited<ReturnType<VmmVm['fork']>>;
    try {
      forked = await (parent.vm as VmmVm).fork(targets);
    } catch (err) {
      for (const id of ids) rmSync(sandboxDir(id), { recursive: true, force: true });
      throw asCladeError(err, `fork of ${parent.id} failed`);
    }
    const results = await mapLimited(forked.vms, ACTIVATE_CONCURRENCY, (vm) => becomeVmmChild(vm, parent, cursor, t0));
    const children = results.map((r) => (r.status === 'fulfilled' ? r.value : asCladeError(r.reason, 'child did not resume')));
    return { children, timings: { parentPauseMs: forked.timings.pauseUs / 1000, promoteMs: 0, warmSlots: 0, coldSlots: 0, childRestoreMs: [] } };
  });
}

function becomeVmmChild(vm: VmmVm, parent: LiveSandbox, cursor: number, t0: number): Promise<LiveSandbox> {
  return resumeAsNewSandbox(vm, { token: parent.token, nextId: cursor, interpreterExecId: parent.interpreterExecId, shape: parent.shape, env: parent.env, parentId: parent.id }, t0);
}

/** Where a resumed guest comes from: the token it still holds, where request ids go on, its forked interpreter. */
export type GuestOrigin = {
  token: Buffer;
  nextId: number;
  interpreterExecId: number | undefined;
  shape: LiveSandbox['shape'];
  env: Record<string, string>;
  parentId: string | undefined;
  /** The frozen snapshot the new sandbox's RAM maps copy-on-write (qemu engine). */
  base?: Snapshot;
};

/**
 * Turns a VM that resumes someone else's state (a fork's child, a start from
 * a snapshot) into a sandbox of its own: runs `start` (e.g. loading the state),
 * connects to its agent with the origin's token, sends the after-fork fixup,
 * registers it and reseeds the interpreter it inherited. On failure the VM and
 * its files are removed.
 */
export async function resumeAsNewSandbox(vm: QemuVm | VmmVm, origin: GuestOrigin, t0: number, start: () => Promise<void> = async () => undefined): Promise<LiveSandbox> {
  const agent = new AgentClient(origin.token);
  agent.idCursor = origin.nextId;
  try {
    await start();
    await agent.connect(vm.agentSocket, Date.now() + 10_000, () => vm.alive());
    const token = await becomeNewMachine(agent, vm.id);
    const sb = new LiveSandbox(vm.id, vm, agent, token, origin.shape, { ...origin.env }, new Date(), performance.now() - t0, origin.parentId);
    if (origin.base) {
      sb.base = origin.base;
      origin.base.retain();
    }
    registerLive(sb);
    // Queued ahead of any runCode the caller sends next; no need to wait for it here.
    if (origin.interpreterExecId) void reseedInterpreter(sb, origin.interpreterExecId).catch(() => undefined);
    return sb;
  } catch (err) {
    agent.close();
    await vm.kill();
    rmSync(sandboxDir(vm.id), { recursive: true, force: true });
    throw err;
  }
}

/** Gives each merged request its own share of the children, in request order. */
function splitOutcome(outcome: ForkOutcome, batch: ForkWaiter[]): void {
  let next = 0;
  for (const w of batch) {
    w.resolve({ ...outcome, children: outcome.children.slice(next, next + w.count) });
    next += w.count;
  }
}

/** Loads the snapshot into each slot and turns it into a new machine; each restore's duration is appended to `restoreMs`. */
export async function resumeChildren(snapshot: Snapshot, slots: QemuVm[], env: Record<string, string>, parentId: string | undefined, restoreMs: number[] = []): Promise<(LiveSandbox | CladeError)[]> {
  const results = await mapLimited(slots, ACTIVATE_CONCURRENCY, (slot) => resumeChild(snapshot, slot, env, parentId, restoreMs));
  return results.map((r) => (r.status === 'fulfilled' ? r.value : asCladeError(r.reason, 'child did not resume')));
}

function resumeChild(snapshot: Snapshot, slot: QemuVm, env: Record<string, string>, parentId: string | undefined, restoreMs: number[]): Promise<LiveSandbox> {
  const t0 = performance.now();
  const origin = { token: snapshot.agent.token, nextId: snapshot.agent.nextId, interpreterExecId: snapshot.agent.interpreterExecId, shape: snapshot.shape, env, parentId, base: snapshot };
  return resumeAsNewSandbox(slot, origin, t0, async () => {
    await engine.activate(slot, snapshot.state);
    restoreMs.push(performance.now() - t0);
  });
}

/**
 * The after-fork fixup, before any user command: fresh kernel entropy, the
 * host's wall clock, its own hostname and sandbox id, and a new token (the
 * request itself is authenticated with the parent's, which then stops working).
 */
async function becomeNewMachine(agent: AgentClient, id: string): Promise<Buffer> {
  const token = randomBytes(32);
  const body = new FieldWriter()
    .bytes(Tag.SEED, randomBytes(64))
    .u64(Tag.TIME_NS, BigInt(Date.now()) * 1_000_000n + BigInt(Math.floor((performance.now() % 1) * 1e6)))
    .str(Tag.HOSTNAME, id)
    .str(Tag.SANDBOX_ID, id)
    .bytes(Tag.NEW_TOKEN, token);
  await agent.request(MessageType.FORK_FIXUP, body, 10_000);
  agent.setToken(token);
  return token;
}

export function asCladeError(err: unknown, what: string): CladeError {
  return err instanceof CladeError ? err : new CladeError('internal', `${what}: ${errorMessage(err)}`, { cause: err });
}
