import { execFile } from 'node:child_process';
import { existsSync, readdirSync, rmSync } from 'node:fs';
import { promisify } from 'node:util';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { buildImage } from '../../src/images/build.js';
import { resolveImage } from '../../src/images/store.js';
import { homePaths } from '../../src/util/home.js';
import { CladeError, Sandbox } from '../../src/sdk/index.js';
import { Template } from '../../src/sdk/templates.js';
import { Image } from '../../src/sdk/images.js';
import { TestDaemon } from '../helpers/daemon.js';
import { okAndTracked, remains } from '../helpers/leaks.js';

// One image with the user's packages (git, gcc and libc6-dev, without
// recommendations to keep the download small), a host directory and an env
// variable, on a read-only disk root: the recipe path and the disk path in
// one build. One warm sandbox of it; the disk tests fork from it.
const IMAGE = 'test-env-gitgcc';
const TEMPLATE = `test-env-http-${process.pid}`;
const FIXTURE = join(import.meta.dirname, 'fixture-project');
const MAIN = join(import.meta.dirname, '../../src/cli/main.ts');

/** The CLI with --json, run asynchronously: its exit code and parsed output. */
async function cladeJson(args: string[]): Promise<{ code: number; out: unknown }> {
  const r = await promisify(execFile)(process.execPath, ['--import', 'tsx', MAIN, '--json', ...args], { encoding: 'utf8' }).then(
    (ok) => ({ code: 0, stdout: ok.stdout }),
    (err: { code?: number; stdout?: string }) => ({ code: err.code ?? 1, stdout: err.stdout ?? '' }),
  );
  return { code: r.code, out: JSON.parse(r.stdout) };
}
let sb: Sandbox;
const everyone: Sandbox[] = [];
const daemon = new TestDaemon(['--stop-on-exit']);

beforeAll(async () => {
  const built = await buildImage({ name: IMAGE, packages: ['git', 'gcc', 'libc6-dev'], recommends: false, rootfs: 'disk', copy: [`${FIXTURE}:/opt/project`], env: { PROJECT_NAME: 'clade-env-test' } });
  expect(built.manifest.rootfs).toMatchObject({ kind: 'disk', fs: 'erofs' });
  sb = await Sandbox.create({ image: IMAGE, engine: 'qemu', memoryMiB: 512 });
  everyone.push(sb);
  await daemon.start();
}, 600_000);

afterAll(async () => {
  const ids = everyone.map((s) => s.sandboxId);
  await Promise.all(everyone.map((s) => s.kill()));
  expect(ids.flatMap((id) => remains(id))).toEqual([]);
  await daemon.stop('SIGTERM');
  await Template.remove(TEMPLATE).catch(() => undefined);
  rmSync(daemon.dir, { recursive: true, force: true });
});

describe('an image with your packages, files and env', () => {
  it('compiles and runs a C file copied in, and commits it to a git repository', async () => {
    const script = [
      'set -e',
      'cd /root && cp -r /opt/project repo && cd repo',
      'cc -O2 -o hello hello.c && ./hello',
      'git init -q && git config user.email t@example.com && git config user.name T',
      'git add hello.c && git commit -q -m "first" && git log --oneline | wc -l',
      'echo "$PROJECT_NAME"',
    ].join('\n');
    const r = await sb.commands.run(script, { timeoutMs: 120_000 });
    expect(r.stderr).toBe('');
    expect(r.exitCode).toBe(0);
    expect(r.stdout).toBe('hello from a compiled C file\n1\nclade-env-test\n');
  });

  it('has what maintainer scripts would have made: the cc alternative and the ld.so cache', async () => {
    const r = await sb.commands.run('readlink /usr/bin/cc; readlink /etc/alternatives/cc; test -s /etc/ld.so.cache && echo cache');
    expect(r.stdout).toBe('/etc/alternatives/cc\n/usr/bin/gcc\ncache\n');
  });

  it('lists the recipe', async () => {
    const image = resolveImage(IMAGE);
    expect(image.manifest.spec).toMatchObject({ packages: ['gcc', 'git', 'libc6-dev'], env: { PROJECT_NAME: 'clade-env-test' }, rootfs: 'disk', recommends: false });
    // The image is named by content, so a build from another checkout of the
    // same files reuses it and keeps the source path of the first build.
    expect(image.manifest.spec!.copy).toEqual([{ from: expect.stringMatching(/\/test\/images\/fixture-project$/), to: '/opt/project' }]);
    const listed = (await Image.list({ daemon: `unix://${daemon.socket}` })).find((i) => i.names.includes(IMAGE));
    expect(listed).toMatchObject({ rootfs: 'disk', spec: { packages: ['gcc', 'git', 'libc6-dev'] } });
  });
});

