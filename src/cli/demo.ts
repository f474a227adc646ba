import { Sandbox } from '../sdk/sandbox.js';
import { emit } from './output.js';

/** The quick-start demo: boot a sandbox and show commands, streaming and files. */
export async function runDemo(json: boolean): Promise<void> {
  const say = (s: string) => !json && process.stdout.write(s + '\n');
  const t0 = performance.now();
  say('booting a sandbox (Debian kernel, python3 + numpy, clade agent)...');
  await using sb = await Sandbox.create();
  const info = sb.getInfo();
  const bootMs = performance.now() - t0;
  say(`sandbox ${sb.sandboxId} ready in ${bootMs.toFixed(0)} ms (accelerator: ${info.accelerator})`);

  const uname = await sb.commands.run('uname -sr && cat /proc/cpuinfo | grep -c ^processor');
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
  say(`killing ${sb.sandboxId}; nothing is left behind.`);
  emit(json, { sandboxId: sb.sandboxId, accelerator: info.accelerator, bootMs, numpyMs, numpy: numpy.stdout.trim(), uname: uname.stdout.trim() }, () => '');
}
