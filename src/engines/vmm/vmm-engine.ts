import { spawn } from 'node:child_process';
import { closeSync, constants, existsSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CladeError } from '../../util/errors.js';
import { packageRoot } from '../../util/paths.js';
import { ensureVmlinux } from '../../images/vmlinux.js';
import { imageKernelArgs } from '../../images/store.js';
import { mapLimited } from '../../util/concurrency.js';
import { asCladeError } from '../../util/errors.js';
import { isSameProcess, killPidQuietly, processStartTicks } from '../../util/process.js';
import { assertSocketPath, type BootSpec, type Engine, type ForkResult, type MachineShape, type NewTarget, type PauseHooks, type SnapshotResult, type SnapshotSource, type Vm, type VmRecord } from '../engine.js';
import { probeKvm } from '../../util/kvm-probe.js';
import { VmmControl, VmmRefusal } from './control.js';
import { GUEST_NET_CMDLINE, killNet, NetRelay, netDirOf, type NetRecord, type NetworkSpec, type PortMapping } from '../network.js';

/** clade-vmm keeps guest RAM below the 32-bit PCI hole. */
export const VMM_MAX_MEMORY_MIB = 3072;
/** Children one `forks` request makes (clade-vmm's VMM_MAX_FORK_BATCH); larger forks are split, one pause each. */
export const VMM_MAX_FORK_BATCH = 256;
/** clade-vmm's exit status when a snapshot's files are damaged, forged or inconsistent (native/vmm/vmm.h). */
export const VMM_EXIT_SNAPSHOT_REFUSED = 4;
/** clade-vmm's exit status when a snapshot needs KVM features this host does not have. */
export const VMM_EXIT_SNAPSHOT_FOREIGN = 5;
const EXIT_POLL_MS = 500;
/** A `forks` reply: clade-vmm gives its spawner 60 s to fork a batch (seconds under emulation, well under one on hardware). */
const FORK_REPLY_TIMEOUT_MS = 90_000;
/** clade-vmm processes started at once from one snapshot. */
const RESTORE_CONCURRENCY = 8;
/** Where clade-vmm finds what it inherits: the kernel command line, or a snapshot's two files (fd numbers in the child). */
const CMDLINE_FD = 3;
/**
 * Every page a forked guest writes costs its child a private copy on the host,
 * so the guest kernel is told to leave memory alone when nobody asks it to:
 * no transparent huge pages (a fault would clear, and khugepaged would copy,
 * 2 MiB at a time), no proactive compaction (it moves pages between frames),
 * no lockup watchdogs (per-CPU timers and timestamps every few seconds), and
 * per-CPU memory counters folded every 2 minutes instead of every second
 * (/proc/meminfo lags by up to that much). docs/vmm.md, "Memory per child".
 */
const QUIET_GUEST_KERNEL = ['transparent_hugepage=never', 'nowatchdog', 'sysctl.vm.stat_interval=120', 'sysctl.vm.compaction_proactiveness=0'];
const SNAPSHOT_FDS = [3, 4] as const;

export function vmmBinary(): string {
  return process.env.CLADE_VMM ?? join(packageRoot(), 'native', 'vmm', 'build', 'clade-vmm');
}

/** Why the vmm engine cannot run here, or undefined when it can. */
export async function vmmUnavailableReason(): Promise<string | undefined> {
  if (!existsSync(vmmBinary())) return `clade-vmm is not built (run \`make -C native/vmm\`, or \`npm run setup\`)`;
  const probe = await probeKvm();
  if (!probe.usable) return `this host's /dev/kvm cannot run Linux guests (${probe.reason}); use engine "qemu", or \`clade runner\` for a machine whose KVM can`;
  return undefined;
}

type Files = { control: string; agent: string; serial: string; net: string };

/**
 * A VM's files in its run directory; clade-vmm binds a forked child's in the
 * child's own (`forks N DIR...`), and a child of a VM with a network connects
 * to the child's `net.sock`, which clade-net listens on before the fork.
 */
function runFiles(runDir: string): Files {
  const files = { control: join(runDir, 'control.sock'), agent: join(runDir, 'agent.sock'), serial: join(runDir, 'serial.log'), net: join(runDir, 'net.sock') };
  assertSocketPath(files.control); // the longest of the two socket names
  return files;
}