describe('a disk-backed root filesystem', () => {
  it('is a read-only erofs under a RAM overlay', async () => {
    // The erofs mount itself sits outside the new root; the disk and the overlay show it.
    const r = await sb.commands.run("awk '$2 == \"/\" { print $3 }' /proc/mounts; cat /sys/block/vda/ro; grep -o 'erofs$' /proc/filesystems; echo x > /usr/bin/new-file && cat /usr/bin/new-file");
    expect(r.stdout).toBe('overlay\n1\nerofs\nx\n');
  });

  it('keeps each fork\'s writes to itself', async () => {
    await sb.files.write('/usr/local/share/from-parent', 'p');
    const kids = okAndTracked(await sb.fork(2), everyone);
    const [a, b] = kids as [Sandbox, Sandbox];
    await a.commands.run('echo a > /usr/local/share/only-a && rm /usr/bin/git');
    await b.commands.run('echo b > /usr/local/share/only-b');
    expect((await a.commands.run('ls /usr/local/share; test -e /usr/bin/git || echo no-git')).stdout).toBe('from-parent\nonly-a\nno-git\n');
    expect((await b.commands.run('ls /usr/local/share; git --version | cut -d" " -f1')).stdout).toBe('from-parent\nonly-b\ngit\n');
    expect((await sb.commands.run('ls /usr/local/share; git --version | cut -d" " -f1')).stdout).toBe('from-parent\ngit\n');
  });
});

describe('bad recipes', () => {
  const snapshotOfImages = () => readdirSync(homePaths.images()).sort();
  const tmpEntries = () => (existsSync(homePaths.tmp()) ? readdirSync(homePaths.tmp()).filter((f) => f.startsWith('build-')) : []);

  it('names a package that does not exist, and leaves nothing behind', async () => {
    const before = snapshotOfImages();
    const err = await buildImage({ name: 'test-env-bad', packages: ['git', 'no-such-package-clade'] }).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(CladeError);
    expect((err as CladeError).code).toBe('not_found');
    expect((err as CladeError).message).toMatch(/no Debian package "no-such-package-clade"/);
    expect(snapshotOfImages()).toEqual(before);
    expect(existsSync(join(homePaths.imageRefs(), 'test-env-bad'))).toBe(false);
    expect(tmpEntries().filter((f) => f.includes(String(process.pid)))).toEqual([]);
  });

  it('refuses a copy source that does not exist before any work, in this process and through the daemon', async () => {
    const before = snapshotOfImages();
    await expect(buildImage({ name: 'test-env-bad', copy: ['/no/such/dir:/opt/x'] })).rejects.toThrow(/copy source \/no\/such\/dir does not exist/);
    await expect(Image.build({ name: 'test-env-bad', copy: ['/no/such/dir:/opt/x'] }, { daemon: `unix://${daemon.socket}` })).rejects.toThrow(/copy source \/no\/such\/dir does not exist/);
    await expect(Image.build({ name: 'test-env-bad', packages: ['git'], rootfs: 'floppy' as 'disk' }, { daemon: `unix://${daemon.socket}` })).rejects.toThrow(/rootfs/);
    expect(snapshotOfImages()).toEqual(before);
  });
});

