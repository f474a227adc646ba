import { posix } from 'node:path';
import { pipeline, Readable, Transform } from 'node:stream';
import { createGunzip } from 'node:zlib';
import busboy from 'busboy';
import type { FastifyInstance, FastifyReply, FastifyRequest } from 'fastify';
import { guestPath, readGuestStream } from '../core/files.js';
import type { LiveSandbox } from '../core/sandbox.js';
import { CladeError } from '../util/errors.js';

/** Largest upload, as on clade's own API; uploads stream through to the guest. */
export const MAX_UPLOAD_BYTES = 4 * 1024 * 1024 * 1024;
/** Files in one multipart upload. */
const MAX_PARTS = 1000;

type FilesQuery = { path?: string; username?: string };

/** The sandbox a /files request is for, set by the listener's checks (server.ts). */
export type FilesTarget = (req: FastifyRequest) => LiveSandbox;

/** clade runs everything as root: a request for another user is refused rather than served as root. */
export function checkUsername(username: string | undefined): void {
  if (username !== undefined && username !== '' && username !== 'root') {
    throw new CladeError('bad_request', `clade sandboxes run everything as root; user ${JSON.stringify(username)} is not supported (leave \`user\` unset or pass 'root')`);
  }
}

function refuseMetadata(req: FastifyRequest): void {
  if (Object.keys(req.headers).some((h) => h.toLowerCase().startsWith('x-metadata-'))) {
    throw new CladeError('bad_request', 'file metadata (X-Metadata-* headers) is not supported by clade: its guest agent keeps no extended attributes');
  }
}

/** Passes bytes through, counting them, and fails (so the upload is discarded) past `max`. */
function countUpTo(max: number): Transform {
  let n = 0;
  return new Transform({
    transform(chunk: Buffer, _enc, cb) {
      n += chunk.length;
      if (n > max) cb(new CladeError('too_large', `the upload is larger than ${max} bytes`));
      else cb(null, chunk);
    },
  });
}

async function writeStream(sandbox: LiveSandbox, path: string, source: Readable): Promise<{ name: string; type: 'file'; path: string }> {
  const full = guestPath(path);
  const counted = countUpTo(MAX_UPLOAD_BYTES);
  // pipeline, not pipe: a client that breaks off fails the stream, and the upload is discarded in the guest.
  pipeline(source, counted, () => undefined);
  await sandbox.agent.writeFile(full, counted);
  return { name: posix.basename(full), type: 'file', path: full };
}

/**
 * Each part of a multipart body, written to the guest one after another as
 * it arrives (the parser waits while a part's data waits for the guest).
 * The part's filename is its path; `?path=` names the first file instead.
 */
function writeMultipart(sandbox: LiveSandbox, req: FastifyRequest, body: Readable, queryPath: string | undefined): Promise<{ name: string; type: 'file'; path: string }[]> {
  return new Promise((resolve, reject) => {
    let parser: busboy.Busboy;
    try {
      parser = busboy({ headers: req.headers as Record<string, string>, preservePath: true, limits: { files: MAX_PARTS, fileSize: MAX_UPLOAD_BYTES, fields: 100 } });
    } catch (err) {
      reject(new CladeError('bad_request', `malformed multipart upload: ${err instanceof Error ? err.message : String(err)}`));
      return;
    }
    const written: { name: string; type: 'file'; path: string }[] = [];
    let chain: Promise<unknown> = Promise.resolve();
    let index = 0;
    let failed = false;
    const fail = (err: unknown) => {
      if (failed) return;
      failed = true;
      body.unpipe(parser);
      body.resume();
      reject(err);
    };
    parser.on('file', (_field, stream, info) => {
      const target = index === 0 && queryPath ? queryPath : info.filename;
      index++;
      if (!target) {
        stream.resume();
        fail(new CladeError('bad_request', 'a multipart file part has no filename; give its path as the filename, or ?path='));
        return;
      }
      stream.on('limit', () => stream.destroy(new CladeError('too_large', `the upload is larger than ${MAX_UPLOAD_BYTES} bytes`)));
      chain = chain.then(() => writeStream(sandbox, target, stream)).then((w) => void written.push(w), fail);
    });
    parser.on('filesLimit', () => fail(new CladeError('bad_request', `more than ${MAX_PARTS} files in one upload; split it`)));
    parser.on('error', (err) => fail(new CladeError('bad_request', `malformed multipart upload: ${err instanceof Error ? err.message : String(err)}`)));
    parser.on('close', () => {
      void chain.then(() => {
        if (failed) return;
        if (written.length === 0) reject(new CladeError('bad_request', 'the upload holds no file part (form field "file")'));
        else resolve(written);
      });
    });
    body.pipe(parser);
  });
}

/** envd's file transfer: `GET /files` (download) and `POST /files` (multipart or raw upload). */
export function filesRoutes(app: FastifyInstance, sandboxOf: FilesTarget): void {
  app.get<{ Querystring: FilesQuery }>('/files', async (req, reply: FastifyReply) => {
    const sandbox = sandboxOf(req);
    checkUsername(req.query.username);
    if (!req.query.path) throw new CladeError('bad_request', 'path is required');
    const path = guestPath(req.query.path);
    const info = await sandbox.agent.stat(path);
    if (info.type === 'dir') throw new CladeError('bad_request', `${path} is a directory; download files one at a time`);
    void reply.type('application/octet-stream').header('content-disposition', `attachment; filename="${encodeURIComponent(posix.basename(path))}"`);
    // The clients tell an empty file by its Content-Length; any other is streamed as the client reads it.
    if (info.size === 0) return reply.header('content-length', '0').send(Buffer.alloc(0));
    const stream = await readGuestStream(sandbox.agent, path);
    return reply.send(Readable.fromWeb(stream as import('node:stream/web').ReadableStream<Uint8Array>));
  });

  // Uploads take their body as a stream, in a scope of their own so JSON routes keep their parser.
  void app.register(async (scope) => {
    scope.removeAllContentTypeParsers();
    scope.addContentTypeParser('*', (_req, payload, done) => done(null, payload));
    scope.post<{ Querystring: FilesQuery }>('/files', async (req) => {
      const sandbox = sandboxOf(req);
      checkUsername(req.query.username);
      refuseMetadata(req);
      req.raw.socket?.setTimeout(0); // a big upload into an emulated guest takes a while; the guest's deadlines bound it
      const type = (req.headers['content-type'] ?? '').toLowerCase();
      let body = (req.body as Readable | undefined) ?? Readable.from([]);
      if (type.startsWith('multipart/form-data')) return writeMultipart(sandbox, req, body, req.query.path || undefined);
      if (!req.query.path) throw new CladeError('bad_request', 'a raw upload needs ?path=');
      const encoding = (req.headers['content-encoding'] ?? '').toLowerCase();
      if (encoding === 'gzip') {
        const gunzip = createGunzip();
        pipeline(body, gunzip, () => undefined);
        body = gunzip;
      } else if (encoding && encoding !== 'identity') throw new CladeError('bad_request', `Content-Encoding ${encoding} is not supported; send gzip or nothing`);
      return [await writeStream(sandbox, req.query.path, body)];
    });
  });
}