/** A snapshot's two files, open for reading: clade-vmm maps and reads these descriptors, never the paths. */
export type VmmSnapshotFds = { memory: number; state: number };

/**
 * The fork-native engine: one clade-vmm process per sandbox, guest RAM private
 * anonymous memory inside it. A fork is fork(2) of that process (docs/vmm.md):
 * the parent keeps running in its process, each child is a new process whose
 * control and agent sockets the parent bound before the pause.
 */
export class VmmEngine implements Engine {
  readonly name = 'vmm' as const;
  readonly processPattern = /clade-vmm( \(deleted\))?$/;
  /** Nothing is started ahead of time: a fork is fork(2) of the running VMM, a start maps the snapshot's file. */
  readonly preparedVms = 0;

  unavailableReason(): Promise<string | undefined> {
    return vmmUnavailableReason();
  }

  refusesShape(_shape: MachineShape): string | undefined {
    return undefined; // every shape: networks (virtio-net) and disk images (virtio-blk) included
  }

  /** One pause of the parent per VMM_MAX_FORK_BATCH children; the parent keeps running in its own process. */
  async fork(parent: Vm, count: number, newTarget: NewTarget, hooks: PauseHooks): Promise<ForkResult> {
    const vm = asVmm(parent);
    const targets = Array.from({ length: count }, newTarget);
    await hooks.beforePause();
    const { vms, timings } = await vm.fork(targets);
    return { parent: vm, children: vms, timings: { parentPauseMs: timings.pauseUs / 1000, promoteMs: 0, warmSlots: 0, coldSlots: 0, childRestoreMs: [] } };
  }

  /** clade-vmm's writer child writes the files while the VM runs on; the VM pauses only as for a fork. */
  async snapshot(vm: Vm, dir: string, hooks: PauseHooks): Promise<SnapshotResult> {
    await hooks.beforePause();
    const t = await asVmm(vm).snapshot(dir);
    return { parent: vm, hashed: {}, timings: { pauseMs: t.pauseUs / 1000, captureUs: t.captureUs, forkUs: t.forkUs, writeUs: t.writeUs, totalMs: t.totalMs } };
  }

  async adopt(record: VmRecord, shape: MachineShape): Promise<VmmVm> {
    return VmmVm.adopt({ id: record.id, pid: record.pid, ...(record.startTicks ? { startTicks: record.startTicks } : {}), shape, runDir: record.runDir, ...(record.net ? { net: record.net } : {}) });
  }

  recordedAlive(record: VmRecord): boolean {
    return record.startTicks !== undefined && isVmmProcess(record.pid, record.startTicks);
  }
  killRecorded(record: VmRecord): void {
    if (this.recordedAlive(record)) killPidQuietly(record.pid);
    if (record.net) killNet(record.net);
  }


  async prewarm(): Promise<void> {
    // A vmm fork is fork(2) of the running VMM: there is nothing to pre-start.
  }

  async warmPool(source: SnapshotSource & { close(): Promise<void> }): Promise<void> {
    await source.close(); // a start maps memory.raw: nothing to pre-start
  }

  releaseAllSync(): void {
    // Nothing started ahead of time.
  }

