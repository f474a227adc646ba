import { existsSync, readdirSync, renameSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Type, type Static } from '@sinclair/typebox';
import { Value } from '@sinclair/typebox/value';
import type { EngineName } from '../engines/engine.js';
import { CladeError } from '../util/errors.js';
import { ensurePrivateDir, homePaths } from '../util/home.js';
import { readCheckedJson } from '../util/json-file.js';
import { TemplateBody } from '../wire/schemas.js';
import { readSnapshotMeta, removeSnapshot, TAG_PATTERN, validateTag } from './snapshots.js';

// A template is a snapshot taken after setup (templates.ts makes one). The
// snapshot has the template's name as its tag; the record beside it
// (templates/<name>.json) keeps how it was made, for `template ls`.

/** A template's recipe: the daemon's request body, one schema for the file, the SDK and the API. */
const TemplateSpecSchema = TemplateBody;
export type TemplateSpec = Static<typeof TemplateSpecSchema>;

/** What `template ls` shows: the spec, the snapshot's image and engine, and when it was made. */
export type TemplateInfo = TemplateSpec & { snapshot: string; imageDigest: string; engineUsed: EngineName; createdAt: string; setupSeconds: number };

/**
 * templates/<name>.json as read back: every field checked like a request, and
 * its name and snapshot must be the name of the file, so a record cannot point
 * a template at another snapshot.
 */
const TemplateRecordSchema = Type.Object(
  {
    ...TemplateBody.properties,
    snapshot: Type.String({ pattern: TAG_PATTERN }),
    imageDigest: Type.String({ pattern: '^[0-9a-f]{64}$' }),
    engineUsed: Type.Union([Type.Literal('qemu'), Type.Literal('vmm')]),
    createdAt: Type.String({ maxLength: 64 }),
    setupSeconds: Type.Number({ minimum: 0 }),
  },
  { additionalProperties: false },
);

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

/** True when `name` is a valid template name and such a template is stored (whether or not its snapshot is intact). */
export function templateExists(name: string): boolean {
  try {
    validateTag(name);
  } catch {
    return false;
  }
  return existsSync(templateFile(name));
}

/** The template's record, checked; `not_found` names how to list them, `integrity` how to remove a damaged one. */
export function readTemplate(name: string): TemplateInfo {
  validateTag(name);
  const file = templateFile(name);
  if (!existsSync(file)) throw new CladeError('not_found', `no template ${JSON.stringify(name)}; see \`clade template ls\` or make it with \`clade template create ${name} --run ...\``);
  const info = checkTemplateRecord(name, file);
  readSnapshotMeta(info.snapshot); // its snapshot must still be there and signed
  return info;
}

function checkTemplateRecord(name: string, file: string): TemplateInfo {
  const damaged = (why: string) => new CladeError('integrity', `template ${name} is damaged (${file}: ${why}); remove it with \`clade template rm ${name}\` and create it again`);
  const read = readCheckedJson(file, TemplateRecordSchema);
  if ('problem' in read) throw damaged(read.problem);
  const info = read.value;
  if (info.name !== name || info.snapshot !== name) throw damaged('it names another template or snapshot');
  if (info.ready && !info.start) throw damaged('a ready command without a start command');
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
