// Runs inside the runner VM with the built SDK: a disk image (its root
// filesystem a read-only erofs disk, carried in as the runner's default
// image) on the vmm engine. The sandbox reads a file that only the disk
// holds, Python imports numpy from it, the guest sees the disk read-only and
// cannot write it; two forks share the disk and a child's writes (to the RAM
// overlay) stay invisible to its sibling and its parent; a snapshot records
// the disk and a sandbox started from it reads the disk again, while a start
// with the disk gone or of another size is refused. Prints
// "check ok NAME" / "check FAIL NAME: why", "timing" lines, then "done"
// (read by test/runner/vmm-disk.test.ts).
import { copyFileSync, renameSync, truncateSync } from 'node:fs';
import { check, checkNoVmmLeft, done, ms } from './checks.mjs';

const root = process.argv[2];
const { Sandbox } = await import(`${root}/dist/sdk/index.js`);
const { resolveImage } = await import(`${root}/dist/images/store.js`);
const GREETING = 'read from the erofs root disk\n';
const FILE = '/opt/disk-check/greeting.txt';
// Cold reads: the guest's page cache is dropped first, so the bytes come from the disk device.
const readCold = `echo 3 > /proc/sys/vm/drop_caches; cat ${FILE}`;

const sandboxes = [];
try {
  const image = resolveImage('default');
  check('image-is-disk', Boolean(image.disk), JSON.stringify(image.manifest.rootfs));
  let t0 = performance.now();
  const sb = await Sandbox.create({ memoryMiB: 256, engine: 'vmm' });
  sandboxes.push(sb);
  console.log(`timing create-to-ready ${ms(t0)}`);
  check('engine-vmm', sb.getInfo().engine === 'vmm', JSON.stringify(sb.getInfo()));

  const seen = await sb.commands.run('cat /sys/block/vda/ro /sys/block/vda/size; grep -c "^overlay / overlay" /proc/mounts');
  const sectors = Math.floor(image.manifest.rootfs.bytes / 512);
  check('disk-read-only-whole', seen.stdout === `1\n${sectors}\n1\n`, JSON.stringify(seen));
  const greeting = await sb.commands.run(readCold);
  check('reads-erofs-file', greeting.exitCode === 0 && greeting.stdout === GREETING, JSON.stringify(greeting));
  t0 = performance.now();
  const py = await sb.runCode('import numpy\nint(numpy.arange(10).sum())');
  console.log(`timing import-numpy-from-disk ${ms(t0)}`);
  check('python-from-disk', py.value === '45', JSON.stringify(py));

  t0 = performance.now();
  const kids = await sb.fork(2);
  console.log(`timing fork2-to-children-ready ${ms(t0)}`);
  check('fork-children', kids.length === 2 && kids.every((k) => k instanceof Sandbox), kids.map(String).join(', '));
  for (const k of kids) if (k instanceof Sandbox) sandboxes.push(k);
  const [a, b] = kids;
  const wrote = await a.commands.run(`echo changed-by-a > ${FILE} && echo new > /opt/disk-check/only-a.txt && cat ${FILE}`);
  check('child-writes-over-disk', wrote.exitCode === 0 && wrote.stdout === 'changed-by-a\n', JSON.stringify(wrote));
  const sibling = await b.commands.run(`${readCold}; ls /opt/disk-check`);
  check('sibling-sees-disk-unchanged', sibling.stdout === `${GREETING}greeting.txt\n`, JSON.stringify(sibling));
  const parent = await sb.commands.run(`${readCold}; ls /opt/disk-check`);
  check('parent-sees-disk-unchanged', parent.stdout === `${GREETING}greeting.txt\n`, JSON.stringify(parent));
  const raw = await a.commands.run('dd if=/dev/zero of=/dev/vda bs=512 count=8 conv=fsync 2>/dev/null; echo rc=$?');
  check('raw-disk-write-refused', /^rc=[1-9]/m.test(raw.stdout), JSON.stringify(raw));
  const after = await b.commands.run(readCold);
  check('disk-intact-after-write-attempt', after.stdout === GREETING, JSON.stringify(after));

  t0 = performance.now();
  await sb.snapshot({ tag: 'vmm-disk-snap' });
  const [restored] = await Sandbox.fromSnapshot('vmm-disk-snap');
  console.log(`timing snapshot-and-restore ${ms(t0)}`);
  check('restore-runs', restored instanceof Sandbox, String(restored));
  if (restored instanceof Sandbox) {
    sandboxes.push(restored);
    const r = await restored.commands.run(`${readCold}; ls /opt/disk-check`);
    check('restored-reads-disk', r.stdout === `${GREETING}greeting.txt\n`, JSON.stringify(r));
  }
  // The snapshot names its disk by path and size: clade-vmm refuses a start when the file is gone or another one.
  const startOutcome = async () => {
    const [vm] = await Sandbox.fromSnapshot('vmm-disk-snap').catch((e) => [e]);
    if (vm instanceof Sandbox) return sandboxes.push(vm), 'started';
    return `${vm?.code}: ${vm?.message}`;
  };
  renameSync(image.disk, `${image.disk}.kept`);
  try {
    const gone = await startOutcome();
    check('vmm-refuses-missing-disk', /^integrity: .*disk is gone/s.test(gone), gone);
    copyFileSync(`${image.disk}.kept`, image.disk);
    truncateSync(image.disk, image.manifest.rootfs.bytes - 4096);
    const other = await startOutcome();
    check('vmm-refuses-other-disk', /^integrity: .*another file/s.test(other), other);
  } finally {
    renameSync(`${image.disk}.kept`, image.disk);
  }
} catch (e) {
  check('no-exception', false, e?.stack ?? String(e));
} finally {
  await Promise.all(sandboxes.map((s) => s.kill().catch(() => undefined)));
  await checkNoVmmLeft();
  done();
}
