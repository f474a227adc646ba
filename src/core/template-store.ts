import { existsSync, readdirSync, readFileSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { Static } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import type { EngineName } from '../engines/engine.js';
import { CladeError } from '../util/errors.js';
import { ensurePrivateDir, homePaths } from '../util/home.js';
import { TemplateBody } from '../wire/schemas.js';
import { readSnapshotMeta, removeSnapshot, validateTag } from './snapshots.js';

// A template is a snapshot taken after setup (templates.ts makes one). The
// snapshot has the template's name as its tag; the record beside it
// (templates/<name>.json) keeps how it was made, for `template ls`.

/** A template's recipe: the daemon's request body, one schema for the file, the SDK and the API. */
const TemplateSpecSchema = TemplateBody;
export type TemplateSpec = Static<typeof TemplateSpecSchema>;

/** What `template ls` shows: the spec, the snapshot's image and engine, and when it was made. */
export type TemplateInfo = TemplateSpec & { snapshot: string; imageDigest: string; engineUsed: EngineName; createdAt: string; setupSeconds: number };

export function templateFile(name: string): string {
  return join(homePaths.templates(), `${name}.json`);
}

/** Checks a spec's shape and the rules between its fields, naming the first problem. */
export function checkTemplateSpec(raw: unknown): TemplateSpec {
  if (!Value.Check(TemplateSpecSchema, raw)) {
    const first = [...Value.Errors(TemplateSpecSchema, raw)][0];
    throw new CladeError('bad_request', `the template is not valid: ${first ? `${first.path || '/'}: ${first.message}` : 'expected { name, image, run, code, start, ready }'}`);
  }
  if (raw.ready && !raw.start) throw new CladeError('bad_request', 'a ready command checks the start command; give a start command too');
  return raw;
}

/** Writes a template's record atomically (mode 0600). */
export function writeTemplate(info: TemplateInfo): void {
  ensurePrivateDir(homePaths.templates());
  const tmp = `${templateFile(info.name)}.tmp-${process.pid}`;
  writeFileSync(tmp, JSON.stringify(info, null, 2) + '\n', { mode: 0o600 });
  renameSync(tmp, templateFile(info.name));
}

/** The template's record; `not_found` names how to list them. */
/** True when `name` is a valid template name and such a template is stored (whether or not its snapshot is intact). */
export function templateExists(name: string): boolean {
  try {
    validateTag(name);
  } catch {
    return false;
  }
  return existsSync(templateFile(name));
}

export function readTemplate(name: string): TemplateInfo {
  validateTag(name);
  const file = templateFile(name);
  if (!existsSync(file)) throw new CladeError('not_found', `no template ${JSON.stringify(name)}; see \`clade template ls\` or make it with \`clade template create ${name} --run ...\``);
  const info = JSON.parse(readFileSync(file, 'utf8')) as TemplateInfo;
  readSnapshotMeta(info.snapshot); // its snapshot must still be there and signed
  return info;
}

export function listTemplates(): TemplateInfo[] {
  if (!existsSync(homePaths.templates())) return [];
  const out: TemplateInfo[] = [];
  for (const f of readdirSync(homePaths.templates()).sort()) {
    const m = /^(.+)\.json$/.exec(f);
    if (!m) continue;
    try {
      out.push(readTemplate(m[1]!));
    } catch {
      // A record whose snapshot is gone or damaged is not a usable template.
    }
  }
  return out;
}

/** Removes the template's record and its snapshot; a snapshot that others were made from is refused with `conflict`. */
export function removeTemplate(name: string): void {
  validateTag(name);
  if (!existsSync(templateFile(name))) throw new CladeError('not_found', `no template ${JSON.stringify(name)}; see \`clade template ls\``);
  // Snapshots taken of its sandboxes descend from it: refused (naming them) rather than deleted along.
  if (existsSync(join(homePaths.snapshots(), name))) removeSnapshot(name);
  rmSync(templateFile(name), { force: true });
}
