import { request, type IncomingMessage } from 'node:http';
import { Readable } from 'node:stream';
import { CladeError, type CladeErrorCode } from '../util/errors.js';
import { STATUS_OF } from '../wire/errors.js';

/** Where a daemon listens: `unix:///path/to/daemon.sock` or `http://host:port`. */
export type DaemonTarget = { socketPath: string } | { host: string; port: number };

export function parseDaemonAddress(address: string): DaemonTarget {
  if (address.startsWith('unix://')) return { socketPath: address.slice('unix://'.length) };
  let url: URL;
  try {
    url = new URL(address);
  } catch {
    throw new CladeError('bad_request', `daemon address ${JSON.stringify(address)} is neither unix:///path nor http://host:port`);
  }
  if (url.protocol !== 'http:') throw new CladeError('bad_request', `daemon address ${JSON.stringify(address)}: only unix:// and http:// are supported`);
  return { host: url.hostname.replace(/^\[(.*)\]$/, '$1'), port: Number(url.port || 80) };
}

/** A JSON value, raw bytes, or `{ stream }`: bytes sent as the iterable yields them. */
type Body = object | Buffer | { stream: AsyncIterable<Uint8Array> } | undefined;

/**
 * A small HTTP client of the daemon's API. Error answers become CladeErrors
 * with the daemon's code, so callers handle them as in embedded mode.
 */
export class DaemonClient {
  constructor(
    private readonly target: DaemonTarget,
    private readonly token?: string,
  ) {}

  async json<T>(method: string, path: string, body?: Body): Promise<T> {
    const res = await this.send(method, path, body);
    const text = (await readAll(res)).toString('utf8');
    if (res.statusCode === 204 || text === '') return undefined as T;
    return JSON.parse(text) as T;
  }

  /** The answer's body, refused with `too_large` past `maxBytes`. */
  async bytes(method: string, path: string, body?: Body, maxBytes = Infinity): Promise<Buffer> {
    return readAll(await this.send(method, path, body), maxBytes);
  }

  /** The answer's body as a web stream (errors before the answer starts reject). */
  async stream(method: string, path: string): Promise<ReadableStream<Uint8Array>> {
    return Readable.toWeb(await this.send(method, path, undefined)) as ReadableStream<Uint8Array>;
  }

  /** Sends raw bytes, from a buffer or streamed from an iterable, and answers with the JSON reply. */
  async upload<T>(method: string, path: string, data: Buffer | AsyncIterable<Uint8Array>): Promise<T> {
    return this.json<T>(method, path, Buffer.isBuffer(data) ? data : { stream: data });
  }

  /** Calls `onLine` for each NDJSON line of the answer as it arrives. */
  async ndjson(method: string, path: string, body: Body, onLine: (line: Record<string, unknown>) => void): Promise<void> {
    const res = await this.send(method, path, body, { accept: 'application/x-ndjson' });
    let buf = '';
    res.setEncoding('utf8');
    for await (const chunk of res as AsyncIterable<string>) {
      buf += chunk;
      let nl: number;
      while ((nl = buf.indexOf('\n')) >= 0) {
        const line = buf.slice(0, nl);
        buf = buf.slice(nl + 1);
        if (line.trim()) onLine(JSON.parse(line) as Record<string, unknown>);
      }
    }
  }

  /** Sends a request; answers with an error status are thrown as CladeErrors. */
  private send(method: string, path: string, body: Body, headers: Record<string, string> = {}): Promise<IncomingMessage> {
    const streamed = body !== undefined && 'stream' in body && typeof (body as { stream: unknown }).stream === 'object' ? (body as { stream: AsyncIterable<Uint8Array> }).stream : undefined;
    const raw = Buffer.isBuffer(body) || streamed !== undefined;
    const payload = body === undefined || streamed ? undefined : Buffer.isBuffer(body) ? body : Buffer.from(JSON.stringify(body));
    const contentType = body === undefined ? {} : { 'content-type': raw ? 'application/octet-stream' : 'application/json' };
    const auth = this.token ? { authorization: `Bearer ${this.token}` } : {};
    return new Promise((resolve, reject) => {
      const req = request({ ...this.target, method, path, headers: { ...headers, ...contentType, ...auth } }, (res) => {
        if ((res.statusCode ?? 500) < 400) return resolve(res);
        void readAll(res).then((b) => reject(errorFromAnswer(res.statusCode ?? 500, b)), reject);
      });
      req.on('error', (err) => reject(new CladeError('unavailable', `cannot reach the clade daemon (${describeTarget(this.target)}): ${err.message}; start it with \`clade serve\``, { cause: err })));
      if (streamed) Readable.from(streamed).once('error', (err) => req.destroy(err)).pipe(req);
      else req.end(payload);
    });
  }
}

/** Rebuilds the daemon's `{ code, message }` as the CladeError it was. */
export function errorFromAnswer(status: number, body: Buffer): CladeError {
  try {
    const { code, message } = JSON.parse(body.toString('utf8')) as { code: string; message: string };
    if (typeof message === 'string' && code in STATUS_OF) return new CladeError(code as CladeErrorCode, message);
  } catch {
    // Not our JSON: fall through.
  }
  return new CladeError('internal', `the daemon answered HTTP ${status}: ${body.toString('utf8').slice(0, 500)}`);
}

function describeTarget(t: DaemonTarget): string {
  return 'socketPath' in t ? t.socketPath : `${t.host}:${t.port}`;
}

function readAll(res: IncomingMessage, maxBytes = Infinity): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    let size = 0;
    res.on('data', (c: Buffer) => {
      size += c.length;
      if (size > maxBytes) {
        res.destroy();
        reject(new CladeError('too_large', `the daemon's answer is larger than ${maxBytes} bytes; read it as a stream instead`));
      } else chunks.push(c);
    });
    res.on('end', () => resolve(Buffer.concat(chunks)));
    res.on('error', (err) => reject(new CladeError('unavailable', `the daemon's answer broke off: ${err.message}`, { cause: err })));
    res.on('aborted', () => reject(new CladeError('unavailable', "the daemon's answer broke off before its end")));
  });
}
