// Runs inside the runner VM with the built SDK: persistent snapshots on the
// vmm engine. Snapshot a running sandbox, start two sandboxes from it (state
// kept, each isolated and renamed, the interpreter kept and reseeded), a
// snapshot of a snapshot's child (lineage), the engine and integrity checks
// (the host's, and clade-vmm's own on edited files it is handed directly:
// damaged, truncated, forged counts and device registers), removal with
// cascade, and nothing left behind. Prints "check ok NAME" /
// "check FAIL NAME: why", "timing" lines, then "done" (read by
// test/runner/vmm-sdk.test.ts).
import { copyFileSync, existsSync, mkdirSync, openSync, closeSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync, writeSync } from 'node:fs';
import { check, checkNoVmmLeft, done, ms } from './checks.mjs';
import { join } from 'node:path';

const root = process.argv[2];
const { Sandbox } = await import(`${root}/dist/sdk/index.js`);
const { removeSnapshot, verifySnapshot } = await import(`${root}/dist/core/snapshots.js`);
const { VmmEngine } = await import(`${root}/dist/engines/vmm/vmm-engine.js`);
const { resolveImage } = await import(`${root}/dist/images/store.js`);

/** state.bin's checksum (FNV-1a 64 over the file, the field itself as zeros), recomputed as a forger would. */
function forgeChecksum(buf) {
  buf.fill(0, 96, 104);
  let h = 0xcbf29ce484222325n;
  for (const b of buf) h = ((h ^ BigInt(b)) * 0x100000001b3n) & 0xffffffffffffffffn;
  buf.writeBigUInt64LE(h, 96);
  return buf;
}

/**
 * Starts clade-vmm straight from an edited copy of a snapshot (past the host's SHA-256 check, as if
 * the files had been swapped after it): clade-vmm itself must refuse, and the engine say 'integrity'.
 */
async function startEdited(dir, name, edit) {
  const copy = join(process.env.CLADE_HOME, 'tmp', `edited-${name}`);
  const runDir = join(process.env.CLADE_HOME, 'tmp', `edited-${name}-run`);
  mkdirSync(copy, { recursive: true });
  mkdirSync(runDir, { recursive: true });
  copyFileSync(join(dir, 'memory.raw'), join(copy, 'memory.raw'));
  writeFileSync(join(copy, 'state.bin'), edit(readFileSync(join(dir, 'state.bin'))));
  const memory = openSync(join(copy, 'memory.raw'), 'r');
  const state = openSync(join(copy, 'state.bin'), 'r');
  try {
    const source = { dir: copy, tag: `edited-${name}`, shape: { image: resolveImage('default'), memoryMiB: 512, cpus: 1 }, memory: { path: join(copy, 'memory.raw'), fd: memory }, state: { fd: state, bytes: Buffer.alloc(0) } };
    const [vm] = await new VmmEngine().restore(source, 1, () => ({ id: `edited-${name}`, runDir }));
    if (vm instanceof Error) return `${vm.code}: ${vm.message}`;
    await vm.kill();
    return 'started';
  } catch (e) {
    return `${e.code}: ${e.message}`;
  } finally {
    closeSync(memory);
    closeSync(state);
    rmSync(copy, { recursive: true, force: true });
    rmSync(runDir, { recursive: true, force: true });
  }
}
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
  console.log(`timing snapshot-request-to-committed ${ms(t0)} pause ${st.pauseMs.toFixed(2)} writer ${(st.writeUs / 1000).toFixed(1)} files-written ${st.totalMs.toFixed(1)}`);
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
  await verifySnapshot('vmm-snap');
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

  // clade-vmm's own refusals, reached past the host's hash check.
  const snapDir = join(snapshots, 'vmm-snap');
  const boardAt = (buf) => { // the device section's payload: walk the section table
    let off = 112;
    for (let i = 0; i < buf.readUInt32LE(20); i++) {
      const id = buf.readUInt32LE(off), bytes = Number(buf.readBigUInt64LE(off + 8));
      if (id === 7) return off + 16;
      off += 16 + Math.ceil(bytes / 8) * 8;
    }
    return -1;
  };
  const edits = {
    'changed-byte': (b) => { b[b.length - 100] ^= 1; return b; },
    truncated: (b) => b.subarray(0, b.length - 40),
    'inflated-msr-count': (b) => { b.writeUInt32LE(1 << 20, 128); return forgeChecksum(b); },
    'section-past-end': (b) => { b.writeBigUInt64LE(1n << 40n, 120); return forgeChecksum(b); },
    // In the devices: the PCI config address register (first u32 of the device state) with reserved bits set.
    'device-register': (b) => { b.writeUInt32LE(0xffffffff, boardAt(b)); return forgeChecksum(b); },
    // A queue address where a host pointer used to be in the old format: far outside guest RAM.
    'queue-outside-ram': (b) => { const q0 = boardAt(b) + 264 + 288; b.writeBigUInt64LE(0x7fff00000000n, q0); b[q0 + 28] = 1; return forgeChecksum(b); },
  };
  for (const [name, edit] of Object.entries(edits)) {
    const outcome = await startEdited(snapDir, name, edit);
    check(`vmm-refuses-${name}`, outcome.startsWith('integrity: clade-vmm refused the snapshot'), outcome);
  }
  check('vmm-starts-unedited-copy', (await startEdited(snapDir, 'none', (b) => b)) === 'started');
  check('rm-needs-cascade', (() => { try { removeSnapshot('vmm-snap'); return false; } catch (e) { return e.code === 'conflict'; } })());
  const tags = () => readdirSync(snapshots).filter((e) => !e.startsWith('.')); // .staging is the writers' scratch area
  check('rm-cascade', removeSnapshot('vmm-snap', { cascade: true }).length === 2 && tags().length === 0, tags().join(' '));
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
