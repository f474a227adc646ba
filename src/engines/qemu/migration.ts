import { createServer, connect } from 'node:net';
import { rmSync } from 'node:fs';
import { CladeError } from '../../util/errors.js';
import type { QmpClient } from './qmp.js';

/** Device state of a microvm with its RAM in a shared file is ~50 KB; anything near this cap means RAM leaked into the stream. */
const MAX_DEVICE_STATE = 64 * 1024 * 1024;

type MigrationStatus = { status?: string; 'error-desc'?: string };

/** Resolves when QEMU reports the migration finished; rejects if it failed. */
function migrationDone(qmp: QmpClient, timeoutMs: number): { done: Promise<void>; cancel: () => void } {
  let off = () => undefined as unknown;
  let timer: NodeJS.Timeout | undefined;
  const done = new Promise<void>((resolve, reject) => {
    timer = setTimeout(() => reject(new CladeError('timeout', `QEMU migration did not finish within ${timeoutMs} ms`)), timeoutMs);
    off = qmp.onEvent((event, data) => {
      if (event !== 'MIGRATION') return;
      const status = (data as MigrationStatus).status;
      if (status === 'completed') resolve();
      else if (status === 'failed' || status === 'cancelled') {
        void qmp
          .execute<MigrationStatus>('query-migrate')
          .then((q) => reject(new CladeError('internal', `QEMU migration ${status}: ${q['error-desc'] ?? 'no detail'}`)))
          .catch(() => reject(new CladeError('internal', `QEMU migration ${status}`)));
      }
    });
  });
  const cancel = () => {
    clearTimeout(timer);
    off();
  };
  void done.then(cancel, cancel);
  return { done, cancel };
}

export async function setMigrationCapabilities(qmp: QmpClient, ignoreShared: boolean): Promise<void> {
  await qmp.execute('migrate-set-capabilities', {
    capabilities: [
      { capability: 'events', state: true },
      { capability: 'x-ignore-shared', state: ignoreShared },
    ],
  });
}

/**
 * Saves a stopped VM's device state (RAM excluded: it stays in the shared file)
 * by migrating to a unix socket we listen on. Returns the migration stream.
 */
export async function saveDeviceState(qmp: QmpClient, socketPath: string, timeoutMs = 30_000): Promise<Buffer> {
  rmSync(socketPath, { force: true });
  const chunks: Buffer[] = [];
  let size = 0;
  const server = createServer();
  const received = new Promise<void>((resolve, reject) => {
    server.once('connection', (sock) => {
      sock.on('data', (d: Buffer) => {
        size += d.length;
        if (size > MAX_DEVICE_STATE) {
          sock.destroy();
          reject(new CladeError('internal', 'device state exceeded 64 MiB: guest RAM is not in a shared file'));
        } else chunks.push(d);
      });
      sock.once('end', () => resolve());
      sock.once('error', reject);
    });
  });
  await new Promise<void>((resolve, reject) => server.listen(socketPath, resolve).once('error', reject));
  try {
    await setMigrationCapabilities(qmp, true);
    const { done } = migrationDone(qmp, timeoutMs);
    await qmp.execute('migrate', { uri: `unix:${socketPath}` });
    await Promise.all([done, received]);
    return Buffer.concat(chunks);
  } finally {
    server.close();
    rmSync(socketPath, { force: true });
  }
}

/** Feeds a migration stream into a VM started with `-incoming defer`, and waits until it is loaded. */
export async function loadState(qmp: QmpClient, socketPath: string, stream: Buffer | NodeJS.ReadableStream, ignoreShared: boolean, timeoutMs = 60_000): Promise<void> {
  rmSync(socketPath, { force: true });
  await setMigrationCapabilities(qmp, ignoreShared);
  const { done } = migrationDone(qmp, timeoutMs);
  await qmp.execute('migrate-incoming', { uri: `unix:${socketPath}` });
  const sock = await connectWithRetry(socketPath, Date.now() + 5000);
  await new Promise<void>((resolve, reject) => {
    sock.once('error', reject);
    if (Buffer.isBuffer(stream)) sock.end(stream, () => resolve());
    else {
      stream.pipe(sock);
      sock.once('finish', () => resolve());
    }
  });
  try {
    await done;
  } finally {
    sock.destroy();
    rmSync(socketPath, { force: true });
  }
}

/**
 * Moves a running VM's whole state, RAM included, into another QEMU that waits
 * with `-incoming defer`. The source keeps running while RAM is copied and
 * stops only for the last dirty pages.
 */
export async function liveMigrate(source: QmpClient, target: QmpClient, socketPath: string, timeoutMs = 300_000): Promise<void> {
  rmSync(socketPath, { force: true });
  await setMigrationCapabilities(target, false);
  await setMigrationCapabilities(source, false);
  await source.execute('migrate-set-parameters', { 'max-bandwidth': 64 * 1024 * 1024 * 1024, 'downtime-limit': 50 });
  const targetDone = migrationDone(target, timeoutMs);
  await target.execute('migrate-incoming', { uri: `unix:${socketPath}` });
  const sourceDone = migrationDone(source, timeoutMs);
  await source.execute('migrate', { uri: `unix:${socketPath}` });
  try {
    await Promise.all([sourceDone.done, targetDone.done]);
  } finally {
    rmSync(socketPath, { force: true });
  }
}

function connectWithRetry(path: string, deadline: number): Promise<import('node:net').Socket> {
  return new Promise((resolve, reject) => {
    const attempt = () => {
      const s = connect(path);
      s.once('connect', () => {
        s.removeAllListeners('error');
        resolve(s);
      });
      s.once('error', (err) => {
        if (Date.now() > deadline) reject(new CladeError('timeout', `QEMU did not open its migration socket: ${err.message}`));
        else setTimeout(attempt, 2);
      });
    };
    attempt();
  });
}
