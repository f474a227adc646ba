import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { readTable, renderAll } from '../../src/agent-protocol/generate.js';
import { packageRoot } from '../../src/util/paths.js';

describe('the protocol table', () => {
  it('every generated copy (C header, TypeScript, Python) matches protocol.json; run `npm run protocol` if not', () => {
    for (const [path, text] of Object.entries(renderAll())) expect(readFileSync(join(packageRoot(), path), 'utf8'), path).toBe(text);
  });

  it('docs/protocol.md gives the same numbers', () => {
    const doc = readFileSync(join(packageRoot(), 'docs', 'protocol.md'), 'utf8');
    const t = readTable();
    const rows = (re: RegExp) => Object.fromEntries([...doc.matchAll(re)].map((m) => [m[2]!, Number(m[1])]));
    expect(rows(/^\| (\d+) \| ([A-Z_]+) \| /gm)).toEqual(t.tags);
    expect(rows(/^\| (0x[0-9a-f]{2}) \| ([A-Z_]+) \| /gm)).toEqual(t.messages);
  });

  it('numbers are unique', () => {
    const t = readTable();
    for (const table of [t.tags, t.messages]) expect(new Set(Object.values(table)).size).toBe(Object.values(table).length);
  });
});
