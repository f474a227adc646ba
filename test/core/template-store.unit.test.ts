import { existsSync, mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { listTemplates, readTemplate, removeTemplate, templateFile } from '../../src/core/template-store.js';
import { homePaths } from '../../src/util/home.js';

// Template records read back from disk: checked like a request, and bound to
// their own name, so a file cannot point a template at another snapshot.

const home = mkdtempSync(join(tmpdir(), 'clade-templates-'));
process.env.CLADE_HOME = home;
afterAll(() => rmSync(home, { recursive: true, force: true }));

function record(over: Record<string, unknown> = {}): Record<string, unknown> {
  return { name: 'web', run: ['make'], start: 'serve', ready: 'true', snapshot: 'web', imageDigest: 'a'.repeat(64), engineUsed: 'qemu', createdAt: '2026-01-01T00:00:00.000Z', setupSeconds: 1.5, ...over };
}

function store(content: Record<string, unknown> | string): void {
  mkdirSync(homePaths.templates(), { recursive: true });
  writeFileSync(templateFile('web'), typeof content === 'string' ? content : JSON.stringify(content));
}

describe('template records read from disk', () => {
  it('go on to their snapshot when they pass the schema', () => {
    store(record());
    expect(() => readTemplate('web')).toThrow(/no snapshot "web"/);
  });

  it.each([
    ['another snapshot', { snapshot: 'other' }],
    ['a snapshot name that is a path', { snapshot: '../../x' }],
    ['another template\'s name', { name: 'other' }],
    ['an image digest that is not one', { imageDigest: '../..' }],
    ['an unknown engine', { engineUsed: 'docker' }],
    ['env that is not strings', { env: { A: 1 } }],
    ['a ready command without a start command', { start: undefined }],
    ['a field clade never writes', { extra: true }],
  ])('naming %s are damaged, with how to remove them', (_what, over) => {
    store(record(over));
    expect(() => readTemplate('web')).toThrow(/template web is damaged .*clade template rm web/);
    expect(listTemplates()).toEqual([]);
  });

  it('that are not JSON are damaged too, and can be removed', () => {
    store('{"name":');
    expect(() => readTemplate('web')).toThrow(/template web is damaged/);
    removeTemplate('web');
    expect(existsSync(templateFile('web'))).toBe(false);
  });
});
