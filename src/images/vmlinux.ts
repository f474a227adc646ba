import { execFile } from 'node:child_process';
import { existsSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CladeError, errorMessage } from '../util/errors.js';
import type { ResolvedImage } from './store.js';

const run = promisify(execFile);
const ZSTD_MAGIC = Buffer.from([0x28, 0xb5, 0x2f, 0xfd]);
const ELF_MAGIC = Buffer.from([0x7f, 0x45, 0x4c, 0x46]);

/**
 * The kernel of an image as the uncompressed ELF `vmlinux`, whose PVH entry
 * note clade-vmm boots (it has no decompressor of its own, and running the
 * kernel's would cost seconds of guest time under nested virtualization).
 * Extracted once from the bzImage's zstd payload and kept beside it.
 */
export async function ensureVmlinux(image: ResolvedImage): Promise<string> {
  const target = join(image.dir, 'vmlinux');
  if (existsSync(target)) return target;
  const payload = bzImagePayload(readFileSync(image.kernel));
  const tmp = `${target}.${process.pid}.tmp`;
  try {
    writeFileSync(`${tmp}.zst`, payload);
    await run('zstd', ['-d', '-q', '-f', `${tmp}.zst`, '-o', tmp]);
    if (!readFileSync(tmp).subarray(0, 4).equals(ELF_MAGIC)) throw new CladeError('internal', 'the decompressed kernel is not an ELF file');
    renameSync(tmp, target);
    return target;
  } catch (err) {
    if (err instanceof CladeError) throw err;
    const missing = (err as NodeJS.ErrnoException).code === 'ENOENT';
    throw new CladeError('internal', missing ? 'extracting vmlinux needs the zstd program: apt-get install zstd (or run `npm run setup`)' : `could not extract vmlinux from ${image.kernel}: ${errorMessage(err)}`, { cause: err });
  } finally {
    rmSync(tmp, { force: true });
    rmSync(`${tmp}.zst`, { force: true });
  }
}

/**
 * The compressed kernel inside a bzImage: the setup header gives where the
 * protected-mode part starts (setup_sects) and, from there, the payload's
 * offset and length; the last 4 bytes of the payload are its uncompressed size,
 * not part of the zstd frame.
 */
export function bzImagePayload(bz: Buffer): Buffer {
  if (bz.length < 0x260 || bz.toString('latin1', 0x202, 0x206) !== 'HdrS') throw new CladeError('bad_request', 'not a bzImage: no "HdrS" setup header');
  const setupSects = bz[0x1f1] || 4;
  const protectedStart = (setupSects + 1) * 512;
  const offset = protectedStart + bz.readUInt32LE(0x248);
  const length = bz.readUInt32LE(0x24c);
  if (length < 8 || offset + length > bz.length) throw new CladeError('bad_request', 'bzImage payload lies outside the file');
  const payload = bz.subarray(offset, offset + length - 4);
  if (!payload.subarray(0, 4).equals(ZSTD_MAGIC)) throw new CladeError('unavailable', 'this kernel is not zstd-compressed; clade-vmm boots zstd bzImages (Debian 6.12 kernels are)');
  return payload;
}
