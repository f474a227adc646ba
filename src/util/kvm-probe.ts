import { execFile } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { packageRoot } from './paths.js';

const run = promisify(execFile);

export type KvmProbe = { usable: boolean; nsPerIteration: number; reason: string; tscKhz?: number };
export type Accelerator = 'kvm' | 'tcg';

let cached: Promise<KvmProbe> | undefined;

/**
 * Asks native/kvm-probe whether /dev/kvm runs guest kernel code at hardware
 * speed. A /dev/kvm that only emulates CPL0 would let QEMU start and then take
 * minutes to boot Linux, so its mere presence proves nothing.
 */
export function probeKvm(): Promise<KvmProbe> {
  cached ??= (async () => {
    const probe = join(packageRoot(), 'native', 'kvm-probe', 'build', 'kvm-probe');
    if (!existsSync(probe)) {
      try {
        await run('make', ['-s', '-C', join(packageRoot(), 'native', 'kvm-probe')]);
      } catch {
        return { usable: false, nsPerIteration: 0, reason: 'kvm-probe is not built (run `make -C native/kvm-probe`)' };
      }
    }
    try {
      const { stdout } = await run(probe, [], { timeout: 10_000 });
      const result = JSON.parse(stdout) as KvmProbe;
      if (process.env.CLADE_ACCEL === 'tcg') return { ...result, usable: false, reason: 'CLADE_ACCEL=tcg forces emulation' };
      return result;
    } catch (err) {
      return { usable: false, nsPerIteration: 0, reason: `kvm-probe failed: ${(err as Error).message}` };
    }
  })();
  return cached;
}

export async function pickAccelerator(): Promise<Accelerator> {
  return (await probeKvm()).usable ? 'kvm' : 'tcg';
}
