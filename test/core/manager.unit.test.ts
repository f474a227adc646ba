import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync, utimesSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { pino } from 'pino';
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from 'vitest';
import { SandboxRegistry } from '../../src/api/registry.js';
import { StateStore } from '../../src/api/state.js';
import { runCommand, type CommandResult } from '../../src/core/commands.js';
import { SandboxManager } from '../../src/core/manager.js';
import { type LiveSandbox, newRunDir, newSandboxId, sandboxDir } from '../../src/core/sandbox.js';
import { CladeError } from '../../src/util/errors.js';
import { homePaths } from '../../src/util/home.js';
import { FakeEngine, type FakeVm, fakeImage } from '../helpers/fake-engine.js';

// The core and the daemon's registry on a fake engine whose guests are
// in-memory agents: fork batching, per-child failures, fixups, snapshots,
// adoption after a crash and orphan reaping, in milliseconds and without a VM.

const saved = process.env.CLADE_HOME;
const home = mkdtempSync(join(tmpdir(), 'clade-unit-home-'));
let engine: FakeEngine;
let manager: SandboxManager;

beforeAll(() => {
  process.env.CLADE_HOME = home;
  fakeImage();
});

afterAll(() => {
  if (saved === undefined) delete process.env.CLADE_HOME;
  else process.env.CLADE_HOME = saved;
  rmSync(home, { recursive: true, force: true });
});

beforeEach(() => {
  engine = new FakeEngine();
  manager = new SandboxManager({ qemu: engine }, { requestMs: 3000 });
});

afterEach(async () => {
  await Promise.all(manager.list().map((sb) => sb.kill()));
  expect(readdirSync(homePaths.sandboxes()).filter((d) => !d.startsWith('.'))).toEqual([]);
});

const run = async (sb: LiveSandbox, cmd: string) => ((await runCommand(sb, cmd)) as CommandResult).stdout.trim();
const ok = (kids: (LiveSandbox | CladeError)[]) =>
  kids.map((k) => {
    if (k instanceof CladeError) throw k;
    return k;
  });

