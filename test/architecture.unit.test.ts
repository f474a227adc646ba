import { readdirSync, readFileSync } from 'node:fs';
import { dirname, join, relative, resolve } from 'node:path';
import { describe, expect, it } from 'vitest';

// The layers of src/ and the only directions their imports may go
// (docs/architecture.md). Type-only imports count too: a layer that needs a
// type from above it is in the wrong place.
const SRC = resolve(import.meta.dirname, '../src');
const MAY_IMPORT: Record<string, string[]> = {
  util: [],
  wire: ['util'],
  'agent-protocol': ['util'],
  images: ['util', 'wire'],
  engines: ['util', 'images'],
  core: ['util', 'engines', 'agent-protocol', 'images', 'wire'],
  sdk: ['util', 'core', 'wire'],
  api: ['util', 'core', 'wire'],
  e2b: ['util', 'core', 'wire', 'api'],
  mcp: ['util', 'core', 'wire', 'api', 'sdk'],
  runner: ['util', 'images', 'engines'],
  bench: ['util', 'sdk', 'core', 'engines', 'runner', 'wire'],
  cli: ['util', 'sdk', 'api', 'bench', 'runner', 'images', 'core', 'engines', 'wire', 'e2b', 'mcp'],
};

function sources(dir: string): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) => (e.isDirectory() ? sources(join(dir, e.name)) : e.name.endsWith('.ts') ? [join(dir, e.name)] : []));
}

/** Relative imports and re-exports of a file, resolved to source paths. */
function importsOf(file: string): string[] {
  const text = readFileSync(file, 'utf8');
  const specs = [...text.matchAll(/(?:^|\n)\s*(?:import|export)\b[^'"`;]*?from\s+['"](\.{1,2}\/[^'"]+)['"]/g), ...text.matchAll(/import\(\s*['"](\.{1,2}\/[^'"]+)['"]\s*\)/g)].map((m) => m[1]!);
  return specs.map((s) => resolve(dirname(file), s.replace(/\.js$/, '.ts')));
}

const layerOf = (file: string) => relative(SRC, file).split('/')[0]!;
const graph = new Map(sources(SRC).map((f) => [f, importsOf(f)]));

describe('architecture', () => {
  it('has no import cycle in src/', () => {
    const cycles: string[] = [];
    const state = new Map<string, 'open' | 'done'>();
    const path: string[] = [];
    const visit = (f: string) => {
      if (state.get(f) === 'done') return;
      if (state.get(f) === 'open') {
        cycles.push(path.slice(path.indexOf(f)).concat(f).map((p) => relative(SRC, p)).join(' → '));
        return;
      }
      state.set(f, 'open');
      path.push(f);
      for (const dep of graph.get(f) ?? []) visit(dep);
      path.pop();
      state.set(f, 'done');
    };
    for (const f of graph.keys()) visit(f);
    expect(cycles).toEqual([]);
  });

  it('imports only go one way between layers', () => {
    const wrong: string[] = [];
    for (const [file, deps] of graph) {
      const from = layerOf(file);
      expect(Object.keys(MAY_IMPORT), `${relative(SRC, file)} is in no known layer`).toContain(from);
      for (const dep of deps) {
        const to = layerOf(dep);
        if (to !== from && !MAY_IMPORT[from]!.includes(to)) wrong.push(`${relative(SRC, file)} → ${relative(SRC, dep)}`);
      }
    }
    expect(wrong).toEqual([]);
  });

  it('every import resolves to a source file', () => {
    const missing = [...graph].flatMap(([file, deps]) => deps.filter((d) => !graph.has(d)).map((d) => `${relative(SRC, file)} → ${relative(SRC, d)}`));
    expect(missing).toEqual([]);
  });
});