  async boot(spec: BootSpec): Promise<VmmVm> {
    const refused = this.refusesShape(spec);
    if (refused) throw new CladeError('unavailable', refused);
    if (spec.memoryMiB > VMM_MAX_MEMORY_MIB) throw new CladeError('bad_request', `the vmm engine runs guests of at most ${VMM_MAX_MEMORY_MIB} MiB, got memoryMiB ${spec.memoryMiB}`);
    if (spec.cpus !== 1) throw new CladeError('unavailable', 'the vmm engine runs one vCPU per sandbox for now; use cpus: 1 or engine "qemu"');
    const files = runFiles(spec.runDir);
    const kernel = await ensureVmlinux(spec.image);
    const cmdline = ['console=ttyS0', 'quiet', 'panic=-1', 'mitigations=off', 'random.trust_cpu=on', 'i8042.noaux', ...QUIET_GUEST_KERNEL, ...imageKernelArgs(spec.image), `clade.token=${spec.token.toString('hex')}`, `clade.id=${spec.id}`, `clade.hostname=${spec.hostname}`];
    if (spec.network) cmdline.push(GUEST_NET_CMDLINE);
    // The command line carries the agent's token: it goes through a pipe, never into clade-vmm's own argv,
    // which every local user can read in /proc.
    const args = ['run', '--socket', files.control, '--agent-socket', files.agent, '--serial-log', files.serial, '--kernel', kernel, '--initramfs', spec.image.initramfs, '--mem-mib', String(spec.memoryMiB), '--cmdline-fd', String(CMDLINE_FD)];
    // A disk image's root filesystem: a read-only virtio-blk disk that every fork shares (clade-vmm opens it O_RDONLY);
    // a snapshot records its path, and a start from the snapshot opens that path again.
    if (spec.image.disk) args.push('--disk', spec.image.disk);
    return withNetwork(spec.network, spec.runDir, (net) => startVmm(spec.id, spec, spec.runDir, files, [...args, ...netArgs(net)], { cmdline: cmdline.join(' '), ...(net ? { net } : {}) }));
  }

  /**
   * Starts VMs from a snapshot written by VmmVm.snapshot(): each clade-vmm maps
   * memory.raw copy-on-write (never writing it), so every VM started from one
   * snapshot shares the file's page cache. The snapshot's files come as the
   * caller opened and checked them; clade-vmm inherits and uses exactly those
   * descriptors (no path is opened again between the check and the use). A
   * state.bin clade-vmm refuses (damaged or forged) is a CladeError 'integrity'.
   */
  async restore(source: SnapshotSource, count: number, newTarget: NewTarget): Promise<(Vm | CladeError)[]> {
    const fds: VmmSnapshotFds = { memory: source.memory.fd, state: source.state.fd };
    const results = await mapLimited(Array.from({ length: count }), RESTORE_CONCURRENCY, () => this.restoreOne(newTarget(), source.shape, fds));
    return results.map((r) => (r.status === 'fulfilled' ? r.value : asCladeError(r.reason, `could not start a sandbox from snapshot ${source.tag}`)));
  }

  private async restoreOne(target: { id: string; runDir: string }, shape: MachineShape, fds: VmmSnapshotFds): Promise<VmmVm> {
    const files = runFiles(target.runDir);
    const args = ['run', '--socket', files.control, '--agent-socket', files.agent, '--serial-log', files.serial, '--restore-fds', SNAPSHOT_FDS.join(',')];
    // A snapshot of a VM with a NIC needs a network to start (clade-vmm refuses it without one, and one without a NIC with one).
    return withNetwork(shape.network, target.runDir, (net) => startVmm(target.id, shape, target.runDir, files, [...args, ...netArgs(net)], { snapshot: fds, ...(net ? { net } : {}) }));
  }
}

/**
 * Starts the network of a new VM in `runDir` (when its shape has one) and
 * hands it to `start`, which owns it from then on (startVmm releases it if
 * the VM does not start). It listens on the run directory's net.sock, where
 * clade-vmm's forked children expect theirs.
 */
async function withNetwork(network: NetworkSpec | undefined, runDir: string, start: (net: NetRelay | undefined) => Promise<VmmVm>): Promise<VmmVm> {
  return start(network ? await startNet(network, runDir) : undefined);
}

function startNet(network: NetworkSpec, runDir: string): Promise<NetRelay> {
  return NetRelay.start(network, netDirOf(runDir), runFiles(runDir).net);
}

/** clade-vmm's virtio-net on the VM's clade-net socket (QEMU's stream framing, which clade-net speaks). */
function netArgs(net: NetRelay | undefined): string[] {
  return net ? ['--net', net.socket] : [];
}

function asVmm(vm: Vm): VmmVm {
  if (vm instanceof VmmVm) return vm;
  throw new CladeError('internal', `the vmm engine was asked to handle a ${vm.engine} VM`);
}

