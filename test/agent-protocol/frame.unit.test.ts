import { describe, expect, it } from 'vitest';
import { FRAME_MAGIC, MAX_PAYLOAD, MessageType, Tag } from '../../src/agent-protocol/constants.js';
import { FieldReader, FieldWriter, parseFields } from '../../src/agent-protocol/fields.js';
import { encodeGuestFrame, encodeHeader, encodeHostFrame, FrameDecoder, type Frame } from '../../src/agent-protocol/frame.js';

function collect() {
  const frames: Frame[] = [];
  const violations: string[] = [];
  const d = new FrameDecoder({ frame: (f) => frames.push(f), violation: (k, id) => violations.push(`${k}:${id}`) });
  return { d, frames, violations };
}

describe('frame codec', () => {
  it('round-trips fields of every kind', () => {
    const body = new FieldWriter().str(Tag.PATH, '/tmp/ü').u64(Tag.SIZE, 2n ** 40n).bytes(Tag.SEED, Buffer.from([0, 1, 2])).fields(Tag.ENTRY, new FieldWriter().str(Tag.NAME, 'x'));
    const r = new FieldReader(body.toBuffer());
    expect(r.str(Tag.PATH)).toBe('/tmp/ü');
    expect(r.u64(Tag.SIZE)).toBe(2 ** 40);
    expect([...r.bytes(Tag.SEED)!]).toEqual([0, 1, 2]);
    expect(new FieldReader(r.all(Tag.ENTRY)[0]!).str(Tag.NAME)).toBe('x');
  });

  it('decodes frames split at every byte boundary', () => {
    const a = encodeGuestFrame(MessageType.OK, 7, new FieldWriter().u64(Tag.PID, 42).toBuffer());
    const b = encodeGuestFrame(MessageType.STDOUT, 7, Buffer.from('hello'));
    const all = Buffer.concat([a, b]);
    const { d, frames } = collect();
    for (let i = 0; i < all.length; i++) d.push(all.subarray(i, i + 1));
    expect(frames.map((f) => [f.type, f.id])).toEqual([[MessageType.OK, 7], [MessageType.STDOUT, 7]]);
    expect(frames[1]!.payload.toString()).toBe('hello');
  });

  it('skips garbage up to the next magic', () => {
    const { d, frames, violations } = collect();
    d.push(Buffer.concat([Buffer.from('garbage!'), encodeGuestFrame(MessageType.OK, 1)]));
    expect(frames).toHaveLength(1);
    expect(violations[0]).toMatch(/^bad_magic/);
  });

  it('skips an oversized frame without buffering it and keeps decoding', () => {
    const { d, frames, violations } = collect();
    d.push(encodeHeader(MessageType.STDOUT, 9, MAX_PAYLOAD + 1));
    const chunk = Buffer.alloc(64 * 1024);
    for (let sent = 0; sent <= MAX_PAYLOAD; sent += chunk.length) {
      d.push(chunk.subarray(0, Math.min(chunk.length, MAX_PAYLOAD + 1 - sent)));
      expect(d.pending).toBeLessThan(16);
    }
    d.push(encodeGuestFrame(MessageType.OK, 10));
    expect(violations).toEqual(['too_large:9']);
    expect(frames.map((f) => f.id)).toEqual([10]);
  });

  it('reassembles a maximal frame pushed one byte at a time in linear time', () => {
    const frame = encodeGuestFrame(MessageType.STDOUT, 5, Buffer.alloc(MAX_PAYLOAD, 0x41));
    const { d, frames } = collect();
    const t0 = performance.now();
    for (let i = 0; i < frame.length; i++) d.push(frame.subarray(i, i + 1));
    const ms = performance.now() - t0;
    expect(frames).toHaveLength(1);
    expect(frames[0]!.payload.length).toBe(MAX_PAYLOAD);
    // Copying the growing frame at every byte (quadratic) would take minutes.
    expect(ms).toBeLessThan(5000);
  });

  it('puts the token first in host frames and refuses oversized bodies', () => {
    const token = Buffer.alloc(32, 0xab);
    const f = encodeHostFrame(MessageType.HELLO, 3, token);
    expect(f.readUInt32LE(0)).toBe(FRAME_MAGIC);
    expect(f.readUInt32LE(12)).toBe(32);
    expect(f.subarray(16).equals(token)).toBe(true);
    expect(() => encodeHostFrame(MessageType.WRITE_DATA, 1, token, Buffer.alloc(MAX_PAYLOAD))).toThrow(/frame limit/);
  });

  it('rejects fields that run past the frame or u64s of the wrong size', () => {
    const bad = Buffer.from([1, 0, 10, 0, 0, 0, 1, 2]);
    expect(() => parseFields(bad)).toThrow(/longer than its frame/);
    const short = new FieldWriter().bytes(Tag.SIZE, Buffer.alloc(4)).toBuffer();
    expect(() => new FieldReader(short).u64(Tag.SIZE)).toThrow(/expected 8/);
    expect(() => new FieldWriter().str(Tag.PATH, 'a\0b')).toThrow(/NUL/);
  });
});
