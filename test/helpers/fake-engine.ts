import { createHash } from 'node:crypto';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer, type Server, type Socket } from 'node:net';
import { join } from 'node:path';
import { MessageType, Tag, TOKEN_SIZE } from '../../src/agent-protocol/constants.js';
import { FieldReader, FieldWriter } from '../../src/agent-protocol/fields.js';
import { encodeGuestFrame, FrameDecoder } from '../../src/agent-protocol/frame.js';
import type { BootSpec, Engine, ForkResult, MachineShape, NewTarget, PauseHooks, SnapshotResult, SnapshotSource, Vm, VmRecord, VmTarget } from '../../src/engines/engine.js';
import { setRef } from '../../src/images/store.js';
import { CladeError } from '../../src/util/errors.js';
import { homePaths } from '../../src/util/home.js';

/** What a fake guest remembers; a fork copies it, as a real fork copies RAM. */
type GuestState = { token: Buffer; hostname: string; sandboxId: string; files: Record<string, string>; lastId: number };

/** Fake pids: never signalled (the fake engine kills its VMs itself, and pids() lists none to kill at exit). */
let nextPid = 4_000_000;

/**
 * A guest agent in memory: it speaks the real protocol on a real unix socket
 * (so the host side is the production code), and runs a few commands against
 * its own state: `echo <text>`, `hostname`, `id` (the sandbox id), `write <path> <text>`,
 * `cat <path>`. Anything else exits 127.
 */
class InMemoryAgent {
  private server?: Server;
  private readonly conns = new Set<Socket>();

  constructor(
    readonly path: string,
    readonly state: GuestState,
  ) {}

  async listen(): Promise<void> {
    this.server = createServer((sock) => this.serve(sock));
    await new Promise<void>((resolve) => this.server!.listen(this.path, resolve));
  }

  close(): void {
    for (const c of this.conns) c.destroy();
    this.server?.close();
  }

  private serve(sock: Socket): void {
    this.conns.add(sock);
    sock.on('close', () => this.conns.delete(sock));
    sock.on('error', () => undefined);
    const send = (type: number, id: number, body: Buffer = Buffer.alloc(0)) => sock.write(encodeGuestFrame(type, id, body));
    const decoder = new FrameDecoder({
      violation: () => undefined,
      frame: (f) => {
        const token = f.payload.subarray(0, TOKEN_SIZE);
        const body = new FieldReader(f.payload.subarray(TOKEN_SIZE));
        if (!token.equals(this.state.token)) return send(MessageType.ERROR, f.id, new FieldWriter().str(Tag.CODE, 'auth').str(Tag.MESSAGE, 'wrong token').toBuffer());
        const lastId = this.state.lastId;
        this.state.lastId = f.id;
        switch (f.type) {
          case MessageType.HELLO:
            return send(MessageType.OK, f.id, new FieldWriter().u64(Tag.PROTO_VERSION, 1).str(Tag.AGENT_VERSION, 'in-memory').str(Tag.SANDBOX_ID, this.state.sandboxId).u64(Tag.LAST_ID, lastId).toBuffer());
          case MessageType.FORK_FIXUP:
            this.state.token = Buffer.from(body.bytes(Tag.NEW_TOKEN)!);
            this.state.hostname = body.str(Tag.HOSTNAME)!;
            this.state.sandboxId = body.str(Tag.SANDBOX_ID)!;
            return send(MessageType.OK, f.id);
          case MessageType.EXEC:
            return this.exec(f.id, body.str(Tag.SHELL) ?? (body.all(Tag.ARGV).map((a) => a.toString()).join(' ')), send);
          case MessageType.SIGNAL:
            return send(MessageType.OK, f.id);
          default:
            return send(MessageType.ERROR, f.id, new FieldWriter().str(Tag.CODE, 'unsupported').str(Tag.MESSAGE, `the in-memory agent does not do type ${f.type}`).toBuffer());
        }
      },
    });
    sock.on('data', (d: Buffer) => decoder.push(d));
  }