/** memory.raw and state.bin of a snapshot directory, read-only, symlinks refused. */
export function openSnapshotFiles(dir: string): VmmSnapshotFds {
  const flags = constants.O_RDONLY | constants.O_NOFOLLOW; // close-on-exec, as every descriptor Node opens: only the child given them gets them
  const open = (name: string) => {
    try {
      return openSync(join(dir, name), flags);
    } catch (err) {
      throw new CladeError('integrity', `the snapshot in ${dir} has no readable ${name} (${(err as NodeJS.ErrnoException).code ?? String(err)})`);
    }
  };
  const memory = open('memory.raw');
  try {
    return { memory, state: open('state.bin') };
  } catch (err) {
    closeSync(memory);
    throw err;
  }
}

/**
 * Spawns one root clade-vmm process and connects its control socket; a VMM
 * that exits at once reports why. What it inherits is only what it needs:
 * no environment (nothing of ours, secrets included, reaches it), the kernel
 * command line through a pipe, or a snapshot's two descriptors. `pass.net`,
 * the VM's network, becomes the VM's (its kill releases it), or is released
 * here when the VM does not start.
 */
async function startVmm(id: string, shape: MachineShape, runDir: string, files: Files, args: string[], pass: { cmdline?: string; snapshot?: VmmSnapshotFds; net?: NetRelay }): Promise<VmmVm> {
  const stdio: ('ignore' | 'pipe' | number)[] = ['ignore', 'ignore', 'pipe'];
  if (pass.cmdline !== undefined) stdio[CMDLINE_FD] = 'pipe';
  if (pass.snapshot) stdio.push(pass.snapshot.memory, pass.snapshot.state); // become fds 3 and 4 (SNAPSHOT_FDS)
  // Its own process group: a fork's children stay in it, and none of them gets the terminal's Ctrl-C.
  const child = spawn(vmmBinary(), args, { stdio, detached: true, env: {} });
  let stderr = '';
  child.stderr?.on('data', (d: Buffer) => (stderr = (stderr + d.toString('utf8')).slice(-4096)));
  let exitCode: number | null = null;
  child.once('exit', (code) => (exitCode = code));
  // 'close' comes after the exit and the end of its stderr: the reason it printed is all there then.
  const closed = new Promise<void>((resolve) => child.once('close', () => resolve()));
  try {
    await new Promise<void>((resolve, reject) => {
      child.once('spawn', resolve);
      child.once('error', (err) => reject(new CladeError('unavailable', `cannot start clade-vmm: ${err.message}`)));
    });
  } catch (err) {
    await pass.net?.release();
    throw err;
  }
  if (pass.cmdline !== undefined) {
    const pipe = child.stdio[CMDLINE_FD] as NodeJS.WritableStream & { on(e: 'error', f: () => void): void };
    pipe.on('error', () => undefined); // a VMM that died at once is reported below, by its exit
    pipe.end(pass.cmdline);
  }
  const vm = new VmmVm(id, child.pid!, shape, runDir, files, () => stderr, pass.net);
  try {
    await vm.connect(Date.now() + 10_000);
  } catch (err) {
    await vm.kill();
    await Promise.race([closed, new Promise((r) => setTimeout(r, 2000))]);
    const why = stderr.trim().replace(/^clade-vmm: /gm, '');
    const status = exitCode;
    if (status === VMM_EXIT_SNAPSHOT_REFUSED) throw new CladeError('integrity', `clade-vmm refused the snapshot: ${why || 'no reason given'}`, { cause: err });
    if (status === VMM_EXIT_SNAPSHOT_FOREIGN) throw new CladeError('unavailable', `clade-vmm cannot start this snapshot here: ${why || 'no reason given'}`, { cause: err });
    if (err instanceof CladeError && why) throw new CladeError(err.code, `${err.message}: ${why}`, { cause: err });
    throw err;
  }
  return vm;
}

