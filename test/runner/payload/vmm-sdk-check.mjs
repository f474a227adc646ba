// Runs inside the runner VM (whose /dev/kvm runs Linux guests) with the built
// SDK: the same calls as the embedded tests, on the vmm engine. Prints one
// "check ok NAME" or "check FAIL NAME: why" line per check, then "timing"
// lines, then "done". The host test (test/runner/vmm-sdk.test.ts) reads them.
import { check, checkNoVmmLeft, done, ms } from './checks.mjs';

const root = process.argv[2];
const { Sandbox } = await import(`${root}/dist/sdk/index.js`);

const sandboxes = [];
try {
  let t0 = performance.now();
  const sb = await Sandbox.create({ memoryMiB: 512, env: { MODE: 'vmm' } });
  sandboxes.push(sb);
  console.log(`timing create-to-ready ${ms(t0)}`);
  check('engine-chosen-automatically', sb.getInfo().engine === 'vmm', JSON.stringify(sb.getInfo()));

  const r = await sb.commands.run('echo $MODE; uname -r');
  check('exec', r.exitCode === 0 && r.stdout.startsWith('vmm\n6.12'), JSON.stringify(r));
  const chunks = [];
  await sb.commands.run('echo a; sleep 0.5; echo b', { onStdout: (d) => chunks.push(d) });
  check('streamed-output', chunks.join('') === 'a\nb\n', JSON.stringify(chunks));
  await sb.files.write('/root/before.txt', 'from-parent');
  const code = await sb.runCode('import random\ncounter = 41\ncounter');
  check('runCode', code.value === '41', JSON.stringify(code));

  t0 = performance.now();
  const kids = await sb.fork(2);
  console.log(`timing fork2-to-children-ready ${ms(t0)} pause ${sb.lastForkTimings?.parentPauseMs?.toFixed(2)}`);
  check('fork-children', kids.length === 2 && kids.every((k) => k instanceof Sandbox), kids.map(String).join(', '));
  for (const k of kids) if (k instanceof Sandbox) sandboxes.push(k);
  await sb.files.write('/root/after.txt', 'parent-only');
  const seeds = [];
  for (const kid of kids) {
    t0 = performance.now();
    const v = await kid.runCode('counter + 1');
    console.log(`timing child-first-runCode ${ms(t0)}`);
    check('child-keeps-interpreter-state', v.value === '42', JSON.stringify(v));
    check('child-sees-parent-files', (await kid.files.read('/root/before.txt')) === 'from-parent');
    check('child-isolated-from-parent', !(await kid.files.exists('/root/after.txt')));
    check('child-hostname', (await kid.commands.run('hostname')).stdout === `${kid.sandboxId}\n`);
    check('child-env', (await kid.commands.run('echo $MODE $CLADE_SANDBOX_ID')).stdout === `vmm ${kid.sandboxId}\n`);
    check('child-info', kid.getInfo().parentId === sb.sandboxId && kid.getInfo().engine === 'vmm');
    seeds.push((await kid.runCode('random.random()')).value);
  }
  check('children-reseeded', seeds[0] !== seeds[1], JSON.stringify(seeds));
  await kids[0].files.write('/root/kid0.txt', 'x');
  check('siblings-isolated', !(await kids[1].files.exists('/root/kid0.txt')));

  // Nested: a fork of a fork of a fork.
  let level = kids[0];
  for (let depth = 2; depth <= 4; depth++) {
    t0 = performance.now();
    const [next] = await level.fork(1);
    console.log(`timing depth${depth}-fork-to-ready ${ms(t0)} pause ${level.lastForkTimings?.parentPauseMs?.toFixed(2)}`);
    if (!(next instanceof Sandbox)) {
      check(`nested-depth-${depth}`, false, String(next));
      break;
    }
    sandboxes.push(next);
    await next.runCode(`counter = ${depth}`);
    check(`nested-depth-${depth}`, (await next.runCode('counter')).value === String(depth));
    level = next;
  }
  check('parent-unaffected', (await sb.runCode('counter')).value === '41');

  const warm = await sb.prewarmForks(2).then(() => 'ok', (e) => e.code);
  check('prewarmForks-is-a-no-op', warm === 'ok', warm);

  await kids[1].kill();
  check('killed-child-gone', !(await kids[1].isRunning()));
  check('others-still-running', (await kids[0].commands.run('true')).exitCode === 0);
} catch (err) {
  check('no-exception', false, err && err.stack ? err.stack : String(err));
} finally {
  await Promise.all(sandboxes.map((s) => s.kill().catch(() => undefined)));
}
await checkNoVmmLeft();
done();