  private exec(id: number, cmd: string, send: (type: number, id: number, body?: Buffer) => void): void {
    const [verb = '', ...rest] = cmd.split(' ');
    let out: string | undefined;
    if (verb === 'echo') out = `${rest.join(' ')}\n`;
    else if (verb === 'hostname') out = `${this.state.hostname}\n`;
    else if (verb === 'id') out = `${this.state.sandboxId}\n`;
    else if (verb === 'cat') out = this.state.files[rest[0] ?? ''];
    else if (cmd.startsWith('for i in /sys/class/net/*')) out = ''; // the core's check for a network interface: the fake guest has one
    else if (verb === 'write') {
      this.state.files[rest[0] ?? ''] = rest.slice(1).join(' ');
      out = '';
    }
    send(MessageType.OK, id, new FieldWriter().u64(Tag.PID, 100).toBuffer());
    if (out) send(MessageType.STDOUT, id, Buffer.from(out));
    send(MessageType.EXIT, id, new FieldWriter().u64(Tag.EXIT_CODE, out === undefined ? 127 : 0).toBuffer());
  }
}

/** A "VM" that is an in-memory agent on a socket in its run directory, with a pid no real process has. */
export class FakeVm implements Vm {
  readonly engine = 'qemu' as const;
  readonly accelerator = 'tcg' as const;
  readonly pid = nextPid++;
  /** Pretend forwarded ports: guest port p answers at a host port of its own per VM. */
  get ports(): { port: number; host: string; hostPort: number }[] {
    return (this.shape.network?.ports ?? []).map((port) => ({ port, hostPort: 20000 + ((this.pid * 7 + port) % 40000), host: `127.0.0.1:${20000 + ((this.pid * 7 + port) % 40000)}` }));
  }
  readonly agentSocket: string;
  readonly exited: Promise<{ code: number | null; signal: string | null }>;
  private running = true;
  private markExited!: () => void;
  readonly agent: InMemoryAgent;

  constructor(
    readonly id: string,
    readonly runDir: string,
    readonly shape: MachineShape,
    state: GuestState,
    private readonly onKill: (vm: FakeVm) => void,
  ) {
    this.agentSocket = join(runDir, 'agent.sock');
    this.agent = new InMemoryAgent(this.agentSocket, state);
    this.exited = new Promise((resolve) => (this.markExited = () => resolve({ code: null, signal: 'SIGKILL' })));
    this.recordOwner();
  }

  recordOwner(ownerPid = process.pid): void {
    mkdirSync(this.runDir, { recursive: true });
    writeFileSync(join(this.runDir, 'vm.json'), JSON.stringify({ ...this.toRecord(), ownerPid }));
  }

  alive(): boolean {
    return this.running;
  }

  diagnostics(): string {
    return '';
  }

  /** The process is gone at once (SIGKILL), its files with it. */
  killNow(): void {
    if (!this.running) return;
    this.running = false;
    this.agent.close();
    this.markExited();
    this.onKill(this);
  }

  async kill(): Promise<void> {
    this.killNow();
    rmSync(this.runDir, { recursive: true, force: true });
  }

  /** No real process to signal at exit. */
  pids(): number[] {
    return [];
  }

  toRecord(): VmRecord {
    return { engine: 'qemu', id: this.id, pid: this.pid, runDir: this.runDir, accelerator: 'tcg', memory: { file: '', shared: false }, shape: { imageDigest: this.shape.image.manifest.digest, memoryMiB: this.shape.memoryMiB, cpus: this.shape.cpus, ...(this.shape.network ? { network: this.shape.network } : {}) } };
  }
}

/**
 * An engine for tests of everything above the engines: it boots, forks,
 * snapshots and restores FakeVms, and can be told to fail children or to be
 * slow, and counts what it was asked to do.
 */
export class FakeEngine implements Engine {
  readonly name = 'qemu' as const;
  readonly processPattern = /^$/;
  readonly preparedVms = 0;
  readonly vms = new Map<number, FakeVm>();
  forkCalls = 0;
  /** Each fork takes this long, so that concurrent requests pile up behind it. */
  forkDelayMs = 0;
  /** Children (by index within one fork) that fail to start. */
  failChildren = new Set<number>();
  readonly killed: number[] = [];

  async unavailableReason(): Promise<string | undefined> {
    return undefined;
  }