export type VmmChild = { pid: number; socket: string; agentSocket: string };
/** pauseUs: the parent's pause (one fork(2) per batch); spawnUs: the spawner's fork(2) of every child of a batch, while the parent runs. */
export type VmmForkTimings = { pauseUs: number; forkUs: number; captureUs: number; parkUs: number; spawnUs: number };
/** A snapshot to disk: the VM's pause (as a fork's), the writer child's time, and request → files on disk. */
export type VmmSnapshotTimings = { pauseUs: number; captureUs: number; forkUs: number; writeUs: number; totalMs: number };
/** CLOCK_MONOTONIC instants in one VMM process, ns; in a forked child `forkNs` is when its parent called fork(2), in a root 0. */
export type VmmProcessTiming = { forkNs: number; builtNs: number; restoredNs: number; firstRunNs: number; firstExitNs: number };
/** Part of clade-vmm's `status` reply (docs/vmm.md, "Control protocol"). */
export type VmmStatus = { pid: number; depth: number; state: string; timing: VmmProcessTiming };

/** A running clade-vmm process: a root VM or a forked child. */
export class VmmVm implements Vm {
  readonly engine = 'vmm' as const;
  readonly accelerator = 'kvm' as const;
  readonly memory = { file: '', shared: false }; // anonymous memory inside the process, nothing on disk
  readonly agentSocket: string;
  readonly exited: Promise<{ code: number | null; signal: string | null }>;
  private running = true;
  private control?: VmmControl;
  readonly startTicks: string | undefined;
  private markExited!: () => void;

  constructor(
    readonly id: string,
    readonly pid: number,
    readonly shape: MachineShape,
    readonly runDir: string,
    private readonly files: Files,
    private readonly stderrTail: () => string = () => '',
    /** The VM's network, its own (a fork's child gets a new one): released when the VM is killed. */
    private net?: NetRelay,
  ) {
    this.agentSocket = files.agent;
    this.startTicks = processStartTicks(pid);
    this.exited = new Promise((resolve) => {
      this.markExited = () => {
        if (!this.running) return;
        this.running = false;
        clearInterval(poll);
        resolve({ code: null, signal: null });
      };
      // The VMM may be a grandchild of ours or nobody's child: watch its pid, not a child handle.
      const poll = setInterval(() => {
        if (!isVmmProcess(this.pid, this.startTicks)) this.markExited();
      }, EXIT_POLL_MS);
      poll.unref();
    });
    this.recordOwner();
  }

  /**
   * Takes over a VMM another clade process started (a daemon restarted after
   * SIGKILL); the pid must still be that clade-vmm process.
   */
  static async adopt(a: { id: string; pid: number; startTicks?: string; shape: MachineShape; runDir: string; net?: NetRecord }): Promise<VmmVm> {
    const files = runFiles(a.runDir);
    const net = a.net ? NetRelay.adopt(a.net, a.runDir, files.net) : undefined;
    if (!a.startTicks || !isVmmProcess(a.pid, a.startTicks)) {
      await net?.release(); // clade-net leaves once its VM is gone; this makes sure, and removes its directory
      throw new CladeError('killed', `the VMM process of ${a.id} is gone`);
    }
    const vm = new VmmVm(a.id, a.pid, a.shape, a.runDir, files, undefined, net);
    try {
      await vm.connect(Date.now() + 10_000);
    } catch (err) {
      await vm.kill();
      throw err;
    }
    return vm;
  }

  /** Opens the control channel; its closing means the process is going. */
  async connect(deadline: number): Promise<void> {
    this.control = await VmmControl.connect(this.files.control, deadline, () => isVmmProcess(this.pid, this.startTicks));
  }

  /** vm.json names the owner (reapOrphans kills VMs whose owner is gone) and the start time that tells our process from a reused pid. */
  recordOwner(): void {
    writeFileSync(join(this.runDir, 'vm.json'), JSON.stringify({ ...this.toRecord(), ownerPid: process.pid }) + '\n', { mode: 0o600 });
  }

  toRecord(): VmRecord {
    const { manifest } = this.shape.image;
    const shape = { imageDigest: manifest.digest, memoryMiB: this.shape.memoryMiB, cpus: this.shape.cpus, ...(this.shape.network ? { network: this.shape.network } : {}) };
    return { engine: 'vmm', id: this.id, pid: this.pid, ...(this.startTicks ? { startTicks: this.startTicks } : {}), runDir: this.runDir, accelerator: this.accelerator, memory: { ...this.memory }, shape, ...(this.net ? { net: this.net.toRecord() } : {}) };
  }

  get ports(): readonly PortMapping[] {
    return this.net?.ports ?? [];
  }

