import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { packageRoot } from '../util/paths.js';

/**
 * The agent protocol's numbers live in one file, protocol.json; the C agent,
 * the TypeScript host and the Python test client use copies generated from
 * it. `npm run protocol` writes them; test/agent-protocol/protocol.unit.test.ts
 * fails when a copy is stale.
 */
type ProtocolTable = {
  version: number;
  magic: string;
  headerBytes: number;
  tokenBytes: number;
  maxPayloadBytes: number;
  messages: Record<string, number>;
  tags: Record<string, number>;
  entryTypes: Record<string, number>;
};

const GENERATED = 'Generated from src/agent-protocol/protocol.json by `npm run protocol`: do not edit.';

export function readTable(): ProtocolTable {
  return JSON.parse(readFileSync(join(packageRoot(), 'src', 'agent-protocol', 'protocol.json'), 'utf8')) as ProtocolTable;
}

const hex = (n: number) => `0x${n.toString(16).padStart(2, '0')}`;

function renderC(t: ProtocolTable): string {
  const tags = Object.entries(t.tags);
  const last = tags.reduce((a, b) => (b[1] > a[1] ? b : a))[0];
  return [
    `/* ${GENERATED} */`,
    '#ifndef CLADE_PROTOCOL_H',
    '#define CLADE_PROTOCOL_H',
    '',
    `#define PROTO_VERSION ${t.version}`,
    `#define PROTO_MAGIC "${t.magic}"`,
    `#define HDR_LEN ${t.headerBytes}`,
    `#define TOKEN_LEN ${t.tokenBytes}`,
    `#define FRAME_MAX ${t.maxPayloadBytes}u`,
    '',
    'enum msg_type {',
    ...Object.entries(t.messages).map(([k, v]) => `\tT_${k} = ${hex(v)},`),
    '};',
    '',
    'enum tag {',
    ...tags.map(([k, v]) => `\tF_${k} = ${v},`),
    `\tF_TAG_MAX = F_${last},`,
    '};',
    '',
    'enum entry_type {',
    ...Object.entries(t.entryTypes).map(([k, v]) => `\tE_${k} = ${v},`),
    '};',
    '',
    '#endif',
    '',
  ].join('\n');
}

function renderTs(t: ProtocolTable): string {
  const obj = (name: string, entries: Record<string, number>, asHex: boolean) => [`export const ${name} = {`, ...Object.entries(entries).map(([k, v]) => `  ${k}: ${asHex ? hex(v) : v},`), '} as const;', `export type ${name} = (typeof ${name})[keyof typeof ${name}];`];
  return [
    `// ${GENERATED}`,
    '// docs/protocol.md is the specification.',
    `export const PROTOCOL_VERSION = ${t.version};`,
    `export const FRAME_MAGIC = 0x${Buffer.from(t.magic).readUInt32LE(0).toString(16)}; // "${t.magic}" little-endian`,
    `export const HEADER_SIZE = ${t.headerBytes};`,
    `export const TOKEN_SIZE = ${t.tokenBytes};`,
    `export const MAX_PAYLOAD = ${t.maxPayloadBytes};`,
    '',
    ...obj('MessageType', t.messages, true),
    '',
    ...obj('Tag', t.tags, false),
    '',
    ...obj('EntryType', t.entryTypes, false),
    '',
  ].join('\n');
}

/** Python: message names as they are; a tag whose name is also a message's gets `_TAG` (SIGNAL). */
function renderPy(t: ProtocolTable): string {
  const tagName = (k: string) => (k in t.messages ? `${k}_TAG` : k);
  return [
    `"""${GENERATED}"""`,
    '',
    `PROTO_VERSION = ${t.version}`,
    `MAGIC = b"${t.magic}"`,
    `HDR_LEN = ${t.headerBytes}`,
    `TOKEN_LEN = ${t.tokenBytes}`,
    `FRAME_MAX = ${t.maxPayloadBytes}`,
    '',
    ...Object.entries(t.messages).map(([k, v]) => `${k} = ${hex(v)}`),
    '',
    ...Object.entries(t.tags).map(([k, v]) => `${tagName(k)} = ${v}`),
    '',
  ].join('\n');
}

/** Every generated file, by path relative to the package root, with the content it must have. */
export function renderAll(t = readTable()): Record<string, string> {
  return {
    'native/agent/protocol.h': renderC(t),
    'src/agent-protocol/constants.ts': renderTs(t),
    'native/agent/test/protocol.py': renderPy(t),
  };
}

if (import.meta.url === `file://${process.argv[1]}`) {
  for (const [path, text] of Object.entries(renderAll())) {
    writeFileSync(join(packageRoot(), path), text);
    process.stdout.write(`wrote ${path}\n`);
  }
}
