import { CladeError } from '../core/errors.js';
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

/**
 * Incremental decoder for the byte stream from the guest. It never buffers more
 * than one frame of at most MAX_PAYLOAD bytes: an oversized frame is skipped
 * without being stored, and garbage is skipped up to the next magic.
 */
export class FrameDecoder {
  private buf: Buffer = Buffer.alloc(0);
  private skipRemaining = 0;

  constructor(private readonly events: DecoderEvents) {}

  push(chunk: Buffer): void {
    this.buf = this.buf.length === 0 ? chunk : Buffer.concat([this.buf, chunk]);
    for (;;) {
      if (this.skipRemaining > 0) {
        const n = Math.min(this.skipRemaining, this.buf.length);
        this.skipRemaining -= n;
        this.buf = this.buf.subarray(n);
        if (this.skipRemaining > 0) return;
      }
      if (this.buf.length < HEADER_SIZE) return;
      if (this.buf.readUInt32LE(0) !== FRAME_MAGIC) {
        this.resync();
        continue;
      }
      const type = this.buf.readUInt8(4);
      const id = this.buf.readUInt32LE(8);
      const length = this.buf.readUInt32LE(12);
      if (length > MAX_PAYLOAD) {
        this.buf = this.buf.subarray(HEADER_SIZE);
        this.skipRemaining = length;
        this.events.violation('too_large', id, `frame of ${length} bytes exceeds the ${MAX_PAYLOAD}-byte limit`);
        continue;
      }
      if (this.buf.length < HEADER_SIZE + length) return;
      const payload = Buffer.from(this.buf.subarray(HEADER_SIZE, HEADER_SIZE + length));
      this.buf = this.buf.subarray(HEADER_SIZE + length);
      this.events.frame({ type, id, payload });
    }
  }

  /** Bytes held while waiting for the rest of a frame. */
  get pending(): number {
    return this.buf.length;
  }

  private resync(): void {
    const magic = Buffer.alloc(4);
    magic.writeUInt32LE(FRAME_MAGIC, 0);
    const next = this.buf.indexOf(magic, 1);
    const skipped = next < 0 ? Math.max(0, this.buf.length - 3) : next;
    this.buf = this.buf.subarray(skipped);
    this.events.violation('bad_magic', 0, `skipped ${skipped} bytes that were not a frame`);
  }
}
