import { Command, Option } from 'commander';
import { benchBoot } from '../bench/boot.js';
import { buildImage } from '../images/build.js';
import { listImages, removeImage } from '../images/store.js';
import { Sandbox } from '../sdk/sandbox.js';
import { runDemo } from './demo.js';
import { runChecks } from './doctor.js';
import { emit, mib, progressPrinter, reportError, table } from './output.js';

const VERSION = '0.1.0';

type JsonOpt = { json?: boolean };

/** Wraps an action so errors print cleanly (and as JSON with --json) and set the exit code. */
function action<A extends unknown[]>(fn: (...args: A) => Promise<number | void>) {
  return async (...args: A) => {
    const cmd = args[args.length - 1] as Command;
    const json = Boolean(cmd.optsWithGlobals<JsonOpt>().json);
    try {
      const code = await fn(...args);
      process.exitCode = code ?? 0;
    } catch (err) {
      process.exitCode = reportError(err, json);
    }
  };
}

export function buildProgram(): Command {
  const program = new Command('clade')
    .description('Fork running Linux microVMs copy-on-write: boot once, warm up, branch into N warm sandboxes.')
    .version(VERSION)
    .option('--json', 'print machine-readable JSON on stdout');

  program
    .command('doctor')
    .description('check that this host can run sandboxes, and how fast')
    .action(
      action(async (_opts: unknown, cmd: Command) => {
        const json = Boolean(cmd.optsWithGlobals<JsonOpt>().json);
        const checks = await runChecks();
        const failed = checks.some((c) => c.status === 'fail');
        emit(json, { ok: !failed, checks }, () =>
          checks.map((c) => `${c.status.toUpperCase().padEnd(4)}  ${c.name.padEnd(7)} ${c.detail}${c.fix && c.status !== 'pass' ? `\n              fix: ${c.fix}` : ''}`).join('\n'),
        );
        return failed ? 1 : 0;
      }),
    );

  const image = program.command('image').description('build and manage guest images');
  image
    .command('build')
    .description('build the default image from Debian packages (cached by content digest)')
    .option('--name <name>', 'name to give the image', 'default')
    .option('--force', 'rebuild even if an identical image exists')
    .action(
      action(async (opts: { name: string; force?: boolean }, cmd: Command) => {
        const json = Boolean(cmd.optsWithGlobals<JsonOpt>().json);
        const r = await buildImage({ name: opts.name, force: Boolean(opts.force), progress: progressPrinter(json) });
        emit(json, { ...r.manifest, cached: r.cached, seconds: r.seconds }, () =>
          `${r.cached ? 'cached' : 'built'} image ${r.manifest.digest.slice(0, 12)} "${opts.name}" in ${r.seconds.toFixed(1)} s: kernel ${r.manifest.kernel.release}, initramfs ${mib(r.manifest.initramfsBytes)}, ${r.manifest.packages.length} packages`,
        );
      }),
    );
  image
    .command('ls')
    .description('list images with size and digest')
    .action(
      action(async (_opts: unknown, cmd: Command) => {
        const json = Boolean(cmd.optsWithGlobals<JsonOpt>().json);
        const images = listImages();
        emit(json, images, () =>
          images.length === 0
            ? 'no images; run `clade image build`'
            : table([['DIGEST', 'NAMES', 'SIZE', 'KERNEL', 'CREATED'], ...images.map((i) => [i.digest.slice(0, 12), i.names.join(',') || '-', mib(i.sizeBytes), i.kernel, i.createdAt])]),
        );
      }),
    );
  image
    .command('rm <image>')
    .description('remove an image (by name or digest prefix)')
    .action(
      action(async (ref: string, _opts: unknown, cmd: Command) => {
        const json = Boolean(cmd.optsWithGlobals<JsonOpt>().json);
        const r = removeImage(ref);
        emit(json, { removed: r.digest, names: r.names }, () => `removed image ${r.digest.slice(0, 12)}${r.names.length ? ` (${r.names.join(', ')})` : ''}`);
      }),
    );

  program
    .command('run')
    .description('boot a sandbox, run one command, print its output, exit with its code, clean up')
    .argument('<command...>', 'the command and its arguments (put them after --)')
    .option('--image <image>', 'image name or digest', 'default')
    .option('--memory <mib>', 'guest memory in MiB', (v) => parseInt(v, 10))
    .option('--cpus <n>', 'virtual CPUs', (v) => parseInt(v, 10))
    .option('--timeout <ms>', 'kill the command after this many ms (0 = never)', (v) => parseInt(v, 10), 0)
    .addOption(new Option('-e, --env <KEY=VALUE...>', 'environment variables').default([]))
    .action(
      action(async (argv: string[], opts: { image: string; memory?: number; cpus?: number; timeout: number; env: string[] }, cmd: Command) => {
        const json = Boolean(cmd.optsWithGlobals<JsonOpt>().json);
        const env = Object.fromEntries(opts.env.map((kv) => [kv.slice(0, kv.indexOf('=')), kv.slice(kv.indexOf('=') + 1)]));
        await using sb = await Sandbox.create({ image: opts.image, ...(opts.memory ? { memoryMiB: opts.memory } : {}), ...(opts.cpus ? { cpus: opts.cpus } : {}), env });
        const command = argv.length === 1 ? argv[0]! : argv;
        const r = await sb.commands.run(command, {
          timeoutMs: opts.timeout,
          ...(json ? {} : { onStdout: (d: string) => process.stdout.write(d), onStderr: (d: string) => process.stderr.write(d) }),
        });
        if (json) emit(true, { sandboxId: sb.sandboxId, ...r }, () => '');
        return r.exitCode;
      }),
    );

  program
    .command('demo')
    .description('boot a sandbox and show what clade does')
    .action(
      action(async (_opts: unknown, cmd: Command) => {
        await runDemo(Boolean(cmd.optsWithGlobals<JsonOpt>().json));
      }),
    );

  const bench = program.command('bench').description('benchmarks (results printed as a table and written as JSON)');
  bench
    .command('boot')
    .description('cold boot to the first command result inside the guest')
    .option('-n, --runs <n>', 'repetitions', (v) => parseInt(v, 10), 5)
    .action(
      action(async (opts: { runs: number }, cmd: Command) => {
        const json = Boolean(cmd.optsWithGlobals<JsonOpt>().json);
        const r = await benchBoot(opts.runs, (i, ms) => !json && process.stderr.write(`run ${i + 1}/${opts.runs}: ${ms.toFixed(0)} ms\n`));
        const row = (name: string, s: { median: number; p90: number }) => [name, s.median.toFixed(0), s.p90.toFixed(0)];
        emit(json, r, () =>
          [
            `cold boot, ${r.runs} runs, accelerator ${r.accelerator}`,
            table([['METRIC (ms)', 'MEDIAN', 'P90'], row('request -> first command result', r.toFirstResultMs), row('request -> agent ready', r.toReadyMs), row('cold `import numpy` in a fresh guest', r.coldNumpyImportMs)]),
            `JSON: ${r.jsonPath}`,
          ].join('\n'),
        );
      }),
    );
  return program;
}

export async function main(argv: string[]): Promise<void> {
  await buildProgram().parseAsync(argv);
}

if (import.meta.url === `file://${process.argv[1]}`) {
  void main(process.argv);
}
