import { CladeError } from '../util/errors.js';
import { Sandbox } from '../sdk/sandbox.js';
import { emit } from './output.js';

/** The quick-start demo: boot a sandbox, show commands, streaming and files, then warm it up and fork it. */
export async function runDemo(json: boolean): Promise<void> {
  const say = (s: string) => !json && process.stdout.write(s + '\n');
  const t0 = performance.now();
  say('booting a sandbox (Debian kernel, python3 + numpy, clade agent)...');
  await using sb = await Sandbox.create();
  const info = sb.getInfo();
  const bootMs = performance.now() - t0;
  say(`sandbox ${sb.sandboxId} ready in ${bootMs.toFixed(0)} ms (accelerator: ${info.accelerator})`);

  const uname = await sb.commands.run('uname -sr');
  say(`$ uname -sr\n${uname.stdout.trim()}`);

  say('$ for i in 1 2 3; do echo tick $i; sleep 0.3; done   (streamed as it runs)');
  await sb.commands.run('for i in 1 2 3; do echo tick $i; sleep 0.3; done', { onStdout: (d) => !json && process.stdout.write('  ' + d) });

  const n0 = performance.now();
  const numpy = await sb.commands.run(['python3', '-c', 'import numpy as np; print(np.linalg.eigvalsh(np.array([[2.0, 1.0], [1.0, 2.0]])).tolist())']);
  const numpyMs = performance.now() - n0;
  say(`$ python3 -c 'import numpy ...eigvalsh...'\n${numpy.stdout.trim()}   (${numpyMs.toFixed(0)} ms, cold import)`);

  await sb.files.write('/root/hello.txt', 'written from the host\n');
  const back = await sb.commands.run('cat /root/hello.txt && ls -l /root');
  say(`files.write + cat:\n${back.stdout.trim()}`);

  const failing = await sb.commands.run('exit 3');
  say(`a failing command is a result, not an error: exitCode=${failing.exitCode}`);
  say('\nwarming up: `import numpy` in the persistent interpreter, then forking 3 children...');
  await sb.runCode('import numpy as np, random\nweights = np.arange(4.0)');
  const f0 = performance.now();
  const kids = await sb.fork(3);
  const forkMs = performance.now() - f0;
  say(`forked 3 children in ${forkMs.toFixed(0)} ms (parent paused ${sb.lastForkTimings!.parentPauseMs.toFixed(1)} ms)`);
  const children: { sandboxId: string; firstResultMs: number; value?: string }[] = [];
  const failed: { code: string; message: string }[] = [];
  for (const kid of kids) {
    if (kid instanceof CladeError) {
      failed.push({ code: kid.code, message: kid.message });
      process.stderr.write(`clade demo: a child failed: ${kid.message}\n`);
      continue;
    }
    await using child = kid;
    const c0 = performance.now();
    const r = await child.runCode('(weights.sum(), random.randint(0, 999))');
    const host = await child.commands.run('hostname');
    const ms = performance.now() - c0;
    children.push({ sandboxId: child.sandboxId, firstResultMs: ms, ...(r.value ? { value: r.value } : {}) });
    say(`  ${host.stdout.trim()}: (weights.sum(), random.randint) = ${r.value}   numpy already imported, own RNG (${ms.toFixed(0)} ms)`);
  }
  say(`killing ${sb.sandboxId} and its children; nothing is left behind.`);
  emit(json, { sandboxId: sb.sandboxId, accelerator: info.accelerator, bootMs, numpyMs, numpy: numpy.stdout.trim(), uname: uname.stdout.trim(), forkMs, children, failed }, () => '');
  if (failed.length) process.exitCode = 1; // the demo shows a fork of 3: fewer is a failure, not a quieter success
}