  async boot(spec: BootSpec): Promise<FakeVm> {
    return this.start({ id: spec.id, runDir: spec.runDir }, spec, { token: Buffer.from(spec.token), hostname: spec.hostname, sandboxId: spec.id, files: {}, lastId: 0 });
  }

  async fork(parent: Vm, count: number, newTarget: NewTarget, hooks: PauseHooks): Promise<ForkResult> {
    this.forkCalls++;
    const vm = this.own(parent);
    await hooks.beforePause();
    await new Promise((r) => setTimeout(r, this.forkDelayMs));
    const children: (Vm | CladeError)[] = [];
    for (let i = 0; i < count; i++) {
      const target = newTarget();
      if (this.failChildren.has(i)) children.push(new CladeError('internal', `fake child ${i} failed to start`));
      else children.push(await this.start(target, vm.shape, copy(vm.agent.state)));
    }
    return { parent: vm, children, timings: { parentPauseMs: 0, promoteMs: 0, warmSlots: 0, coldSlots: count, childRestoreMs: [] } };
  }

  async snapshot(vm: Vm, dir: string, hooks: PauseHooks): Promise<SnapshotResult> {
    await hooks.beforePause();
    const state = JSON.stringify({ ...this.own(vm).agent.state, token: this.own(vm).agent.state.token.toString('hex') });
    writeFileSync(join(dir, 'memory.raw'), state, { mode: 0o600 });
    writeFileSync(join(dir, 'state.bin'), 'fake device state', { mode: 0o600 });
    return { parent: vm, hashed: {}, timings: { pauseMs: 0, totalMs: 0 } };
  }

  async restore(source: SnapshotSource, count: number, newTarget: NewTarget): Promise<(Vm | CladeError)[]> {
    // Read through the descriptor the caller checked, as a real engine maps it.
    const saved = JSON.parse(readFileSync(source.memory.fd, 'utf8')) as Omit<GuestState, 'token'> & { token: string };
    const out: Vm[] = [];
    for (let i = 0; i < count; i++) out.push(await this.start(newTarget(), source.shape, { ...copy({ ...saved, token: Buffer.alloc(0) }), token: Buffer.from(saved.token, 'hex') }));
    return out;
  }

  async adopt(record: VmRecord): Promise<FakeVm> {
    const vm = this.vms.get(record.pid);
    if (!vm?.alive()) throw new CladeError('killed', `the VM process of ${record.id} is gone`);
    vm.recordOwner();
    return vm;
  }

  recordedAlive(record: VmRecord): boolean {
    return this.vms.get(record.pid)?.alive() ?? false;
  }

  killRecorded(record: VmRecord): void {
    this.vms.get(record.pid)?.killNow();
  }

  async prewarm(): Promise<void> {}

  async warmPool(source: SnapshotSource & { close(): Promise<void> }): Promise<void> {
    await source.close();
  }

  releaseAllSync(): void {}

  private async start(target: VmTarget, shape: MachineShape, state: GuestState): Promise<FakeVm> {
    const vm = new FakeVm(target.id, target.runDir, shape, state, (v) => this.killed.push(v.pid));
    await vm.agent.listen();
    this.vms.set(vm.pid, vm);
    return vm;
  }

  private own(vm: Vm): FakeVm {
    if (!(vm instanceof FakeVm)) throw new CladeError('internal', 'not a fake VM');
    return vm;
  }
}

function copy(state: GuestState): GuestState {
  return { ...state, token: Buffer.from(state.token), files: { ...state.files } };
}

/** An image record in the current clade home, so machine shapes resolve without building anything. */
export function fakeImage(): string {
  const digest = createHash('sha256').update('fake image').digest('hex');
  const dir = join(homePaths.images(), digest);
  mkdirSync(dir, { recursive: true });
  writeFileSync(
    join(dir, 'image.json'),
    JSON.stringify({ digest, name: 'default', createdAt: new Date(0).toISOString(), kernel: { package: 'fake', version: '0', release: '0' }, packages: [], agentSha256: '0'.repeat(64), initramfsBytes: 0, kernelBytes: 0, files: 0, recipe: 1 }),
  );
  setRef('default', digest);
  return digest;
}
