import { createHmac, randomBytes } from 'node:crypto';
import { openSync, closeSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, writeSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { homePaths } from '../../src/util/home.js';
import { listSnapshots, reapStaging, removeSnapshot, snapshotDir } from '../../src/core/snapshots.js';
import { CladeError, Sandbox } from '../../src/sdk/index.js';
import { okAndTracked, remains } from '../helpers/leaks.js';

const run = randomBytes(3).toString('hex');
const tag = (name: string) => `test-${run}-${name}`;
let warm: Sandbox;
const everyone: Sandbox[] = [];

const ok = (results: (Sandbox | CladeError)[]) => okAndTracked(results, everyone);

beforeAll(async () => {
  warm = await Sandbox.create();
  everyone.push(warm);
  await warm.runCode('import numpy\nwarm_value = numpy.arange(4).sum()');
  await warm.files.write('/root/note', 'snapshotted');
  await warm.snapshot({ tag: tag('base') });
});

afterAll(async () => {
  const ids = everyone.map((s) => s.sandboxId);
  await Promise.all(everyone.map((s) => s.kill()));
  expect(ids.flatMap((id) => remains(id))).toEqual([]);
  for (const m of listSnapshots()) if (m.tag.startsWith(`test-${run}-`)) rmSync(snapshotDir(m.tag), { recursive: true, force: true });
});

describe('persistent snapshots', () => {
  it('records files with their SHA-256 and the machine shape', () => {
    const meta = JSON.parse(readFileSync(join(snapshotDir(tag('base')), 'snapshot.json'), 'utf8'));
    expect(meta).toMatchObject({ format: 2, tag: tag('base'), parent: null, memoryMiB: 1024, cpus: 1, sandboxId: warm.sandboxId });
    expect(meta.files['memory.raw'].sha256).toMatch(/^[0-9a-f]{64}$/);
    expect(meta.files['state.bin'].bytes).toBeGreaterThan(1000);
  });

  it('starts copies that resume the snapshotted state, and the source keeps running', async () => {
    const kids = ok(await Sandbox.fromSnapshot(tag('base'), { count: 2 }));
    expect(kids).toHaveLength(2);
    for (const k of kids) {
      expect((await k.runCode('int(warm_value)')).value).toBe('6');
      expect(await k.files.read('/root/note')).toBe('snapshotted');
      expect((await k.commands.run('hostname')).stdout.trim()).toBe(k.sandboxId);
      expect(k.getInfo().snapshotTag).toBe(tag('base'));
    }
    expect((await warm.runCode('int(warm_value) * 2')).value).toBe('12');
  });

  it('records the parent tag and refuses deleting a parent without cascade', async () => {
    const [child] = ok(await Sandbox.fromSnapshot(tag('base')));
    await child!.runCode('warm_value = 100');
    const meta = await child!.snapshot({ tag: tag('child') });
    expect(meta.parent).toBe(tag('base'));
    expect(() => removeSnapshot(tag('base'))).toThrow(/descendants/);
    const [grandchild] = ok(await Sandbox.fromSnapshot(tag('child')));
    expect((await grandchild!.runCode('warm_value')).value).toBe('100');
  });

  it('refuses a snapshot whose files do not match their hashes', async () => {
    const [src] = ok(await Sandbox.fromSnapshot(tag('base')));
    await src!.snapshot({ tag: tag('tampered') });
    const state = join(snapshotDir(tag('tampered')), 'state.bin');
    const fd = openSync(state, 'r+');
    writeSync(fd, Buffer.from([0xff]), 0, 1, 200);
    closeSync(fd);
    await expect(Sandbox.fromSnapshot(tag('tampered'))).rejects.toMatchObject({ code: 'integrity', message: expect.stringMatching(/state\.bin does not match/) });
  });

  it('refuses a snapshot.json that was edited, or signed with another key, or is not valid', async () => {
    const [src] = ok(await Sandbox.fromSnapshot(tag('base')));
    await src!.snapshot({ tag: tag('forged') });
    const file = join(snapshotDir(tag('forged')), 'snapshot.json');
    const original = readFileSync(file, 'utf8');
    const meta = JSON.parse(original) as Record<string, unknown> & { memoryMiB: number; hmac: string };
    try {
      // Edited, signature kept: the HMAC no longer matches.
      writeFileSync(file, JSON.stringify({ ...meta, memoryMiB: 2048 }));
      await expect(Sandbox.fromSnapshot(tag('forged'))).rejects.toMatchObject({ code: 'integrity', message: expect.stringMatching(/not signed by this clade home/) });
      // Edited and signed again by someone without this home's key.
      const { hmac: _h, ...rest } = meta;
      const forged = createHmac('sha256', randomBytes(32)).update(JSON.stringify(rest)).digest('hex');
      writeFileSync(file, JSON.stringify({ ...meta, memoryMiB: 2048, hmac: forged }));
      await expect(Sandbox.fromSnapshot(tag('forged'))).rejects.toMatchObject({ code: 'integrity' });
      // Fields that are not what clade writes are refused before anything is checked or used.
      writeFileSync(file, JSON.stringify({ ...meta, image: '../../etc' }));
      await expect(Sandbox.fromSnapshot(tag('forged'))).rejects.toMatchObject({ code: 'integrity', message: expect.stringMatching(/invalid snapshot\.json.*image/) });
      expect(listSnapshots().map((m) => m.tag)).not.toContain(tag('forged'));
    } finally {
      writeFileSync(file, original);
    }
    ok(await Sandbox.fromSnapshot(tag('forged')));
  });

  it('reaps half-written snapshots of processes that are gone', () => {
    const stray = join(homePaths.snapshots(), '.staging', `${tag('stray')}.999999999.0a0b0c0d`);
    mkdirSync(stray, { recursive: true });
    expect(reapStaging()).toBeGreaterThanOrEqual(1);
    expect(existsSync(stray)).toBe(false);
  });

  it('refuses a snapshot whose parent is missing', async () => {
    const [src] = ok(await Sandbox.fromSnapshot(tag('child')));
    await src!.snapshot({ tag: tag('orphan') });
    const childDir = snapshotDir(tag('child'));
    renameSync(childDir, `${childDir}.away`);
    try {
      await expect(Sandbox.fromSnapshot(tag('orphan'))).rejects.toMatchObject({ code: 'integrity', message: expect.stringMatching(/depends on snapshot .*missing/) });
    } finally {
      renameSync(`${childDir}.away`, childDir);
    }
  });

  it('deletes a lineage with cascade', () => {
    writeFileSync(join(snapshotDir(tag('base')), 'keep'), '');
    const removed = removeSnapshot(tag('base'), { cascade: true });
    expect(removed).toEqual(expect.arrayContaining([tag('base'), tag('child'), tag('orphan'), tag('tampered'), tag('forged')]));
    expect(listSnapshots().filter((m) => m.tag.startsWith(`test-${run}-`))).toEqual([]);
  });

  it('rejects bad tags, duplicates and unknown snapshots', async () => {
    await expect(warm.snapshot({ tag: '../x' })).rejects.toMatchObject({ code: 'bad_request' });
    await expect(Sandbox.fromSnapshot('no-such-snapshot')).rejects.toMatchObject({ code: 'not_found' });
    await warm.snapshot({ tag: tag('dup') });
    await expect(warm.snapshot({ tag: tag('dup') })).rejects.toMatchObject({ code: 'conflict' });
  });
});
