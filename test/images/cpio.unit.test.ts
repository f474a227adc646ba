import { execFileSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { writeCpio } from '../../src/images/cpio.js';

const dir = mkdtempSync(join(tmpdir(), 'clade-cpio-test-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('cpio writer', () => {
  it('writes a newc archive that cpio extracts identically, and the same bytes twice', () => {
    const src = join(dir, 'src');
    mkdirSync(join(src, 'usr/bin'), { recursive: true });
    writeFileSync(join(src, 'usr/bin/tool'), 'abc', { mode: 0o755 });
    writeFileSync(join(src, 'odd'), Buffer.alloc(4099, 7));
    symlinkSync('usr/bin', join(src, 'bin'));
    writeCpio(src, join(dir, 'a.cpio'));
    writeCpio(src, join(dir, 'b.cpio'));
    expect(readFileSync(join(dir, 'a.cpio')).equals(readFileSync(join(dir, 'b.cpio')))).toBe(true);
    const listing = execFileSync('cpio', ['-it', '--quiet'], { input: readFileSync(join(dir, 'a.cpio')) }).toString().trim().split('\n');
    expect(listing).toEqual(['bin', 'odd', 'usr', 'usr/bin', 'usr/bin/tool']);
    const out = join(dir, 'out');
    mkdirSync(out);
    execFileSync('cpio', ['-id', '--quiet'], { input: readFileSync(join(dir, 'a.cpio')), cwd: out });
    expect(readFileSync(join(out, 'usr/bin/tool'), 'utf8')).toBe('abc');
    expect(readFileSync(join(out, 'bin/tool'), 'utf8')).toBe('abc');
    expect(readFileSync(join(out, 'odd')).length).toBe(4099);
  });
});