describe('templates', () => {
  // A server with state in memory: each sandbox's counter must be its own.
  const server = [
    'import http.server',
    'count = 0',
    'class H(http.server.BaseHTTPRequestHandler):',
    '    def do_GET(self):',
    '        global count',
    '        count += 1',
    '        body = str(count).encode()',
    '        self.send_response(200); self.end_headers(); self.wfile.write(body)',
    '    def log_message(self, *a): pass',
    "http.server.HTTPServer(('', 8080), H).serve_forever()", // all addresses: forwarded ports arrive on the NIC
  ].join('\n');
  const get = "python3 -c \"import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:8080/', timeout=5).read().decode())\"";
  /** The same request from the host, through the sandbox's own forwarded port. */
  const getFromHost = async (sb: Sandbox) => Number(await (await fetch(`http://${sb.getHost(8080)}/`)).text());

  it('starts a server, waits until it is ready, and every sandbox made from it is serving, each with its own state', async () => {
    const viaDaemon = { daemon: `unix://${daemon.socket}` };
    const progress: string[] = [];
    const info = await Template.create(
      {
        name: TEMPLATE,
        engine: 'qemu',
        memoryMiB: 512,
        run: [`cat > /root/server.py <<'EOF'\n${server}\nEOF`, 'echo setup-output-line'],
        code: ['import json\nwarm_state = json.dumps({"loaded": True})'],
        env: { TEMPLATE_MODE: 'web' },
        network: { ports: [8080] },
        start: 'python3 /root/server.py',
        ready: get,
      },
      { ...viaDaemon, onProgress: (e) => progress.push(`${e.phase}: ${e.message}`) },
    );
    expect(info.snapshot).toBe(TEMPLATE);
    expect(progress).toContain('run: setup-output-line');
    expect(progress.some((p) => p.startsWith('ready: ready after'))).toBe(true);
    expect((await Template.list()).map((t) => t.name)).toContain(TEMPLATE);
    expect((await Template.list(viaDaemon)).find((t) => t.name === TEMPLATE)).toMatchObject({ start: 'python3 /root/server.py', engineUsed: 'qemu' });
    const listed = await cladeJson(['template', 'ls']);
    expect(listed.code).toBe(0);
    expect((listed.out as { name: string }[]).map((t) => t.name)).toContain(TEMPLATE);
    const images = await cladeJson(['image', 'ls']);
    expect((images.out as { names: string[]; spec: { env: object } }[]).find((i) => i.names.includes(IMAGE))?.spec.env).toEqual({ PROJECT_NAME: 'clade-env-test' });

    // In this process: serving on the first request.
    const local = await Sandbox.create({ template: TEMPLATE });
    everyone.push(local);
    const localCount = Number((await local.commands.run(get)).stdout);
    expect(localCount).toBeGreaterThan(0);
    expect(await getFromHost(local)).toBe(localCount + 1);
    expect((await local.runCode('warm_state')).value).toBe(`'{"loaded": true}'`); // the setup's interpreter, still warm
    expect((await local.commands.run('echo $TEMPLATE_MODE')).stdout).toBe('web\n');
    await local.kill();

    // Through the daemon, then 3 forks of it.
    const warm = await Sandbox.create({ template: TEMPLATE, ...viaDaemon });
    const first = Number((await warm.commands.run(get)).stdout); // no retry: serving at once
    expect(first).toBeGreaterThan(0);
    const kids = (await warm.fork(3)).map((k) => {
      if (k instanceof CladeError) throw k;
      return k;
    });
    for (const kid of kids) expect((await kid.commands.run(get)).stdout).toBe(`${first + 1}\n`);
    expect((await kids[0]!.commands.run(get)).stdout).toBe(`${first + 2}\n`);
    expect((await kids[1]!.commands.run(get)).stdout).toBe(`${first + 2}\n`);
    expect((await warm.commands.run(get)).stdout).toBe(`${first + 1}\n`);
    // From the host: each sandbox answers on host ports of its own, with its own state.
    expect(new Set([warm, ...kids].map((k) => k.getHost(8080))).size).toBe(4);
    expect(await Promise.all(kids.map(getFromHost))).toEqual([first + 3, first + 3, first + 2]);
    expect(await getFromHost(warm)).toBe(first + 2);
    await Promise.all([warm, ...kids].map((k) => k.kill()));
  });

  it('refuses bad templates clearly and leaves no snapshot or record', async () => {
    await expect(Template.create({ name: 'test-env-x', ready: 'true' })).rejects.toThrow(/give a start command too/);
    await expect(Template.create({ name: 'test-env-x', ready: 'true' }, { daemon: `unix://${daemon.socket}` })).rejects.toThrow(/give a start command too/);
    await expect(Template.create({ name: 'test-env-x', bogus: 1 } as never, { daemon: `unix://${daemon.socket}` })).rejects.toThrow(/bogus|additional/i);
    await expect(Sandbox.create({ template: 'no-such-template' })).rejects.toThrow(/no template "no-such-template"/);
    expect(await cladeJson(['template', 'create', 'test-env-x', '--ready', 'true'])).toEqual({ code: 1, out: { error: { code: 'bad_request', message: expect.stringMatching(/give a start command too/) } } });
    await expect(Sandbox.create({ template: TEMPLATE, memoryMiB: 2048 })).rejects.toThrow(/fixes the sandbox's memoryMiB/);
    const failing = `test-env-fail-${process.pid}`;
    await expect(Template.create({ name: failing, engine: 'qemu', memoryMiB: 512, run: ['echo nope >&2; exit 3'] })).rejects.toThrow(/setup command 1 exited with code 3/);
    expect(existsSync(join(homePaths.snapshots(), failing))).toBe(false);
    expect((await Template.list()).map((t) => t.name)).not.toContain(failing);
  });
});
