import { closeSync, constants, existsSync, fsyncSync, openSync, readdirSync, readSync, renameSync, rmSync, writeSync } from 'node:fs';
import { basename, join } from 'node:path';
import { validSandboxRecord, type SandboxRecord } from '../core/records.js';
import { ensurePrivateDir } from '../util/home.js';

export type { SandboxRecord } from '../core/records.js';

/** One JSON file per sandbox, each replaced atomically so a crash never leaves half a record. */
export class StateStore {
  private readonly dir: string;

  constructor(stateDir: string) {
    this.dir = ensurePrivateDir(join(stateDir, 'sandboxes'));
  }

  save(rec: SandboxRecord): void {
    writeAtomic(join(this.dir, `${rec.id}.json`), JSON.stringify(rec, null, 2) + '\n');
  }

  remove(id: string): void {
    rmSync(join(this.dir, `${id}.json`), { force: true });
  }

  /** Every valid record; invalid ones are removed (and reported), since nothing in them can be trusted. */
  loadAll(onInvalid: (file: string) => void = () => undefined): SandboxRecord[] {
    const out: SandboxRecord[] = [];
    for (const f of readdirSync(this.dir)) {
      const path = join(this.dir, f);
      if (!f.endsWith('.json')) {
        rmSync(path, { force: true }); // a temp file from a write that never finished
        continue;
      }
      let rec: SandboxRecord | undefined;
      try {
        rec = validSandboxRecord(JSON.parse(readNoFollow(path)));
      } catch {
        rec = undefined;
      }
      if (rec && f === `${rec.id}.json`) out.push(rec);
      else {
        onInvalid(f);
        rmSync(path, { force: true });
      }
    }
    return out;
  }

  has(id: string): boolean {
    return existsSync(join(this.dir, `${id}.json`));
  }
}

/** write temp + fsync + rename + fsync of the directory: the file is either the old or the new one. */
export function writeAtomic(path: string, data: string): void {
  const tmp = join(path, '..', `.${basename(path)}.${process.pid}.tmp`);
  const fd = openSync(tmp, 'w', 0o600);
  try {
    writeSync(fd, data);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  renameSync(tmp, path);
  const dirFd = openSync(join(path, '..'), 'r');
  try {
    fsyncSync(dirFd);
  } finally {
    closeSync(dirFd);
  }
}

/** Records are small; one bigger than this, or a symlink in their place, is not ours. */
function readNoFollow(path: string): string {
  const fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  try {
    const buf = Buffer.alloc(4 << 20);
    let n = 0;
    for (let got = 1; got > 0 && n < buf.length; n += got) got = readSyncSafe(fd, buf, n);
    if (n >= buf.length) throw new Error('record too large');
    return buf.toString('utf8', 0, n);
  } finally {
    closeSync(fd);
  }
}

function readSyncSafe(fd: number, buf: Buffer, at: number): number {
  return readSync(fd, buf, at, buf.length - at, null);
}
