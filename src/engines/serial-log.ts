import { closeSync, constants, fstatSync, openSync, renameSync, writeSync } from 'node:fs';
import { connect, type Socket } from 'node:net';

/** A console log file is rotated once past this size: at most twice this on disk per VM. */
export const SERIAL_LOG_MAX_BYTES = 2 * 1024 * 1024;

/**
 * The host end of a VM's serial console: reads the VM's console socket and
 * appends to `path`, which is renamed to `path.1` (replacing the older one)
 * when it reaches the cap. A guest printing without end costs a few MiB of
 * disk, never more. While nobody reads the socket, the VMM drops console output.
 */
export class SerialLog {
  private fd: number;
  private size: number;
  private socket?: Socket;
  private closed = false;

  constructor(
    readonly path: string,
    private readonly maxBytes = SERIAL_LOG_MAX_BYTES,
  ) {
    this.fd = SerialLog.open(path);
    this.size = fstatSync(this.fd).size;
  }

  private static open(path: string): number {
    return openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_APPEND | constants.O_NOFOLLOW, 0o600);
  }

  /** Connects to the console socket, retrying while the VM process creates it. */
  async attach(socketPath: string, deadline: number, isAlive: () => boolean): Promise<void> {
    for (;;) {
      if (this.closed) return;
      try {
        const s = await new Promise<Socket>((resolve, reject) => {
          const c = connect(socketPath);
          c.once('connect', () => {
            c.removeAllListeners('error');
            resolve(c);
          });
          c.once('error', reject);
        });
        this.socket = s;
        s.on('data', (d: Buffer) => this.append(d));
        s.on('error', () => undefined);
        if (this.closed) s.destroy();
        return;
      } catch {
        if (!isAlive() || Date.now() > deadline) return; // the log is a diagnostic: never fail a VM for it
        await new Promise((r) => setTimeout(r, 5));
      }
    }
  }

  private append(d: Buffer): void {
    if (this.closed) return;
    try {
      if (this.size + d.length > this.maxBytes) this.rotate();
      writeSync(this.fd, d);
      this.size += d.length;
    } catch {
      // A full disk loses console output, nothing else.
    }
  }

  private rotate(): void {
    closeSync(this.fd);
    renameSync(this.path, `${this.path}.1`);
    this.fd = SerialLog.open(this.path);
    this.size = 0;
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.socket?.destroy();
    try {
      closeSync(this.fd);
    } catch {
      // Already closed.
    }
  }
}
