/** Output kept per stream in a command's or code's result; the streaming callbacks see all of it. */
export const MAX_CAPTURE_BYTES = 16 * 1024 * 1024;

/**
 * One stream's output of one command or request: kept up to `limit` bytes (0: not kept) in one growing
 * buffer (so output that arrives a byte at a time costs no more than one big
 * chunk), and decoded as UTF-8 across chunk boundaries for the callback.
 */
export class OutputCapture {
  private buf = Buffer.alloc(0);
  private used = 0;
  /** Bytes past the limit: the callback saw them, the result leaves them out. */
  dropped = 0;
  private readonly decoder = new TextDecoder('utf-8');

  constructor(
    private readonly limit: number,
    private readonly onData?: (s: string) => void,
  ) {}

  push(d: Buffer): void {
    const take = Math.min(d.length, this.limit - this.used);
    if (take > 0) {
      if (this.used + take > this.buf.length) {
        const grown = Buffer.allocUnsafe(Math.min(this.limit, Math.max(this.used + take, this.buf.length * 2, 4096)));
        this.buf.copy(grown, 0, 0, this.used);
        this.buf = grown;
      }
      d.copy(this.buf, this.used, 0, take);
      this.used += take;
    }
    if (this.limit > 0) this.dropped += d.length - take;
    if (this.onData) {
      const text = this.decoder.decode(d, { stream: true });
      if (text) this.onData(text);
    }
  }

  /** The end of the stream: a UTF-8 sequence cut short goes to the callback as U+FFFD, not into the next request. */
  end(): void {
    const rest = this.decoder.decode();
    if (rest) this.onData?.(rest);
  }

  get bytes(): number {
    return this.used;
  }

  text(): string {
    return this.buf.toString('utf8', 0, this.used);
  }
}

