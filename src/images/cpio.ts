import { closeSync, lstatSync, openSync, readdirSync, readlinkSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';

/**
 * Writes a directory tree as a "newc" cpio archive, the format the Linux kernel
 * unpacks as an initramfs. Entries are sorted and owner/time fields fixed, so the
 * same tree always gives the same bytes: image digests stay reproducible.
 */
export function writeCpio(rootDir: string, outFile: string, onFile?: (count: number) => void): { files: number; bytes: number } {
  const fd = openSync(outFile, 'w', 0o600); // it holds the image's copied host files: its owner's to read
  let written = 0;
  let files = 0;
  let ino = 1;
  const out = (buf: Buffer) => {
    writeSync(fd, buf);
    written += buf.length;
  };
  const pad = () => {
    const rem = written % 4;
    if (rem) out(Buffer.alloc(4 - rem));
  };
  const entry = (name: string, mode: number, size: number, body: (() => void) | Buffer | undefined) => {
    const nameBuf = Buffer.from(name + '\0');
    const fields = [ino++, mode, 0, 0, 1, 0, size, 0, 0, 0, 0, nameBuf.length, 0];
    out(Buffer.from('070701' + fields.map((f) => f.toString(16).padStart(8, '0')).join(''), 'ascii'));
    out(nameBuf);
    pad();
    if (Buffer.isBuffer(body)) out(body);
    else body?.();
    pad();
  };
  const copyFile = (path: string) => () => {
    const src = openSync(path, 'r');
    const chunk = Buffer.allocUnsafe(1 << 20);
    try {
      for (;;) {
        const n = readSync(src, chunk, 0, chunk.length, null);
        if (n === 0) break;
        out(chunk.subarray(0, n));
      }
    } finally {
      closeSync(src);
    }
  };
  const walk = (rel: string) => {
    const names = readdirSync(join(rootDir, rel)).sort();
    for (const name of names) {
      const relPath = rel ? `${rel}/${name}` : name;
      const abs = join(rootDir, relPath);
      const st = lstatSync(abs);
      const perm = st.mode & 0o7777;
      if (st.isSymbolicLink()) {
        const target = Buffer.from(readlinkSync(abs));
        entry(relPath, 0o120000 | 0o777, target.length, target);
      } else if (st.isDirectory()) {
        entry(relPath, 0o040000 | perm, 0, undefined);
        walk(relPath);
      } else if (st.isFile()) {
        entry(relPath, 0o100000 | perm, st.size, copyFile(abs));
      }
      files++;
      if (onFile && files % 500 === 0) onFile(files);
    }
  };
  try {
    walk('');
    entry('TRAILER!!!', 0, 0, undefined);
  } finally {
    closeSync(fd);
  }
  return { files, bytes: written };
}
