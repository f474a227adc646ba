import { Command, Option } from 'commander';
import { benchBoot } from '../bench/boot.js';
import { benchFork } from '../bench/fork.js';
import { benchNetwork } from '../bench/network.js';
import { benchLoad, type LoadMode } from '../bench/load.js';
import { benchVmm, vmmBenchRows, type EngineUnderTest } from '../bench/vmm.js';
import { buildImage } from '../images/build.js';
import { listImages, removeImage, type ImageSpec } from '../images/store.js';
import { type ImageRecipe, parseEnvPairs, readRecipeFile } from '../images/recipe.js';
import { CladeError } from '../util/errors.js';
import type { NetworkOptions } from '../core/manager.js';
import { listSnapshots, removeSnapshot, verifySnapshot } from '../core/snapshots.js';
import { Sandbox } from '../sdk/sandbox.js';
import { Template, type TemplateSpec } from '../sdk/templates.js';
import { runDemo } from './demo.js';
import { runChecks } from './doctor.js';
import { runServe, serveCommand } from './serve.js';
import { runMcpStdio } from '../mcp/stdio.js';
import { findDaemon, forkAction, psAction, runViaDaemon, snapshotSandboxAction } from './daemon-commands.js';
import { emit, mib, progressPrinter, reportError, table } from './output.js';
import { registerRunnerCommands } from './runner.js';

const VERSION = '0.1.0';

/**
 * Wraps an action: it gets the global --json flag first, then commander's
 * arguments; errors print cleanly (as JSON with --json) and set the exit code.
 */
