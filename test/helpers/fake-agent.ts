import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { AgentClient, type AgentDeadlines } from '../../src/agent-protocol/client.js';
import { MessageType, Tag, TOKEN_SIZE } from '../../src/agent-protocol/constants.js';
import { FieldWriter } from '../../src/agent-protocol/fields.js';
import { encodeGuestFrame, FrameDecoder } from '../../src/agent-protocol/frame.js';
import { LiveSandbox } from '../../src/core/sandbox.js';
import type { Vm } from '../../src/engines/engine.js';
import type { ResolvedImage } from '../../src/images/store.js';

/** A request as the fake agent received it. */
export type HostRequest = { type: number; id: number; token: Buffer; body: Buffer };

/**
 * A guest agent played by the test, on a unix socket: it decodes the host's
 * frames and answers with whatever the test scripts, well-formed or hostile.
 * Tests of the host's defences need no VM.
 */
export class FakeAgent {
  readonly dir = mkdtempSync(join(tmpdir(), 'clade-fake-agent-'));
  readonly path = join(this.dir, 'agent.sock');
  private server?: Server;
  conn?: Socket;
  /** Called for every host request after HELLO (which is answered). Return true if handled. */
  onRequest: (req: HostRequest, agent: FakeAgent) => void = () => undefined;

  async start(): Promise<void> {
    this.server = createServer((sock) => {
      this.conn = sock;
      sock.on('error', () => undefined);
      const decoder = new FrameDecoder({
        frame: (f) => {
          const req = { type: f.type, id: f.id, token: f.payload.subarray(0, TOKEN_SIZE), body: f.payload.subarray(TOKEN_SIZE) };
          if (req.type === MessageType.HELLO) this.ok(req.id, new FieldWriter().u64(Tag.PROTO_VERSION, 1).str(Tag.AGENT_VERSION, 'fake'));
          else this.onRequest(req, this);
        },
        violation: () => undefined,
      });
      sock.on('data', (d: Buffer) => decoder.push(d));
    });
    await new Promise<void>((resolve) => this.server!.listen(this.path, resolve));
  }

  /** Sends a raw frame; returns false when the socket buffer is full. */
  send(type: number, id: number, body: Buffer = Buffer.alloc(0)): boolean {
    return this.conn?.write(encodeGuestFrame(type, id, body)) ?? false;
  }

  sendRaw(bytes: Buffer): boolean {
    return this.conn?.write(bytes) ?? false;
  }

  ok(id: number, fields = new FieldWriter()): void {
    this.send(MessageType.OK, id, fields.toBuffer());
  }

  /** Waits until the socket can take more (for endless senders). */
  drained(): Promise<void> {
    return new Promise((resolve) => {
      const c = this.conn;
      if (!c || c.writableLength === 0 || c.destroyed) return resolve();
      const done = () => {
        c.off('drain', done);
        c.off('close', done);
        resolve();
      };
      c.on('drain', done);
      c.on('close', done);
    });
  }

  async stop(): Promise<void> {
    this.conn?.destroy();
    await new Promise<void>((resolve) => (this.server ? this.server.close(() => resolve()) : resolve()));
    rmSync(this.dir, { recursive: true, force: true });
  }
}

/** A host-side client of the fake agent, ready (HELLO answered). */
export async function connectFake(agent: FakeAgent, deadlines: Partial<AgentDeadlines> = {}): Promise<AgentClient> {
  const client = new AgentClient(randomBytes(32), deadlines);
  await client.connect(agent.path, Date.now() + 5000);
  await client.waitReady(Date.now() + 5000);
  return client;
}

/**
 * A LiveSandbox whose "VM" is only the fake agent: enough for the core's
 * commands, files and the daemon's routes to drive it as they drive a real one.
 */
export function fakeLiveSandbox(agent: AgentClient, id = `sb-${randomBytes(6).toString('hex')}`): LiveSandbox {
  let markExited!: () => void;
  const exited = new Promise<{ code: number | null; signal: string | null }>((resolve) => (markExited = () => resolve({ code: 0, signal: null })));
  let running = true;
  const image = { manifest: { digest: '0'.repeat(64) } } as unknown as ResolvedImage;
  const vm = {
    engine: 'qemu',
    id,
    pid: 4_194_305, // above Linux's pid_max: no signal can reach a real process
    agentSocket: '',
    accelerator: 'tcg',
    runDir: join(tmpdir(), id),
    shape: { image, memoryMiB: 256, cpus: 1 },
    memory: { file: '', shared: false },
    alive: () => running,
    exited,
    diagnostics: () => '',
    kill: async () => {
      running = false;
      markExited();
    },
    pids: () => [],
    toRecord: () => ({ engine: 'qemu', id, pid: 4_194_305, runDir: join(tmpdir(), id, 'vm-0'), accelerator: 'tcg', memory: { file: '', shared: false }, shape: { imageDigest: '0'.repeat(64), memoryMiB: 256, cpus: 1 } }),
  } as unknown as Vm;
  return new LiveSandbox(id, vm, agent, randomBytes(32), vm.shape, {}, new Date(), 0, undefined, () => undefined);
}

/** This process's resident memory, MiB. */
export function rssMiB(): number {
  return Math.round(process.memoryUsage().rss / (1024 * 1024));
}
