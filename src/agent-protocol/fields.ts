import { CladeError } from '../util/errors.js';
import { Tag } from './constants.js';

/**
 * A field list: the body of most messages (docs/protocol.md, "Frame").
 * Values are kept as raw bytes; typed getters decode them on demand and
 * reject values of the wrong shape, because the guest is not trusted.
 */
export type Field = { tag: number; value: Buffer };

export class FieldWriter {
  private parts: Buffer[] = [];

  bytes(tag: Tag, value: Buffer): this {
    const head = Buffer.alloc(6);
    head.writeUInt16LE(tag, 0);
    head.writeUInt32LE(value.length, 2);
    this.parts.push(head, value);
    return this;
  }

  str(tag: Tag, value: string): this {
    if (value.includes('\0')) throw new CladeError('bad_request', `text may not contain NUL bytes: ${JSON.stringify(value.slice(0, 80))}`);
    return this.bytes(tag, Buffer.from(value, 'utf8'));
  }

  u64(tag: Tag, value: number | bigint): this {
    const buf = Buffer.alloc(8);
    buf.writeBigUInt64LE(BigInt.asUintN(64, BigInt(value)));
    return this.bytes(tag, buf);
  }

  fields(tag: Tag, nested: FieldWriter): this {
    return this.bytes(tag, nested.toBuffer());
  }

  toBuffer(): Buffer {
    return Buffer.concat(this.parts);
  }
}

export function parseFields(body: Buffer): Field[] {
  const fields: Field[] = [];
  let off = 0;
  while (off < body.length) {
    if (body.length - off < 6) throw new CladeError('protocol_error', 'agent sent a field header cut short');
    const tag = body.readUInt16LE(off);
    const len = body.readUInt32LE(off + 2);
    off += 6;
    if (len > body.length - off) throw new CladeError('protocol_error', `agent sent field ${tag} longer than its frame`);
    fields.push({ tag, value: body.subarray(off, off + len) });
    off += len;
  }
  return fields;
}

/** Read access to a parsed field list with strict, typed getters. */
export class FieldReader {
  readonly fields: Field[];

  constructor(body: Buffer | Field[]) {
    this.fields = Array.isArray(body) ? body : parseFields(body);
  }

  has(tag: Tag): boolean {
    return this.fields.some((f) => f.tag === tag);
  }

  bytes(tag: Tag): Buffer | undefined {
    return this.fields.find((f) => f.tag === tag)?.value;
  }

  str(tag: Tag): string | undefined {
    const v = this.bytes(tag);
    return v === undefined ? undefined : v.toString('utf8');
  }

  u64(tag: Tag): number | undefined {
    const v = this.bytes(tag);
    if (v === undefined) return undefined;
    if (v.length !== 8) throw new CladeError('protocol_error', `agent sent field ${tag} as ${v.length} bytes, expected 8`);
    return Number(v.readBigUInt64LE());
  }

  i64(tag: Tag): number | undefined {
    const v = this.bytes(tag);
    if (v === undefined) return undefined;
    if (v.length !== 8) throw new CladeError('protocol_error', `agent sent field ${tag} as ${v.length} bytes, expected 8`);
    return Number(v.readBigInt64LE());
  }

  all(tag: Tag): Buffer[] {
    return this.fields.filter((f) => f.tag === tag).map((f) => f.value);
  }
}