  pids(): number[] {
    return [this.pid, ...(this.net ? [this.net.pid] : [])];
  }

  alive(): boolean {
    return this.running && isVmmProcess(this.pid, this.startTicks);
  }

  /**
   * Forks the running VM into one child per entry. clade-vmm binds each
   * child's control and agent sockets and opens its serial log in the child's
   * own run directory (which must exist), so a child depends on nothing of
   * its parent's: it keeps working, and forking, after the parent is gone.
   * Up to VMM_MAX_FORK_BATCH children take one pause of the parent; more are
   * made in several batches, one pause each (the timings add up).
   */
  async fork(children: { id: string; runDir: string }[]): Promise<{ vms: VmmVm[]; timings: VmmForkTimings }> {
    const vms: VmmVm[] = [];
    const timings: VmmForkTimings = { pauseUs: 0, forkUs: 0, captureUs: 0, parkUs: 0, spawnUs: 0 };
    try {
      for (let at = 0; at < children.length; at += VMM_MAX_FORK_BATCH) {
        const batch = children.slice(at, at + VMM_MAX_FORK_BATCH);
        const made = await this.forkBatch(batch, timings);
        vms.push(...made);
        if (made.length < batch.length) throw new CladeError('internal', `clade-vmm made ${vms.length} of ${children.length} children`);
      }
    } catch (err) {
      await Promise.all(vms.map((vm) => vm.kill()));
      throw err;
    }
    return { vms, timings };
  }

  /**
   * One `forks N DIR...` request: one pause of this VM for up to
   * VMM_MAX_FORK_BATCH children. A VM with a network first starts each
   * child's clade-net on the child's net.sock, which the child connects to
   * right after fork(2); a child's network goes with the child.
   */
  private async forkBatch(children: { id: string; runDir: string }[], timings: VmmForkTimings): Promise<VmmVm[]> {
    if (!this.control) throw new CladeError('killed', `sandbox ${this.id}'s VMM is not connected`);
    const files = children.map((c) => runFiles(c.runDir));
    const nets = await this.startChildNetworks(children);
    const childVm = (c: VmmChild, i: number) => new VmmVm(children[i]!.id, c.pid, this.shape, children[i]!.runDir, files[i]!, undefined, nets[i]);
    // Networks of children clade-vmm did not make (those past the last one it made) have no VM to release them.
    const releaseUnmade = (made: number) => Promise.all(nets.slice(made).map((net) => net?.release()));
    let reply: Record<string, unknown>;
    try {
      // clade-vmm answers once its spawner has made every child, or after 60 s with those it made: wait longer than that.
      reply = await this.control.request(['forks', children.length, ...children.map((c) => c.runDir)], FORK_REPLY_TIMEOUT_MS);
    } catch (err) {
      // A fork that failed half-way still made children: they run, and are ours to end.
      const made = err instanceof VmmRefusal ? ((err.reply.children as VmmChild[] | undefined) ?? []) : [];
      await Promise.all(made.map((c, i) => childVm(c, i).kill()));
      await releaseUnmade(made.length);
      throw err;
    }
    const made = (reply.children as VmmChild[] | undefined) ?? [];
    const vms = made.map(childVm);
    await releaseUnmade(made.length);
    for (const key of ['pauseUs', 'forkUs', 'captureUs', 'parkUs', 'spawnUs'] as const) timings[key] += Number(reply[key] ?? 0);
    const connected = await Promise.allSettled(vms.map((vm) => vm.connect(Date.now() + 10_000)));
    const failed = connected.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (failed) {
      await Promise.all(vms.map((vm) => vm.kill()));
      throw failed.reason;
    }
    return vms;
  }

  /** A network per child when this VM has one (none when it has not); all or none of them start. */
  private async startChildNetworks(children: { runDir: string }[]): Promise<(NetRelay | undefined)[]> {
    const network = this.shape.network;
    if (!network) return children.map(() => undefined);
    const started = await Promise.allSettled(children.map((c) => startNet(network, c.runDir)));
    const failed = started.find((r): r is PromiseRejectedResult => r.status === 'rejected');
    if (!failed) return started.map((r) => (r as PromiseFulfilledResult<NetRelay>).value);
    await Promise.all(started.map((r) => (r.status === 'fulfilled' ? r.value.release() : undefined)));
    throw failed.reason;
  }

