import { createHash, randomBytes } from 'node:crypto';
import { constants, rmSync } from 'node:fs';
import { open } from 'node:fs/promises';
import { join } from 'node:path';
import { ensureMemoryDir } from '../../util/home.js';
import type { MachineShape } from '../engine.js';

/**
 * A frozen machine on the qemu engine: its RAM file (no VM writes it any
 * more) and its device state. VMs resumed from it map the file copy-on-write
 * and hold a reference; a fork's frozen RAM is deleted when the last of them
 * is gone, a persistent snapshot's never.
 */
export class FrozenRam {
  private refs = 0;

  constructor(
    readonly memoryFile: string,
    readonly state: Buffer,
    readonly shape: MachineShape,
    /** Persistent snapshots' files belong to the snapshot store, not to the VMs that map them. */
    readonly persistent: boolean,
    /** A persistent snapshot's checked memory.raw, open: VMs map it through this descriptor, not by name. */
    readonly memoryFd?: number,
  ) {}

  retain(): void {
    this.refs++;
  }

  release(): void {
    this.refs--;
    if (this.refs <= 0 && !this.persistent) rmSync(this.memoryFile, { force: true });
  }
}

/** A tmpfs path for a fork's frozen RAM; the owner pid in the name lets reapers find strays. */
export function transientMemoryPath(): string {
  return join(ensureMemoryDir(), `snap-${process.pid}-${randomBytes(6).toString('hex')}.mem`);
}

const CHUNK = 1 << 20;
const ZERO_CHUNK = Buffer.alloc(CHUNK);

/** Copies a frozen RAM file, skipping all-zero chunks so the copy stays sparse, and hashes it on the way, without blocking the event loop. */
export async function copySparseHashed(src: string, dest: string): Promise<{ sha256: string; bytes: number }> {
  const hash = createHash('sha256');
  const input = await open(src, constants.O_RDONLY | constants.O_NOFOLLOW);
  const output = await open(dest, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
  const buf = Buffer.alloc(CHUNK);
  let off = 0;
  try {
    const size = (await input.stat()).size;
    while (off < size) {
      const { bytesRead } = await input.read(buf, 0, CHUNK, off);
      if (bytesRead === 0) break;
      const chunk = buf.subarray(0, bytesRead);
      hash.update(chunk);
      if (!chunk.equals(ZERO_CHUNK.subarray(0, bytesRead))) await output.write(chunk, 0, bytesRead, off);
      off += bytesRead;
    }
    await output.truncate(size);
  } finally {
    await input.close();
    await output.close();
  }
  return { sha256: hash.digest('hex'), bytes: off };
}
