import { CladeError } from '../util/errors.js';
import { FRAME_MAGIC, HEADER_SIZE, MAX_PAYLOAD, TOKEN_SIZE } from './constants.js';

export type Frame = { type: number; id: number; payload: Buffer };

/** Encodes a host → guest frame: header, the sandbox token, then the body. */
export function encodeHostFrame(type: number, id: number, token: Buffer, body: Buffer = Buffer.alloc(0)): Buffer {
  if (token.length !== TOKEN_SIZE) throw new CladeError('internal', `agent token must be ${TOKEN_SIZE} bytes`);
  const length = TOKEN_SIZE + body.length;
  if (length > MAX_PAYLOAD) throw new CladeError('too_large', `message of ${length} bytes exceeds the ${MAX_PAYLOAD}-byte frame limit`);
  return Buffer.concat([encodeHeader(type, id, length), token, body]);
}

/** Encodes a guest → host frame (tests use it to play the agent's part). */
export function encodeGuestFrame(type: number, id: number, body: Buffer = Buffer.alloc(0)): Buffer {
  return Buffer.concat([encodeHeader(type, id, body.length), body]);
}

export function encodeHeader(type: number, id: number, length: number): Buffer {
  const head = Buffer.alloc(HEADER_SIZE);
  head.writeUInt32LE(FRAME_MAGIC, 0);
  head.writeUInt8(type, 4);
  head.writeUInt32LE(id >>> 0, 8);
  head.writeUInt32LE(length >>> 0, 12);
  return head;
}

export type DecoderEvents = {
  frame: (frame: Frame) => void;
  /** The peer broke the framing; the decoder has skipped past the damage. */
  violation: (kind: 'bad_magic' | 'too_large', id: number, detail: string) => void;
};

const MAGIC_BYTES = (() => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(FRAME_MAGIC, 0);
  return b;
})();

/**
 * Incremental decoder for the byte stream from the guest. Linear in the bytes
 * pushed, however they are split: a header collects in a fixed 16-byte buffer,
 * a payload is copied once into a buffer of its announced size. It never holds
 * more than one frame of at most MAX_PAYLOAD bytes: an oversized frame is
 * skipped without being stored, and garbage is skipped up to the next magic.
 */
export class FrameDecoder {
  private readonly header = Buffer.alloc(HEADER_SIZE);
  private headerHave = 0;
  /** The frame whose payload is being collected. */
  private body?: { type: number; id: number; payload: Buffer; have: number };
  private skipRemaining = 0;
  /** A run of garbage is reported once, not once per chunk. */
  private inGarbage = false;

  constructor(private readonly events: DecoderEvents) {}

  push(chunk: Buffer): void {
    let off = 0;
    while (off < chunk.length) {
      if (this.skipRemaining > 0) {
        const n = Math.min(this.skipRemaining, chunk.length - off);
        this.skipRemaining -= n;
        off += n;
      } else if (this.body) {
        off += this.fillBody(chunk, off);
      } else {
        off += this.fillHeader(chunk, off);
      }
    }
  }

  /** Bytes held while waiting for the rest of a frame. */
  get pending(): number {
    return this.headerHave + (this.body?.have ?? 0);
  }

  private fillHeader(chunk: Buffer, off: number): number {
    let i = off;
    while (i < chunk.length && this.headerHave < HEADER_SIZE) {
      const byte = chunk[i++]!;
      if (this.headerHave < 4 && byte !== MAGIC_BYTES[this.headerHave]) {
        this.garbage();
        // The byte that broke the magic may itself start the next one.
        this.headerHave = byte === MAGIC_BYTES[0] ? 1 : 0;
        if (this.headerHave === 1) this.header[0] = byte;
        continue;
      }
      this.header[this.headerHave++] = byte;
    }
    if (this.headerHave === HEADER_SIZE) this.headerDone();
    return i - off;
  }

  private headerDone(): void {
    this.headerHave = 0;
    this.endGarbage();
    const type = this.header.readUInt8(4);
    const id = this.header.readUInt32LE(8);
    const length = this.header.readUInt32LE(12);
    if (length > MAX_PAYLOAD) {
      this.skipRemaining = length;
      this.events.violation('too_large', id, `frame of ${length} bytes exceeds the ${MAX_PAYLOAD}-byte limit`);
      return;
    }
    if (length === 0) {
      this.events.frame({ type, id, payload: Buffer.alloc(0) });
      return;
    }
    this.body = { type, id, payload: Buffer.allocUnsafe(length), have: 0 };
  }

  private fillBody(chunk: Buffer, off: number): number {
    const body = this.body!;
    const n = Math.min(body.payload.length - body.have, chunk.length - off);
    chunk.copy(body.payload, body.have, off, off + n);
    body.have += n;
    if (body.have === body.payload.length) {
      this.body = undefined;
      this.events.frame({ type: body.type, id: body.id, payload: body.payload });
    }
    return n;
  }

  private garbage(): void {
    if (this.inGarbage) return;
    this.inGarbage = true;
    this.events.violation('bad_magic', 0, 'skipping bytes that are not a frame');
  }

  private endGarbage(): void {
    this.inGarbage = false;
  }
}
