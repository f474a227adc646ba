// Runs inside the runner VM with the built SDK: persistent snapshots on the
// vmm engine. Snapshot a running sandbox, start two sandboxes from it (state
// kept, each isolated and renamed, the interpreter kept and reseeded), a
// snapshot of a snapshot's child (lineage), the engine and integrity checks,
// removal with cascade, and nothing left behind. Prints "check ok NAME" /
// "check FAIL NAME: why", "timing" lines, then "done" (read by
// test/runner/vmm-sdk.test.ts).
import { existsSync, openSync, closeSync, readdirSync, statSync, writeSync } from 'node:fs';
import { check, checkNoVmmLeft, done, ms } from './checks.mjs';
import { join } from 'node:path';

const root = process.argv[2];
const { Sandbox } = await import(`${root}/dist/sdk/index.js`);
const { removeSnapshot, verifySnapshot } = await import(`${root}/dist/core/snapshots.js`);
const snapshots = join(process.env.CLADE_HOME, 'snapshots');

const errorCode = (p) => p.then(() => 'no error', (e) => e.code ?? String(e));

const sandboxes = [];
try {
  const sb = await Sandbox.create({ memoryMiB: 512, engine: 'vmm' });
  sandboxes.push(sb);
  await sb.files.write('/root/saved.txt', 'in-snapshot');
  await sb.runCode('import random\ncounter = 7\ncounter');

  let t0 = performance.now();
  const meta = await sb.snapshot({ tag: 'vmm-snap' });
  const st = sb.lastSnapshotTimings;
  console.log(`timing snapshot-request-to-committed ${ms(t0)} pause ${(st.pauseUs / 1000).toFixed(2)} writer ${(st.writeUs / 1000).toFixed(1)} files-written ${st.totalMs.toFixed(1)}`);
  check('snapshot-meta', meta.engine === 'vmm' && meta.parent === null && meta.memoryMiB === 512 && meta.files["memory.raw"].bytes === 512 << 20 && /^[0-9a-f]{64}$/.test(meta.files['state.bin'].sha256), JSON.stringify(meta.files));
  const dir = join(snapshots, 'vmm-snap');
  const mem = statSync(join(dir, 'memory.raw'));
  check('snapshot-files', (statSync(dir).mode & 0o777) === 0o700 && existsSync(join(dir, 'snapshot.json')) && !existsSync(join(dir, 'done')) && mem.blocks * 512 < mem.size, `${mem.blocks} blocks`);
  check('snapshot-info', sb.getInfo().snapshotTag === 'vmm-snap');
  await sb.files.write('/root/after.txt', 'parent-only');
  check('parent-keeps-running', (await sb.runCode('counter')).value === '7');

  t0 = performance.now();
  const [first] = await Sandbox.fromSnapshot('vmm-snap', { env: { MODE: 'restored' } });
  const started = ms(t0);
  const firstResult = first instanceof Sandbox ? await first.commands.run('echo $MODE') : undefined;
  console.log(`timing restore-to-first-command-result ${ms(t0)} (restore-to-ready ${started})`);
  check('restore-runs', firstResult?.stdout === 'restored\n', String(first) + JSON.stringify(firstResult));
  if (first instanceof Sandbox) sandboxes.push(first);

  t0 = performance.now();
  const more = await Sandbox.fromSnapshot('vmm-snap', { count: 2 });
  console.log(`timing restore2-to-ready ${ms(t0)}`);
  check('restore-count-2', more.length === 2 && more.every((k) => k instanceof Sandbox), more.map(String).join(', '));
  for (const k of more) if (k instanceof Sandbox) sandboxes.push(k);
  const kids = [first, ...more].filter((k) => k instanceof Sandbox);
  const seeds = [];
  for (const kid of kids) {
    check('state-kept-interpreter', (await kid.runCode('counter + 1')).value === '8');
    check('state-kept-files', (await kid.files.read('/root/saved.txt')) === 'in-snapshot');
    check('later-parent-writes-absent', !(await kid.files.exists('/root/after.txt')));
    check('restored-hostname', (await kid.commands.run('hostname')).stdout === `${kid.sandboxId}\n`);
    check('restored-info', kid.getInfo().engine === 'vmm' && kid.getInfo().snapshotTag === 'vmm-snap', JSON.stringify(kid.getInfo()));
    seeds.push((await kid.runCode('random.random()')).value);
  }
  check('restored-reseeded', new Set(seeds).size === seeds.length, JSON.stringify(seeds));
  await kids[0].files.write('/root/kid0.txt', 'x');
  check('restored-isolated', !(await kids[1].files.exists('/root/kid0.txt')) && !(await sb.files.exists('/root/kid0.txt')));
  verifySnapshot('vmm-snap');
  check('memory-file-unchanged', true);

  const [grandchild] = await kids[1].fork(1);
  check('restored-forks', grandchild instanceof Sandbox && (await grandchild.runCode('counter')).value === '7', String(grandchild));
  if (grandchild instanceof Sandbox) sandboxes.push(grandchild);

  await kids[1].runCode('counter = 9');
  const second = await kids[1].snapshot({ tag: 'vmm-snap-2' });
  check('lineage', second.parent === 'vmm-snap', JSON.stringify(second.parent));
  const [gen2] = await Sandbox.fromSnapshot('vmm-snap-2');
  check('second-generation', gen2 instanceof Sandbox && (await gen2.runCode('counter')).value === '9', String(gen2));
  if (gen2 instanceof Sandbox) sandboxes.push(gen2);

  check('other-engine-refused', (await errorCode(Sandbox.fromSnapshot('vmm-snap', { engine: 'qemu' }))) === 'bad_request');
  check('existing-tag-refused', (await errorCode(sb.snapshot({ tag: 'vmm-snap' }))) === 'conflict');
  const fd = openSync(join(snapshots, 'vmm-snap-2', 'memory.raw'), 'r+');
  writeSync(fd, Buffer.from('tampered'), 0, 8, 4096 * 100);
  closeSync(fd);
  check('tampered-refused', (await errorCode(Sandbox.fromSnapshot('vmm-snap-2'))) === 'integrity');
  check('rm-needs-cascade', (() => { try { removeSnapshot('vmm-snap'); return false; } catch (e) { return e.code === 'conflict'; } })());
  check('rm-cascade', removeSnapshot('vmm-snap', { cascade: true }).length === 2 && readdirSync(snapshots).length === 0, readdirSync(snapshots).join(' '));
  check('running-after-rm', (await kids[0].runCode('counter')).value === '7');
} catch (err) {
  check('no-exception', false, err && err.stack ? err.stack : String(err));
} finally {
  await Promise.all(sandboxes.map((s) => s.kill().catch(() => undefined)));
}
await checkNoVmmLeft();
const home = process.env.CLADE_HOME;
check('no-sandbox-dirs-left', !existsSync(join(home, 'sandboxes')) || readdirSync(join(home, 'sandboxes')).length === 0);
done();