describe('SandboxManager on a fake engine', () => {
  it('boots a sandbox that answers over the authenticated channel', async () => {
    const sb = await manager.create();
    expect(await run(sb, 'echo hi')).toBe('hi');
    expect(await run(sb, 'hostname')).toBe(sb.id);
    expect(existsSync(join(sandboxDir(sb.id), 'vm-0', 'vm.json'))).toBe(true);
  });

  it('merges concurrent fork requests for one parent into as few forks as it can', async () => {
    const parent = await manager.create();
    engine.forkDelayMs = 100;
    // Requests made together are one fork; those that come while it runs share the next one.
    const first = [1, 2].map((n) => manager.fork(parent, n));
    await new Promise((r) => setTimeout(r, 30));
    const later = [3, 4, 5].map((n) => manager.fork(parent, n));
    const outcomes = await Promise.all([...first, ...later]);
    expect(outcomes.map((o) => o.children.length)).toEqual([1, 2, 3, 4, 5]);
    expect(engine.forkCalls).toBe(2);
    const ids = outcomes.flatMap((o) => ok(o.children)).map((k) => k.id);
    expect(new Set(ids).size).toBe(15);
  });

  it('makes every child a new machine: own id, hostname and token, the parent state copied', async () => {
    const parent = await manager.create();
    await run(parent, 'write /root/note from-parent');
    const kids = ok((await manager.fork(parent, 3)).children);
    for (const k of kids) {
      expect(await run(k, 'hostname')).toBe(k.id);
      expect(await run(k, 'id')).toBe(k.id);
      expect(await run(k, 'cat /root/note')).toBe('from-parent');
      expect(k.token.equals(parent.token)).toBe(false);
      expect(k.parentId).toBe(parent.id);
    }
    await run(kids[0]!, 'write /root/note changed');
    expect(await run(kids[1]!, 'cat /root/note')).toBe('from-parent');
    expect(await run(parent, 'cat /root/note')).toBe('from-parent');
  });

  it('reports a child that fails on its own, and the others are unaffected', async () => {
    const parent = await manager.create();
    engine.failChildren = new Set([1]);
    const { children } = await manager.fork(parent, 3);
    expect(children[1]).toBeInstanceOf(CladeError);
    const [a, , c] = children as LiveSandbox[];
    expect(await run(a!, 'echo a')).toBe('a');
    expect(await run(c!, 'echo c')).toBe('c');
    // The failed child's directory is gone; nothing of it is left.
    expect(readdirSync(homePaths.sandboxes()).sort()).toEqual([parent.id, a!.id, c!.id].sort());
  });

  it('refuses bad counts and unknown engines before doing anything', async () => {
    const parent = await manager.create();
    await expect(manager.fork(parent, 0)).rejects.toMatchObject({ code: 'bad_request' });
    await expect(manager.fork(parent, 1001)).rejects.toMatchObject({ code: 'bad_request' });
    await expect(manager.create({ engine: 'xen' as never })).rejects.toMatchObject({ code: 'bad_request' });
    await expect(manager.create({ engine: 'vmm' })).rejects.toMatchObject({ code: 'unavailable' });
    expect(engine.forkCalls).toBe(0);
  });

  it('snapshots to a signed file set and starts copies from it, each a new machine', async () => {
    const sb = await manager.create();
    await run(sb, 'write /root/state warm');
    const { meta } = await manager.snapshot(sb, 'fake-snap');
    expect(meta).toMatchObject({ format: 2, tag: 'fake-snap', engine: 'qemu', sandboxId: sb.id });
    const kids = ok(await manager.fromSnapshot('fake-snap', { count: 2 }));
    for (const k of kids) {
      expect(await run(k, 'cat /root/state')).toBe('warm');
      expect(await run(k, 'hostname')).toBe(k.id);
      expect(k.snapshotTag).toBe('fake-snap');
    }
    rmSync(join(homePaths.snapshots(), 'fake-snap'), { recursive: true });
  });

  it('adopts sandboxes a dead daemon left running, and drops those whose VM is gone', async () => {
    const log = pino({ level: 'silent' });
    const store = new StateStore(join(home, 'daemon'));
    const first = new SandboxRegistry(manager, store, 10, log);
    const a = await manager.create();
    const b = await manager.create();
    first.add(a, 0);
    first.add(b, 0);
    (b.vm as FakeVm).killNow(); // b's VM dies while no daemon runs
    // The daemon "dies": a new manager (a new process) takes over from the records alone.
    const next = new SandboxManager({ qemu: engine }, { requestMs: 3000 });
    const second = new SandboxRegistry(next, store, 10, log);
    const { adopted, dropped } = await second.adoptAll();
    expect(adopted).toEqual([a.id]);
    expect(dropped).toEqual([b.id]);
    const again = second.get(a.id);
    expect(await run(again, 'echo adopted')).toBe('adopted');
    expect(existsSync(sandboxDir(b.id))).toBe(false);
    await second.killAll();
    manager = next; // for afterEach's leak check
  });

  it('caps how many forks of one sandbox may queue', async () => {
    const registry = new SandboxRegistry(manager, new StateStore(join(home, 'daemon-locks')), 10, pino({ level: 'silent' }));
    let release!: () => void;
    const gate = new Promise<void>((r) => (release = r));
    const queued = Array.from({ length: 32 }, () => registry.exclusive('sb-000000000000', () => gate));
    await expect(registry.exclusive('sb-000000000000', async () => undefined)).rejects.toMatchObject({ code: 'unavailable' });
    release();
    await Promise.all(queued);
    await expect(registry.exclusive('sb-000000000000', async () => 'free again')).resolves.toBe('free again');
  });

  it('reaps the VMs of an owner that died, and leaves a live owner\'s alone', async () => {
    const live = await manager.create();
    const orphan = await manager.create();
    // Make orphan look like it belongs to a process that has exited.
    const dead = spawnSync(process.execPath, ['-e', '0']).pid!;
    (orphan.vm as FakeVm).recordOwner(dead);
    const other = new SandboxManager({ qemu: engine });
    const reaped = other.reapOrphans();
    expect(reaped).toMatchObject({ killed: 1, removed: 1 });
    expect(engine.killed).toContain(orphan.vm.pid);
    expect(existsSync(sandboxDir(orphan.id))).toBe(false);
    expect(live.vm.alive()).toBe(true);
    expect(existsSync(sandboxDir(live.id))).toBe(true);
  });

  it('removes at once a sandbox directory whose maker died before any VM was recorded, and waits on one still starting', () => {
    const dead = spawnSync(process.execPath, ['-e', '0']).pid!;
    const starting = newSandboxId();
    const abandoned = newSandboxId();
    const unmarked = newSandboxId();
    newRunDir(starting); // made by this process, which lives
    newRunDir(abandoned);
    writeFileSync(join(sandboxDir(abandoned), 'maker'), `${dead} 12345\n`);
    mkdirSync(join(sandboxDir(unmarked), 'vm-0'), { recursive: true }); // an older clade's: judged by age
    new SandboxManager({ qemu: engine }).reapOrphans();
    expect(existsSync(sandboxDir(abandoned))).toBe(false);
    expect(existsSync(sandboxDir(starting))).toBe(true);
    expect(existsSync(sandboxDir(unmarked))).toBe(true);
    const old = new Date(Date.now() - 5 * 60_000);
    utimesSync(sandboxDir(unmarked), old, old);
    // A pid reused by another process does not keep a directory alive: the start time must match too.
    writeFileSync(join(sandboxDir(starting), 'maker'), `${process.pid} 1\n`);
    new SandboxManager({ qemu: engine }).reapOrphans();
    expect(existsSync(sandboxDir(unmarked))).toBe(false);
    expect(existsSync(sandboxDir(starting))).toBe(false);
  });

  it('ignores a vm.json that points outside the clade home', async () => {
    const sb = await manager.create();
    const dead = spawnSync(process.execPath, ['-e', '0']).pid!;
    const victim = join(home, 'not-clade.txt');
    writeFileSync(victim, 'keep me');
    writeFileSync(join(sandboxDir(sb.id), 'vm-0', 'vm.json'), JSON.stringify({ ...sb.vm.toRecord(), ownerPid: dead, memory: { file: victim, shared: true } }));
    new SandboxManager({ qemu: engine }).reapOrphans();
    expect(existsSync(victim)).toBe(true);
  });
});