  /**
   * Writes the VM to `dir` (an existing empty directory): memory.raw and
   * state.bin (docs/snapshots.md). The VM pauses as for a fork; clade-vmm's
   * writer child then writes the files while the VM runs on, and reports in
   * dir/done, which this waits for and removes.
   */
  async snapshot(dir: string, timeoutMs = 300_000): Promise<VmmSnapshotTimings> {
    if (!this.control) throw new CladeError('killed', `sandbox ${this.id}'s VMM is not connected`);
    const t0 = performance.now();
    const reply = await this.control.request(['snapshot', dir], 60_000);
    const done = await waitForWriter(join(dir, 'done'), Number(reply.writer), t0 + timeoutMs);
    rmSync(join(dir, 'done'), { force: true });
    if (done.ok !== true) throw new CladeError('internal', `clade-vmm could not write the snapshot: ${String(done.error ?? 'no reason given')}`);
    return { pauseUs: Number(reply.pauseUs), captureUs: Number(reply.captureUs), forkUs: Number(reply.forkUs), writeUs: Number(done.writeUs), totalMs: performance.now() - t0 };
  }

  /** The VMM's own view of itself: depth, run state, and when a forked child was built, restored and first ran. */
  async status(): Promise<VmmStatus> {
    if (!this.control) throw new CladeError('killed', `sandbox ${this.id}'s VMM is not connected`);
    const reply = await this.control.request(['status']);
    const timing = (reply.timing ?? {}) as Partial<VmmProcessTiming>;
    return {
      pid: Number(reply.pid),
      depth: Number(reply.depth),
      state: String(reply.state),
      timing: { forkNs: Number(timing.forkNs ?? 0), builtNs: Number(timing.builtNs ?? 0), restoredNs: Number(timing.restoredNs ?? 0), firstRunNs: Number(timing.firstRunNs ?? 0), firstExitNs: Number(timing.firstExitNs ?? 0) },
    };
  }

  diagnostics(): string {
    let serial = '';
    try {
      if (existsSync(this.files.serial)) serial = readFileSync(this.files.serial, 'utf8').slice(-2048);
    } catch {
      // The log may already be gone.
    }
    return [serial.trim() && `console:\n${serial.trim()}`, this.stderrTail().trim() && `clade-vmm:\n${this.stderrTail().trim()}`].filter(Boolean).join('\n');
  }

  async kill(): Promise<void> {
    this.control?.close();
    if (isVmmProcess(this.pid, this.startTicks)) {
      try {
        process.kill(this.pid, 'SIGKILL'); // this process only: its forked children are sandboxes of their own
      } catch {
        // Already gone.
      }
      for (let i = 0; i < 200 && isVmmProcess(this.pid, this.startTicks); i++) await new Promise((r) => setTimeout(r, 10));
    }
    this.markExited();
    rmSync(this.runDir, { recursive: true, force: true });
    const net = this.net;
    this.net = undefined; // released once, however often the VM is killed
    await net?.release();
  }
}

/** The writer child reports in `donePath`; it is done (or dead) well before the deadline unless the disk stalls. */
async function waitForWriter(donePath: string, writerPid: number, deadline: number): Promise<Record<string, unknown>> {
  for (;;) {
    if (existsSync(donePath)) return JSON.parse(readFileSync(donePath, 'utf8')) as Record<string, unknown>;
    if (!isVmmProcess(writerPid, undefined) && !existsSync(donePath)) throw new CladeError('internal', 'the clade-vmm snapshot writer ended without reporting a result');
    if (performance.now() > deadline) {
      try {
        process.kill(writerPid, 'SIGKILL');
      } catch {
        // Already gone.
      }
      throw new CladeError('timeout', 'the clade-vmm snapshot writer did not finish in time');
    }
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** True while `pid` is the clade-vmm process that started at `startTicks` (and not a zombie). */
export function isVmmProcess(pid: number, startTicks: string | undefined): boolean {
  return isSameProcess(pid, startTicks, 'clade-vmm');
}
