import { chmodSync, existsSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync, symlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { homePaths, memoryDir } from '../../src/util/home.js';
import { SERIAL_LOG_MAX_BYTES } from '../../src/engines/serial-log.js';
import { CladeError, Sandbox } from '../../src/sdk/index.js';
import { TestDaemon } from '../helpers/daemon.js';
import { remains, sandboxDirs } from '../helpers/leaks.js';
import { request } from 'node:http';

// Real VMs behind a real daemon, attacked from inside the guest (console
// flood, a huge sparse file) and from the host (a RAM directory another user
// could have prepared). One warm sandbox serves the file's guest-side tests.

const daemon = new TestDaemon(['--stop-on-exit']);
let sb: Sandbox;

beforeAll(async () => {
  await daemon.start();
  sb = await Sandbox.create({ daemon: `unix://${daemon.socket}` });
});

afterAll(async () => {
  await sb?.kill();
  await daemon.stop('SIGTERM');
  expect(remains(sb.sandboxId)).toEqual([]);
  rmSync(daemon.dir, { recursive: true, force: true });
});

/** Bytes of console log the VM has on disk (the live file and its one rotated predecessor). */
function consoleLogBytes(id: string): { bytes: number; rotated: boolean } {
  const dir = join(homePaths.sandboxes(), id);
  let bytes = 0;
  let rotated = false;
  for (const vm of readdirSync(dir).filter((d) => d.startsWith('vm-'))) {
    for (const f of ['serial.log', 'serial.log.1']) {
      const p = join(dir, vm, f);
      if (!existsSync(p)) continue;
      bytes += statSync(p).size;
      if (f.endsWith('.1')) rotated = true;
    }
  }
  return { bytes, rotated };
}

describe('hardening with real VMs', () => {
  it('keeps the agent token off the VM process command line', () => {
    const cmdline = readFileSync(`/proc/${sb.getInfo().pid}/cmdline`, 'utf8');
    expect(cmdline).toContain(`clade-${sb.sandboxId}`);
    expect(cmdline).not.toMatch(/clade\.token/);
    expect(readdirSync(join(homePaths.sandboxes(), sb.sandboxId, 'vm-0'))).not.toContain('boot.cfg');
  });

  it('caps the console log while the guest floods its console for 60 s, and keeps serving', async () => {
    const flood = await sb.commands.run('yes console-flood > /dev/console', { background: true, timeoutMs: 65_000 });
    let largest = 0;
    let rotated = false;
    const end = Date.now() + 60_000;
    while (Date.now() < end) {
      await new Promise((r) => setTimeout(r, 5000));
      const now = consoleLogBytes(sb.sandboxId);
      largest = Math.max(largest, now.bytes);
      rotated ||= now.rotated;
      expect((await sb.commands.run('echo alive', { timeoutMs: 30_000 })).stdout).toBe('alive\n');
    }
    await flood.kill();
    console.log(`60 s of console flood: largest console log on disk ${(largest / 1048576).toFixed(2)} MiB (cap ${(2 * SERIAL_LOG_MAX_BYTES) / 1048576} MiB: the file and one rotated copy)`);
    expect(rotated).toBe(true); // the flood really went past the cap
    expect(largest).toBeLessThanOrEqual(2 * SERIAL_LOG_MAX_BYTES + 64 * 1024);
  });

  it('refuses a 1 TiB sparse file with a clear error before sending any of it, and keeps serving', async () => {
    expect((await sb.commands.run('truncate -s 1T /root/huge && stat -c %s /root/huge')).stdout.trim()).toBe(String(2 ** 40));
    const t0 = Date.now();
    const err = await sb.files.read('/root/huge', { format: 'bytes' }).then(() => undefined, (e: unknown) => e);
    expect(err).toBeInstanceOf(CladeError);
    expect(err).toMatchObject({ code: 'too_large', message: expect.stringMatching(/stream/) });
    expect(Date.now() - t0).toBeLessThan(10_000);
    await expect(sb.files.read('/root/huge', { format: 'stream', maxBytes: 1024 })).rejects.toMatchObject({ code: 'too_large' });
    expect((await sb.commands.run('echo still-serving')).stdout).toBe('still-serving\n');
  });
});

describe('uploads through the daemon', () => {
  it('streams an upload to the guest, and discards one the client breaks off', async () => {
    const MiB = 1024 * 1024;
    const path = `/v1/sandboxes/${sb.sandboxId}/files?path=${encodeURIComponent('/root/partial')}`;
    await new Promise<void>((resolve) => {
      const req = request({ socketPath: daemon.socket, method: 'PUT', path, headers: { 'content-type': 'application/octet-stream', 'content-length': 10 * MiB } });
      req.on('error', () => resolve());
      req.write(Buffer.alloc(MiB, 1), () => setTimeout(() => (req.destroy(), resolve()), 500));
    });
    // The daemon sees the break, fails the stream, and the agent drops the temporary file.
    for (let i = 0; i < 50 && (await sb.commands.run('ls -a /root | grep -c clade-tmp || true')).stdout.trim() !== '0'; i++) await new Promise((r) => setTimeout(r, 100));
    expect(await sb.files.exists('/root/partial')).toBe(false);
    expect((await sb.commands.run('ls -a /root | grep -c clade-tmp || true')).stdout.trim()).toBe('0');
    const big = Buffer.alloc(48 * MiB, 7);
    await sb.files.write('/root/whole', big);
    expect((await sb.commands.run('stat -c %s /root/whole')).stdout.trim()).toBe(String(big.length));
  });
});

describe('the RAM directory', () => {
  const realImages = homePaths.images();
  let home: string;
  let saved: string | undefined;

  beforeAll(() => {
    saved = process.env.CLADE_HOME;
    home = mkdtempSync(join(tmpdir(), 'clade-ramdir-'));
    mkdirSync(home, { recursive: true });
    symlinkSync(realImages, join(home, 'images')); // the image, without building it again
    process.env.CLADE_HOME = home;
  });

  afterAll(() => {
    rmSync(memoryDir(), { recursive: true, force: true });
    if (saved === undefined) delete process.env.CLADE_HOME;
    else process.env.CLADE_HOME = saved;
    rmSync(home, { recursive: true, force: true });
  });

  it('refuses a RAM directory that someone made world-writable, and leaves nothing behind', async () => {
    const dir = memoryDir();
    rmSync(dir, { recursive: true, force: true });
    mkdirSync(dir, { mode: 0o777 });
    chmodSync(dir, 0o777);
    const err = await Sandbox.create({ engine: 'qemu' }).then(() => undefined, (e: unknown) => e);
    expect(err).toMatchObject({ code: 'unavailable', message: expect.stringMatching(/not a private directory of yours/) });
    expect(sandboxDirs()).toEqual([]);
    expect(readdirSync(dir)).toEqual([]);
    rmSync(dir, { recursive: true, force: true });
  });

  it('refuses a RAM directory that is a symlink', async () => {
    const dir = memoryDir();
    const elsewhere = mkdtempSync(join(tmpdir(), 'clade-ram-elsewhere-'));
    chmodSync(elsewhere, 0o700);
    symlinkSync(elsewhere, dir);
    try {
      await expect(Sandbox.create({ engine: 'qemu' })).rejects.toMatchObject({ code: 'unavailable', message: expect.stringMatching(/symlink/) });
      expect(readdirSync(elsewhere)).toEqual([]);
    } finally {
      rmSync(dir, { force: true });
      rmSync(elsewhere, { recursive: true, force: true });
    }
  });
});