function action<A extends unknown[]>(fn: (json: boolean, ...args: A) => Promise<number | void>) {
  return async (...args: unknown[]) => {
    const cmd = args[args.length - 1] as Command;
    const json = Boolean(cmd.optsWithGlobals<{ json?: boolean }>().json);
    try {
      const code = await fn(json, ...(args as A));
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
      action(async (json: boolean) => {
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
    .description('build an image from Debian packages: clade\'s base plus your packages, files and env (cached by content digest)')
    .option('--name <name>', 'name to give the image (default: the recipe\'s, else "default")')
    .option('--recipe <file>', 'a JSON or YAML recipe: { name, packages, copy, env, rootfs }; flags add to it')
    .addOption(new Option('--packages <list...>', 'extra Debian packages, comma-separated or repeated (their dependencies come along)').default([]))
    .addOption(new Option('--copy <HOSTPATH:GUESTPATH...>', 'copy a host file or directory into the image (repeatable)').default([]))
    .addOption(new Option('-e, --env <KEY=VALUE...>', 'environment variables every command in the image gets').default([]))
    .addOption(new Option('--rootfs <kind>', 'initramfs (all in RAM), disk (read-only erofs disk with a RAM overlay) or auto (disk above 256 MiB)').choices(['initramfs', 'disk', 'auto']))
    .option('--no-recommends', 'install only dependencies, not what your packages recommend (gcc recommends libc6-dev)')
    .option('--force', 'rebuild even if an identical image exists')
    .action(
      action(async (json: boolean, opts: { name?: string; recipe?: string; packages: string[]; copy: string[]; env: string[]; rootfs?: 'initramfs' | 'disk' | 'auto'; recommends: boolean; force?: boolean }) => {
        const base = opts.recipe ? readRecipeFile(opts.recipe) : {};
        const recipe: ImageRecipe = {
          ...base,
          ...(opts.name ? { name: opts.name } : {}),
          packages: [...(base.packages ?? []), ...opts.packages.flatMap((p) => p.split(','))],
          copy: [...(base.copy ?? []), ...opts.copy],
          env: { ...(base.env ?? {}), ...parseEnvPairs(opts.env) },
          ...(opts.rootfs ? { rootfs: opts.rootfs } : {}),
          ...(opts.recommends ? {} : { recommends: false }),
        };
        const r = await buildImage({ ...recipe, force: Boolean(opts.force), progress: progressPrinter(json) });
        const disk = r.manifest.rootfs?.kind === 'disk' ? `, disk ${mib(r.manifest.rootfs.bytes)}` : '';
        emit(json, { ...r.manifest, cached: r.cached, seconds: r.seconds }, () =>
          `${r.cached ? 'cached' : 'built'} image ${r.manifest.digest.slice(0, 12)} "${r.manifest.name}" in ${r.seconds.toFixed(1)} s: kernel ${r.manifest.kernel.release}, initramfs ${mib(r.manifest.initramfsBytes)}${disk}, ${r.manifest.packages.length} packages`,
        );
      }),
    );
  image
    .command('ls')
    .description('list images with their digest, size and recipe (--json for the whole recipe)')
    .action(
      action(async (json: boolean) => {
        const images = listImages();
        emit(json, images, () =>
          images.length === 0
            ? 'no images; run `clade image build`'
            : table([['DIGEST', 'NAMES', 'ROOTFS', 'SIZE', 'PACKAGES', 'RECIPE', 'CREATED'], ...images.map((i) => [i.digest.slice(0, 12), i.names.join(',') || '-', i.rootfs, mib(i.sizeBytes), String(i.packageCount), describeSpec(i.spec), i.createdAt])]),
        );
      }),
    );
  image
    .command('rm <image>')
    .description('remove an image (by name or digest prefix)')
    .action(
      action(async (json: boolean, ref: string) => {
        const r = removeImage(ref);
        emit(json, { removed: r.digest, names: r.names }, () => `removed image ${r.digest.slice(0, 12)}${r.names.length ? ` (${r.names.join(', ')})` : ''}`);
      }),
    );

  program
    .command('run')
    .description('boot a sandbox, run one command, print its output, exit with its code, clean up (through the daemon if one runs)')
    .argument('<command...>', 'the command and its arguments (put them after --)')
    .option('--image <image>', 'image name or digest', 'default')
    .option('--from-snapshot <tag>', 'resume a persistent snapshot instead of booting')
    .option('--template <name>', 'start from a template (warm, its start command running) instead of booting')
    .option('--memory <mib>', 'guest memory in MiB', (v) => parseInt(v, 10))
    .option('--cpus <n>', 'virtual CPUs', (v) => parseInt(v, 10))
    .option('--timeout <ms>', 'kill the command after this many ms (0 = never)', (v) => parseInt(v, 10), 0)
    .addOption(new Option('-e, --env <KEY=VALUE...>', 'environment variables').default([]))
    .option('--egress <policy>', 'give the sandbox a network (docs/network.md): none, all, or a comma-separated list of hosts, *.domains, IPv4 addresses and CIDRs')
    .option('--port <port>', 'a guest TCP port to forward from the host\'s loopback, repeatable (gives the sandbox a network); the addresses go to stderr, or into --json', (v, prev: string[] = []) => [...prev, v])
    .action(
      action(async (json: boolean, argv: string[], opts: { image: string; fromSnapshot?: string; template?: string; memory?: number; cpus?: number; timeout: number; env: string[]; egress?: string; port?: string[] }) => {
        const env = parseEnv(opts.env);
        const network = networkOption(opts.egress, opts.port);
        if (network && (opts.fromSnapshot || opts.template)) throw new CladeError('bad_request', '--egress and --port apply to a booted sandbox; a snapshot or template keeps the network it was made with');
        const daemon = await findDaemon();
        if (daemon) {
          const create = opts.template ? { template: opts.template } : { image: opts.image, ...(opts.memory ? { memoryMiB: opts.memory } : {}), ...(opts.cpus ? { cpus: opts.cpus } : {}), ...(network ? { network } : {}) };
          return runViaDaemon(daemon, { argv, ...(opts.fromSnapshot ? { fromSnapshot: opts.fromSnapshot } : {}), create, env, timeoutMs: opts.timeout, json });
        }
        const shape = opts.template ? { template: opts.template } : { image: opts.image, ...(opts.memory ? { memoryMiB: opts.memory } : {}), ...(opts.cpus ? { cpus: opts.cpus } : {}), ...(network ? { network } : {}) };
        await using sb = opts.fromSnapshot ? await startOne(opts.fromSnapshot, env) : await Sandbox.create({ ...shape, env });
        if (!json) for (const p of sb.ports) process.stderr.write(`guest port ${p.port} at ${p.host}\n`);
        const command = argv.length === 1 ? argv[0]! : argv;
        const r = await sb.commands.run(command, {
          timeoutMs: opts.timeout,
          ...(json ? {} : { onStdout: (d: string) => process.stdout.write(d), onStderr: (d: string) => process.stderr.write(d) }),
        });
        if (json) emit(true, { sandboxId: sb.sandboxId, ...(sb.ports.length ? { ports: sb.ports } : {}), ...r }, () => '');
        return r.exitCode;
      }),
    );


  program
    .command('ps')
    .description('list the daemon\'s sandboxes (needs `clade serve`)')
    .action(action(psAction));
  program
    .command('fork <sandbox>')
    .description('fork a daemon sandbox into N running children (needs `clade serve`)')
    .option('-n, --count <n>', 'children', (v) => parseInt(v, 10), 1)
    .action(action(forkAction));

  const snapshot = program
    .command('snapshot')
    .description('persistent snapshots of warm sandboxes; `clade snapshot <sandbox> --tag T` saves a daemon sandbox')
    .argument('[sandbox]', 'a sandbox of the running daemon to save (needs `clade serve`)')
    .option('--tag <tag>', 'tag for the snapshot of <sandbox>')
    .action(
      action(async (json: boolean, id: string | undefined, opts: { tag?: string }) => {
        if (id === undefined && opts.tag === undefined) return void snapshot.outputHelp(); // bare `clade snapshot`
        await snapshotSandboxAction(json, id, opts);
      }),
    );
  snapshot
    .command('create <tag>')
    .description('boot (or resume a snapshot), warm up with commands and Python code, and save the state as <tag>')
    .option('--from-snapshot <tag>', 'start from this snapshot instead of booting the image')
    .option('--image <image>', 'image name or digest', 'default')
    .addOption(new Option('--run <command...>', 'shell commands to run first (in order)').default([]))
    .addOption(new Option('--code <python...>', 'Python code for the persistent interpreter (in order)').default([]))
    .action(
      action(async (json: boolean, tag: string, opts: { fromSnapshot?: string; image: string; run: string[]; code: string[] }) => {
        await using sb = opts.fromSnapshot ? await startOne(opts.fromSnapshot, {}) : await Sandbox.create({ image: opts.image });
        for (const c of opts.run) {
          const r = await sb.commands.run(c, { timeoutMs: 0 });
          if (r.exitCode !== 0) throw new CladeError('bad_request', `warm-up command failed with exit code ${r.exitCode}: ${c}\n${r.stderr}`);
        }
        for (const c of opts.code) {
          const r = await sb.runCode(c, { timeoutMs: 0 });
          if (r.error) throw new CladeError('bad_request', `warm-up code raised ${r.error.name}: ${r.error.value}`);
        }
        const meta = await sb.snapshot({ tag });
        emit(json, meta, () => `snapshot ${tag}: ${mib(meta.files['memory.raw'].bytes)} RAM image, parent ${meta.parent ?? '-'}`);
      }),
    );
  snapshot
    .command('ls')
    .description('list persistent snapshots')
    .action(
      action(async (json: boolean) => {
        const all = listSnapshots();
        emit(json, all.map(({ agent: _secret, hmac: _mac, ...m }) => m), () =>
          all.length === 0 ? 'no snapshots; make one with `clade snapshot create <tag>`' : table([['TAG', 'PARENT', 'IMAGE', 'MEMORY', 'CREATED'], ...all.map((m) => [m.tag, m.parent ?? '-', m.image.slice(0, 12), `${m.memoryMiB} MiB`, m.createdAt])]),
        );
      }),
    );
  snapshot
    .command('inspect <tag>')
    .description('show a snapshot and check its files against their hashes')
    .action(
      action(async (json: boolean, tag: string) => {
        const { agent: _secret, hmac: _mac, ...meta } = await verifySnapshot(tag);
        emit(json, { ...meta, verified: true }, () => JSON.stringify({ ...meta, verified: true }, null, 2));
      }),
    );
  snapshot
    .command('rm <tag>')
    .description('delete a snapshot (with --cascade, also the snapshots made from it)')
    .option('--cascade', 'also delete descendants')
    .action(
      action(async (json: boolean, tag: string, opts: { cascade?: boolean }) => {
        const removed = removeSnapshot(tag, { cascade: Boolean(opts.cascade) });
        emit(json, { removed }, () => `removed ${removed.join(', ')}`);
      }),
    );

  const template = program.command('template').description('sandboxes set up once and saved warm: `Sandbox.create({ template })` starts from them');
  template
    .command('create <name>')
    .description('boot an image, run setup commands and Python code, start a long-running process, wait until the ready command succeeds, and save it all as template <name>')
    .option('--image <image>', 'image name or digest', 'default')
    .option('--memory <mib>', 'guest memory in MiB', (v) => parseInt(v, 10))
    .addOption(new Option('--engine <engine>', 'engine to set up and later start on').choices(['qemu', 'vmm']))
    .addOption(new Option('--run <command...>', 'setup shell commands, in order; each must exit 0').default([]))
    .addOption(new Option('--code <python...>', 'setup Python code for the persistent interpreter, after the commands').default([]))
    .option('--start <command>', 'a long-running command started last, in the background')
    .option('--ready <command>', 'polled until it exits 0 before the snapshot (needs --start)')
    .option('--ready-timeout <ms>', 'how long to poll --ready (default 120000)', (v) => parseInt(v, 10))
    .addOption(new Option('-e, --env <KEY=VALUE...>', 'environment variables for the setup and every sandbox of the template').default([]))
    .option('--egress <policy>', 'give its sandboxes a network (docs/network.md): none, all, or a comma-separated list of hosts, *.domains, IPv4 addresses and CIDRs')
    .option('--port <port>', 'a guest TCP port each sandbox forwards from the host\'s loopback, repeatable (gives them a network)', (v, prev: string[] = []) => [...prev, v])
    .action(
      action(async (json: boolean, name: string, opts: { image: string; memory?: number; engine?: 'qemu' | 'vmm'; run: string[]; code: string[]; start?: string; ready?: string; readyTimeout?: number; env: string[]; egress?: string; port?: string[] }) => {
        const env = parseEnv(opts.env);
        const network = networkOption(opts.egress, opts.port);
        const spec: TemplateSpec = {
          name,
          image: opts.image,
          ...(opts.memory ? { memoryMiB: opts.memory } : {}),
          ...(opts.engine ? { engine: opts.engine } : {}),
          ...(Object.keys(env).length ? { env } : {}),
          ...(network ? { network } : {}),
          ...(opts.run.length ? { run: opts.run } : {}),
          ...(opts.code.length ? { code: opts.code } : {}),
          ...(opts.start ? { start: opts.start } : {}),
          ...(opts.ready ? { ready: opts.ready } : {}),
          ...(opts.readyTimeout ? { readyTimeoutMs: opts.readyTimeout } : {}),
        };
        const info = await Template.create(spec, { onProgress: progressPrinter(json) });
        emit(json, info, () => `template ${name}: image ${info.imageDigest.slice(0, 12)}, ${info.engineUsed}, set up in ${info.setupSeconds.toFixed(1)} s; start sandboxes with \`clade run --template ${name} -- CMD\` or Sandbox.create({ template: '${name}' })`);
      }),
    );
  template
    .command('ls')
    .description('list templates with how they were made')
    .action(
      action(async (json: boolean) => {
        const all = await Template.list();
        emit(json, all, () =>
          all.length === 0
            ? 'no templates; make one with `clade template create <name> --run CMD --start CMD --ready CMD`'
            : table([['NAME', 'IMAGE', 'ENGINE', 'SETUP', 'START', 'CREATED'], ...all.map((t) => [t.name, t.imageDigest.slice(0, 12), t.engineUsed, `${(t.run ?? []).length} run, ${(t.code ?? []).length} code`, t.start ?? '-', t.createdAt])]),
        );
      }),
    );
  template
    .command('rm <name>')
    .description('remove a template and its snapshot')
    .action(
      action(async (json: boolean, name: string) => {
        await Template.remove(name);
        emit(json, { removed: name }, () => `removed template ${name}`);
      }),
    );

  program.addCommand(serveCommand().action(action((_json, flags: Parameters<typeof runServe>[0]) => runServe(flags))));
  program
    .command('mcp')
    .description('an MCP server on stdio (tools: create, run, code, files, fork, snapshot, list, kill): through the running daemon if one answers, else sandboxes in this process (docs/mcp.md)')
    .action(action(async () => runMcpStdio()));

  program
    .command('demo')
    .description('boot a sandbox and show what clade does')
    .action(
      action(async (json: boolean) => {
        await runDemo(json);
      }),
    );

  const bench = program.command('bench').description('benchmarks (results printed as a table and written as JSON)');
  bench
    .command('boot')
    .description('cold boot to the first command result inside the guest')
    .option('-n, --runs <n>', 'repetitions', (v) => parseInt(v, 10), 5)
    .action(
      action(async (json: boolean, opts: { runs: number }) => {
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
  bench
    .command('fork')
    .description('fork vs cold boot vs snapshot restore, to the first runCode result in the guest')
    .option('-n, --runs <n>', 'repetitions', (v) => parseInt(v, 10), 5)
    .option('--fanout <n>', 'children forked at once', (v) => parseInt(v, 10), 100)
    .option('--depth <n>', 'deepest nested fork measured', (v) => parseInt(v, 10), 10)
    .action(
      action(async (json: boolean, opts: { runs: number; fanout: number; depth: number }) => {
        const r = await benchFork({ ...opts, log: (l) => !json && process.stderr.write(l + '\n') });
        const names: Record<string, string> = {
          coldBootToNumpyResultMs: '(a) cold boot + import numpy -> result',
          snapshotRestoreToResultMs: 'restore persistent snapshot -> result',
          fork1ToResultMs: '(b) fork 1 child (cold slot) -> result',
          fork1WarmToResultMs: '(b) fork 1 child (warm slot) -> result',
          fanoutAllResultsMs: `(c) fork ${r.fanout} (no pool) -> all results`,
          fanoutWarmAllResultsMs: `(c) fork ${r.fanout} (pool of ${r.fanout}) -> all results`,
          parentPauseMs: '(e) parent pause per fork',
          depth1Ms: '(f) fork at depth 1 -> result',
          depth5Ms: '(f) fork at depth 5 -> result',
          depth10Ms: '(f) fork at depth 10 -> result',
        };
        const rows = Object.entries(r.metrics).map(([k, s]) => [names[k] ?? k, s.median.toFixed(1), s.p90.toFixed(1), String(s.n)]);
        emit(json, r, () =>
          [
            `fork benchmark, ${r.runs} runs, accelerator ${r.accelerator}`,
            table([['METRIC (ms)', 'MEDIAN', 'P90', 'N'], ...rows]),
            `(d) per child of ${r.fanout}: PSS median ${r.memory.childPssMiB.median.toFixed(1)} MiB, private ${r.memory.childPrivateMiB.median.toFixed(1)} MiB; host memory used by all ${r.fanout}: ${r.memory.hostUsedByFanoutMiB.toFixed(0)} MiB`,
            `JSON: ${r.jsonPath}`,
          ].join('\n'),
        );
      }),
    );
  bench
    .command('network')
    .description('what a network costs: create and fork of one child to its first command result, with and without a network, interleaved in one run')
    .option('-n, --runs <n>', 'forks of each parent', (v) => parseInt(v, 10), 5)
    .action(
      action(async (json: boolean, opts: { runs: number }) => {
        const r = await benchNetwork({ ...opts, log: (l) => !json && process.stderr.write(l + '\n') });
        const names: Record<string, string> = {
          createPlainMs: 'create -> first command result, no network (1 run)',
          createNetworkMs: 'create -> first command result, with a network (1 run)',
          forkPlainToResultMs: 'fork 1 child -> its result, no network',
          forkNetworkToResultMs: 'fork 1 child -> its result, with a network',
          forkNetworkToPortAnswerMs: "fork 1 child -> the guest server answers on the child's own port",
        };
        const rows = Object.entries(r.metrics).map(([k, s]) => [names[k] ?? k, s.median.toFixed(0), s.p90.toFixed(0), String(s.n)]);
        emit(json, r, () => [`network benchmark, ${r.runs} runs, engine ${r.engine}, accelerator ${r.accelerator}`, table([['METRIC (ms)', 'MEDIAN', 'P90', 'N'], ...rows]), `JSON: ${r.jsonPath}`].join('\n'));
      }),
    );
  bench
    .command('vmm')
    .description('clade-vmm vs the qemu engine, both on KVM inside the runner VM: boot, forks of 1/10/100, host fork work, depth, memory, pause')
    .option('-n, --runs <n>', 'repetitions of cold boots and of forks of one child', (v) => parseInt(v, 10), 5)
    .option('--fanouts <list>', 'children per fork, comma-separated', integerList, [1, 10, 100])
    .option('--fanout-runs <n>', 'repetitions of forks of 2 to 10 children', (v) => parseInt(v, 10), 3)
    .option('--large-fanout-runs <n>', 'repetitions of forks of more than 10 children', (v) => parseInt(v, 10), 1)
    .option('--depths <list>', 'nesting depths measured, comma-separated', integerList, [1, 5, 10])
    .option('--depth-runs <n>', 'repetitions of the nested chain', (v) => parseInt(v, 10), 2)
    .addOption(new Option('--engines <list>', 'engines to measure, comma-separated').default(['vmm', 'qemu']).argParser(engineList))
    .option('--guest-memory <mib>', 'guest RAM of every sandbox', (v) => parseInt(v, 10), 512)
    .option('--runner-memory <mib>', 'runner RAM (at most 12288)', (v) => parseInt(v, 10), 8192)
    .option('--timeout <ms>', 'limit for the whole runner run', (v) => parseInt(v, 10), 1_800_000)
    .option('--image <ref>', 'guest image both engines boot', 'default')
    .action(
      action(async (json: boolean, opts: { runs: number; fanouts: number[]; fanoutRuns: number; largeFanoutRuns: number; depths: number[]; depthRuns: number; engines: EngineUnderTest[]; guestMemory: number; runnerMemory: number; timeout: number; image: string }) => {
        if (!(opts.runnerMemory >= 2048 && opts.runnerMemory <= 12288)) throw new CladeError('bad_request', `--runner-memory must be from 2048 to 12288 MiB, got ${opts.runnerMemory}`);
        const { guestMemory, runnerMemory, timeout, ...plan } = opts;
        const r = await benchVmm({ ...plan, guestMiB: guestMemory, runnerMemoryMiB: runnerMemory, timeoutMs: timeout, log: (l) => !json && process.stderr.write(l + '\n') });
        const notes = Object.entries(r.engines).flatMap(([e, f]) => f.notes.map((n) => `note (${e}): ${n}`));
        const depthRatios = Object.entries(r.ratios.deepestOverDepth1).map(([e, v]) => `${e} ${v.toFixed(2)}x`).join(', ');
        emit(json, r, () =>
          [
            `vmm benchmark, ${r.plan.runs} runs, ${r.where}; absolute times are emulated, ratios transfer`,
            table(vmmBenchRows(r)),
            `host fork work, qemu snapshot restore / clade-vmm fork: ${r.ratios.hostForkWorkQemuOverVmm.toFixed(1)}x (median)`,
            `fork -> result at depth ${Math.max(...r.plan.depths)} / depth 1: ${depthRatios}`,
            ...notes,
            `JSON: ${r.jsonPath}`,
          ].join('\n'),
        );
      }),
    );
  bench
    .command('load')
    .description('concurrent clients against the running daemon (unix socket or loopback only): take a sandbox, exec, delete')
    .option('--clients <n>', 'concurrent clients', (v) => parseInt(v, 10), 50)
    .option('--seconds <n>', 'how long to run', (v) => parseInt(v, 10), 30)
    .addOption(new Option('--mode <mode>', 'how each client gets its sandbox').choices(['fork', 'create']).default('fork'))
    .action(
      action(async (json: boolean, opts: { clients: number; seconds: number; mode: LoadMode }) => {
        const client = await localDaemonForLoad();
        const r = await benchLoad({ client, ...opts });
        const row = (name: string, s: { n: number; median: number; p90: number; max: number }) => [name, String(s.n), s.median.toFixed(0), s.p90.toFixed(0), s.max.toFixed(0)];
        emit(json, r, () =>
          [
            `load: ${r.clients} clients, ${r.seconds} s, mode ${r.mode}: ${r.iterations} iterations, errors ${JSON.stringify(r.errors)}`,
            table([['PHASE (ms)', 'N', 'MEDIAN', 'P90', 'MAX'], ...(['acquire', 'exec', 'delete', 'iteration'] as const).map((p) => row(p, r.latencyMs[p]))]),
            `JSON: ${r.jsonPath}`,
          ].join('\n'),
        );
        return Object.keys(r.errors).length > 0 ? 1 : 0;
      }),
    );
  registerRunnerCommands(program, action);
  return program;
}

/** The load benchmark only targets a daemon on this machine. */
async function localDaemonForLoad() {
  const address = process.env.CLADE_DAEMON;
  if (address && !/^unix:\/\/|^http:\/\/(127\.0\.0\.1|localhost|\[::1\])(:|\/|$)/.test(address)) {
    throw new CladeError('bad_request', `clade bench load only runs against a daemon on this machine (unix socket or loopback), not ${address}`);
  }
  const client = await findDaemon();
  if (!client) throw new CladeError('unavailable', 'no daemon answers; start one with `clade serve`');
  return client;
}

function integerList(value: string): number[] {
  const list = value.split(',').map((v) => Number(v.trim()));
  if (list.length === 0 || list.some((n) => !Number.isInteger(n) || n < 1)) throw new CladeError('bad_request', `give whole numbers above 0 separated by commas (e.g. 1,10,100), got ${JSON.stringify(value)}`);
  return list;
}

function engineList(value: string): EngineUnderTest[] {
  const list = value.split(',').map((v) => v.trim());
  const bad = list.find((e) => e !== 'vmm' && e !== 'qemu');
  if (bad !== undefined) throw new CladeError('bad_request', `unknown engine ${JSON.stringify(bad)}: use vmm, qemu or vmm,qemu`);
  return list as EngineUnderTest[];
}

function parsePort(v: string): number {
  if (!/^\d{1,5}$/.test(v)) throw new CladeError('bad_request', `--port takes a TCP port number (1 to 65535), got ${JSON.stringify(v)}`);
  return Number(v);
}

/** `--egress` and `--port` as the SDK's network option (checked by the core or the daemon); undefined when neither is given. */
function networkOption(egress: string | undefined, ports: string[] | undefined): NetworkOptions | undefined {
  if (egress === undefined && !ports?.length) return undefined;
  const policy = egress === undefined || egress === 'none' || egress === 'all' ? (egress ?? 'none') : egress.split(',').map((e) => e.trim()).filter((e) => e !== '');
  return { egress: policy, ports: (ports ?? []).map(parsePort) };
}

/** An image's recipe in one cell: extra packages, copies and env names. */
function describeSpec(spec: ImageSpec): string {
  const parts = [
    spec.packages.length ? `+${spec.packages.join(',')}` : '',
    ...spec.copy.map((c) => `${c.from}:${c.to}`),
    Object.keys(spec.env).length ? `env ${Object.keys(spec.env).join(',')}` : '',
  ].filter(Boolean);
  return parts.length ? parts.join(' ') : 'base';
}

function parseEnv(pairs: string[]): Record<string, string> {
  const env: Record<string, string> = {};
  for (const kv of pairs) {
    const eq = kv.indexOf('=');
    if (eq <= 0) throw new CladeError('bad_request', `environment variables are KEY=VALUE, got ${JSON.stringify(kv)}`);
    env[kv.slice(0, eq)] = kv.slice(eq + 1);
  }
  return env;
}

async function startOne(tag: string, env: Record<string, string>): Promise<Sandbox> {
  const [sb] = await Sandbox.fromSnapshot(tag, { env });
  if (!sb || sb instanceof CladeError) throw sb ?? new CladeError('internal', 'no sandbox started');
  return sb;
}

export async function main(argv: string[]): Promise<void> {
  await buildProgram().parseAsync(argv);
}

if (import.meta.url === `file://${process.argv[1]}`) {
  void main(process.argv);
}
