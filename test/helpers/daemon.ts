import { spawn, type ChildProcess } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { DaemonClient } from '../../src/sdk/daemon-client.js';

const MAIN = join(import.meta.dirname, '../../src/cli/main.ts');

/** A `clade serve` child process with its own socket, state directory and token, so tests never meet a user's daemon. */
export class TestDaemon {
  readonly dir = mkdtempSync(join(tmpdir(), 'clade-api-'));
  readonly socket = join(this.dir, 'd.sock');
  readonly stateDir = join(this.dir, 'state');
  readonly tokenFile = join(this.dir, 'token');
  proc?: ChildProcess;
  tcpPort = 0;
  log = '';

  constructor(private readonly extraArgs: string[] = []) {}

  async start(): Promise<void> {
    const args = ['--import', 'tsx', MAIN, 'serve', '--socket', this.socket, '--state-dir', this.stateDir, '--token-file', this.tokenFile, '--listen', '127.0.0.1:0', '--owner-pid', String(process.pid), ...this.extraArgs];
    const proc = spawn(process.execPath, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    this.proc = proc;
    proc.stderr!.on('data', (d: Buffer) => (this.log += d.toString()));
    await new Promise<void>((resolve, reject) => {
      let out = '';
      proc.stdout!.on('data', (d: Buffer) => {
        out += d.toString();
        this.log += d.toString();
        const m = /"tcpPort":(\d+).*"msg":"clade daemon listening"/.exec(out);
        if (m) (this.tcpPort = Number(m[1]), resolve());
      });
      proc.once('exit', (code) => reject(new Error(`clade serve exited with ${code}:\n${this.log}`)));
    });
  }

  get pid(): number {
    return this.proc!.pid!;
  }

  client(): DaemonClient {
    return new DaemonClient({ socketPath: this.socket });
  }

  tcpClient(token?: string): DaemonClient {
    return new DaemonClient({ host: '127.0.0.1', port: this.tcpPort }, token);
  }

  token(): string {
    return readFileSync(this.tokenFile, 'utf8').trim();
  }

  async stop(signal: NodeJS.Signals): Promise<void> {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const exited = new Promise((r) => proc.once('exit', r));
    proc.kill(signal);
    await exited;
  }
}
