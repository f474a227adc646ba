import { execFileSync, spawn } from 'node:child_process';
import { copyFileSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { memoryDir } from '../../src/util/home.js';
import { defaultManager } from '../../src/core/default.js';
import { writeCpio } from '../../src/images/cpio.js';
import { resolveImage } from '../../src/images/store.js';
import { Sandbox } from '../../src/sdk/index.js';
import { leftNothing, vmPids, waitFor } from '../helpers/leaks.js';

/** Starts a process that owns a sandbox; resolves with the sandbox id once it is ready. */
function startOwner(): Promise<{ proc: ReturnType<typeof spawn>; id: string; pid: number }> {
  const proc = spawn(process.execPath, ['--import', 'tsx', join(import.meta.dirname, '../helpers/child-owner.ts')], { stdio: ['ignore', 'pipe', 'inherit'] });
  return new Promise((resolve, reject) => {
    let out = '';
    proc.stdout!.on('data', (d: Buffer) => {
      out += d.toString();
      const m = /^(sb-[0-9a-f]+) (\d+)\n/.exec(out);
      if (m) resolve({ proc, id: m[1]!, pid: Number(m[2]) });
    });
    proc.once('exit', (code) => reject(new Error(`owner exited early with ${code}`)));
  });
}

describe('sandbox lifecycle', () => {
  it('leaves nothing behind when the code using it throws', async () => {
    let id = '';
    await expect(
      (async () => {
        await using sb = await Sandbox.create();
        id = sb.sandboxId;
        expect(vmPids(id)).toHaveLength(1);
        throw new Error('boom');
      })(),
    ).rejects.toThrow('boom');
    expect(id).toMatch(/^sb-/);
    expect(leftNothing(id)).toBe(true);
  });

  it('kills its VMs when the owning process gets Ctrl-C', async () => {
    const { proc, id, pid } = await startOwner();
    expect(vmPids(id)).toEqual([pid]);
    proc.kill('SIGINT');
    await new Promise((r) => proc.once('exit', r));
    expect(await waitFor(() => leftNothing(id))).toBe(true);
  });

  it('reaps the VM of an owner that was SIGKILLed', async () => {
    const { proc, id } = await startOwner();
    proc.kill('SIGKILL');
    await new Promise((r) => proc.once('exit', r));
    expect(vmPids(id)).toHaveLength(1); // nobody could clean up...
    const reaped = defaultManager().reapOrphans(); // ...until the next clade process looks
    expect(reaped.killed).toBeGreaterThanOrEqual(1);
    expect(await waitFor(() => leftNothing(id))).toBe(true);
  });

  it('times out a guest that never becomes ready, and cleans up', async () => {
    // An image whose /init never starts the agent, in a throwaway clade home.
    const home = mkdtempSync(join(tmpdir(), 'clade-hang-'));
    const saved = process.env.CLADE_HOME;
    const kernel = resolveImage('default').kernel;
    try {
      const root = join(home, 'rootfs');
      mkdirSync(root);
      writeFileSync(join(home, 'hang.c'), '#include <unistd.h>\nint main(void){for(;;)pause();}\n');
      execFileSync('gcc', ['-static', '-O2', '-o', join(root, 'init'), join(home, 'hang.c')]);
      process.env.CLADE_HOME = home;
      const digest = 'f'.repeat(64);
      const dir = join(home, 'images', digest);
      mkdirSync(dir, { recursive: true });
      copyFileSync(kernel, join(dir, 'vmlinuz'));
      writeCpio(root, join(dir, 'initramfs.cpio'));
      writeFileSync(join(dir, 'image.json'), JSON.stringify({ digest, name: 'hang', createdAt: new Date().toISOString(), kernel: { package: 'x', version: '0', release: 'x' }, packages: [], agentSha256: '0'.repeat(64), initramfsBytes: 0, kernelBytes: 0, files: 0, recipe: 1 }));
      const t0 = Date.now();
      const err = await Sandbox.create({ image: digest, bootTimeoutMs: 8000 }).catch((e: unknown) => e);
      expect(err).toMatchObject({ code: 'timeout', message: expect.stringMatching(/did not start/) });
      expect(Date.now() - t0).toBeLessThan(20_000);
      const id = /sandbox (sb-[0-9a-f]+)/.exec((err as Error).message)![1]!;
      expect(leftNothing(id)).toBe(true);
      rmSync(memoryDir(), { recursive: true, force: true }); // this throwaway home's RAM directory
    } finally {
      process.env.CLADE_HOME = saved;
      if (saved === undefined) delete process.env.CLADE_HOME;
      rmSync(home, { recursive: true, force: true });
    }
  });
});
