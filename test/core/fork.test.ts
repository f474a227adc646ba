import { readdirSync } from 'node:fs';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { MessageType, Tag } from '../../src/agent-protocol/constants.js';
import { FieldWriter } from '../../src/agent-protocol/fields.js';
import { encodeHostFrame } from '../../src/agent-protocol/frame.js';
import { memoryDir } from '../../src/util/home.js';
import { defaultManager } from '../../src/core/default.js';
import { CladeError, Sandbox } from '../../src/sdk/index.js';
import { okAndTracked, remains, vmPids } from '../helpers/leaks.js';

// One warm parent for the whole file: numpy imported in its interpreter, a
// file written, a process running. Every test forks from it.
let parent: Sandbox;
let sleeperPid: string;
const everyone: Sandbox[] = [];

const ok = (results: (Sandbox | CladeError)[]) => okAndTracked(results, everyone);

beforeAll(async () => {
  parent = await Sandbox.create();
  everyone.push(parent);
  await parent.files.write('/root/state.txt', 'before-fork');
  await parent.runCode('import numpy, random\nsecret_number = 1234');
  sleeperPid = (await parent.commands.run('sleep 100000 > /dev/null 2>&1 & echo $!')).stdout.trim();
});

afterAll(async () => {
  const ids = everyone.map((s) => s.sandboxId);
  await Promise.all(everyone.map((s) => s.kill()));
  expect(ids.flatMap((id) => remains(id))).toEqual([]);
  // Transient snapshots' RAM files go with the last VM that maps them.
  const strays = readdirSync(memoryDir()).filter((f) => f.startsWith(`snap-${process.pid}-`));
  expect(strays).toEqual([]);
});

describe('fork', () => {
  it('children resume from the exact state of the parent: files, processes, Python variables', async () => {
    const [a, b] = ok(await parent.fork(2));
    for (const kid of [a!, b!]) {
      expect(await kid.files.read('/root/state.txt')).toBe('before-fork');
      expect((await kid.commands.run(`kill -0 ${sleeperPid} && echo alive`)).stdout).toBe('alive\n');
      expect((await kid.runCode('secret_number + 1')).value).toBe('1235');
      expect((await kid.runCode('numpy.zeros(5).tolist()')).value).toBe('[0.0, 0.0, 0.0, 0.0, 0.0]');
      expect(kid.getInfo().parentId).toBe(parent.sandboxId);
    }
  });

  it('isolates children from each other and from the parent', async () => {
    const [a, b] = ok(await parent.fork(2));
    await a!.files.write('/root/state.txt', 'written-by-a');
    await a!.runCode('secret_number = 0');
    await a!.commands.run(`kill ${sleeperPid}`);
    expect(await b!.files.read('/root/state.txt')).toBe('before-fork');
    expect(await parent.files.read('/root/state.txt')).toBe('before-fork');
    expect((await b!.runCode('secret_number')).value).toBe('1234');
    expect((await parent.runCode('secret_number')).value).toBe('1234');
    expect((await parent.commands.run(`kill -0 ${sleeperPid} && echo alive`)).stdout).toBe('alive\n');
    expect((await b!.commands.run(`kill -0 ${sleeperPid} && echo alive`)).stdout).toBe('alive\n');
  });

  it('makes every child a new machine: entropy, clock, hostname, id, token', async () => {
    const [a, b] = ok(await parent.fork(2));
    const probe = 'head -c 32 /dev/urandom | od -An -tx1 | tr -d " \\n"; echo; hostname; echo $CLADE_SANDBOX_ID; date +%s';
    const [ra, rb] = await Promise.all([a!.commands.run(probe), b!.commands.run(probe)]);
    const [randA, hostA, idA, clockA] = ra.stdout.trim().split('\n');
    const [randB, hostB, idB] = rb.stdout.trim().split('\n');
    expect(randA).not.toBe(randB);
    expect([hostA, idA]).toEqual([a!.sandboxId, a!.sandboxId]);
    expect([hostB, idB]).toEqual([b!.sandboxId, b!.sandboxId]);
    expect(Math.abs(Number(clockA) - Date.now() / 1000)).toBeLessThan(5);
    const [pa, pb] = await Promise.all([a!.runCode('(random.random(), numpy.random.rand())'), b!.runCode('(random.random(), numpy.random.rand())')]);
    expect(pa.value).not.toBe(pb.value);

    // The parent's token opens nothing in the child.
    const parentToken = defaultManager().get(parent.sandboxId).token;
    const forged = encodeHostFrame(MessageType.EXEC, 4_000_000_100, parentToken, new FieldWriter().str(Tag.SHELL, 'touch /tmp/forged').toBuffer());
    await defaultManager().get(a!.sandboxId).agent.sendRaw(forged);
    await new Promise((r) => setTimeout(r, 300));
    expect(await a!.files.exists('/tmp/forged')).toBe(false);
  });

  it('keeps the parent running, with its own state and identity', async () => {
    ok(await parent.fork(1));
    expect(parent.lastForkTimings!.parentPauseMs).toBeGreaterThan(0);
    const r = await parent.commands.run('hostname; cat /root/state.txt');
    expect(r.stdout).toBe(`${parent.sandboxId}\nbefore-fork`);
    expect(vmPids(parent.sandboxId)).toHaveLength(1);
  });

  it('forks children of children to depth 5, each level isolated', async () => {
    let current = parent;
    for (let depth = 1; depth <= 5; depth++) {
      const [kid] = ok(await current.fork(1));
      expect((await kid!.runCode(`secret_number += 1\nsecret_number`)).value).toBe(String(1234 + depth));
      await kid!.files.write(`/root/depth-${depth}`, String(depth));
      current = kid!;
    }
    const listing = (await current.commands.run('ls /root | grep depth- | sort')).stdout.trim().split('\n');
    expect(listing).toEqual(['depth-1', 'depth-2', 'depth-3', 'depth-4', 'depth-5']);
    expect(await parent.files.exists('/root/depth-1')).toBe(false);
  });

  it('uses warm slots from a pool when one is ready', async () => {
    await parent.prewarmForks(2);
    const kids = ok(await parent.fork(2));
    expect(parent.lastForkTimings).toMatchObject({ warmSlots: 2, coldSlots: 0 });
    expect((await kids[1]!.runCode('secret_number')).value).toBe('1234');
  });

  it('runs concurrent forks of one parent one after another, all succeeding', async () => {
    const [x, y] = await Promise.all([parent.fork(1), parent.fork(1)]);
    const kids = ok([...x!, ...y!]);
    for (const k of kids) expect((await k.runCode('secret_number')).value).toBe('1234');
    expect((await parent.commands.run('cat /root/state.txt')).stdout).toBe('before-fork');
  });

  it('refuses bad counts', async () => {
    await expect(parent.fork(0)).rejects.toMatchObject({ code: 'bad_request' });
    await expect(parent.fork(1001)).rejects.toMatchObject({ code: 'bad_request' });
  });
});
