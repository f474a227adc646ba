import { spawn, type ChildProcess } from 'node:child_process';
import { closeSync, constants, existsSync, fstatSync, openSync, readFileSync, readSync, rmSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { CladeError } from '../../util/errors.js';
import { assertRamFits, closeQuietly, createRamFile } from '../../util/home.js';
import { assertSocketPath, type MachineShape, type Vm, type VmRecord } from '../engine.js';
import { imageKernelArgs } from '../../images/store.js';
import type { FrozenRam } from './frozen.js';
import { SerialLog } from '../serial-log.js';
import { pickAccelerator, probeKvm, type Accelerator } from '../../util/kvm-probe.js';
import { QmpClient } from './qmp.js';
import { GUEST_MAC, GUEST_NET_CMDLINE, NetRelay, type PortMapping } from '../network.js';

export const QEMU_BINARY = process.env.CLADE_QEMU ?? 'qemu-system-x86_64';
/** TCG's translation cache per VM; QEMU's default reserves far more than a sandbox uses. */
const TCG_TB_MIB = 64;

export type Launch = {
  id: string;
  shape: MachineShape;
  runDir: string;
  memory: { file: string; shared: boolean };
  /** An open descriptor of memory.file that QEMU inherits and maps instead of opening the file by name. */
  memoryFd?: number;
  /** Kernel command line additions; absent for VMs that will receive state instead of booting. */
  boot?: { token: Buffer; hostname: string };
  /** The sandbox's network, which the VM's NIC connects to; the VM holds one reference, released when it ends. */
  net?: NetRelay;
};

/**
 * A new VM's RAM file: made by us (exclusively, 0600, checked to fit in the
 * RAM filesystem) and handed to QEMU as an open descriptor, so QEMU never
 * creates or opens guest RAM by name.
 */
export async function withNewRamFile<T>(file: string, memoryMiB: number, start: (fd: number) => Promise<T>): Promise<T> {
  assertRamFits(memoryMiB);
  const fd = createRamFile(file);
  try {
    return await start(fd);
  } catch (err) {
    rmSync(file, { force: true });
    throw err;
  } finally {
    closeQuietly(fd); // QEMU holds its own
  }
}

export type RunFiles = { agent: string; qmp: string; console: string; serial: string; bootConfig: string };

export function runFiles(runDir: string): RunFiles {
  const files = { agent: join(runDir, 'agent.sock'), qmp: join(runDir, 'qmp.sock'), console: join(runDir, 'console.sock'), serial: join(runDir, 'serial.log'), bootConfig: join(runDir, 'boot.cfg') };
  assertSocketPath(files.console); // the longest socket name
  return files;
}

/** The fd number an inherited descriptor gets in QEMU: after stdin, stdout, stderr. */
const INHERITED_MEMORY_FD = 3;

export async function launch(l: Launch): Promise<QemuVm> {
  const files = runFiles(l.runDir);
  let vm: QemuVm;
  try {
    const accel = await pickAccelerator();
    const tscKhz = accel === 'tcg' ? (await probeKvm()).tscKhz : undefined;
    if (l.boot) writeBootConfig(files.bootConfig, kernelCmdline(l, tscKhz));
    const stdio: ('ignore' | 'pipe' | number)[] = ['ignore', 'ignore', 'pipe'];
    if (l.memoryFd !== undefined) stdio[INHERITED_MEMORY_FD] = l.memoryFd;
    const child = spawn(QEMU_BINARY, qemuArgs(l, accel, files), { stdio, detached: true });
    vm = new QemuVm(l, spawnedProcess(child), accel, files);
  } catch (err) {
    await l.net?.release(); // from here on the VM's kill releases it
    throw err;
  }
  if (l.boot) void removeOnceRead(files.bootConfig, files.qmp, () => vm.alive());
  try {
    await vm.started;
    // QEMU 7.2's stream netdev connects after the NIC is made, and the NIC keeps the link down it
    // saw then; a booting guest would find no carrier. Forks carry the link state in their migrated NIC.
    if (l.net && l.boot) await (await vm.qmp()).execute('set_link', { name: 'net0', up: true });
  } catch (err) {
    await vm.kill();
    throw err;
  }
  return vm;
}

type Exit = { code: number | null; signal: string | null };

/** How a QemuVm follows its process: a child it spawned, or a process it adopted by pid. */
type VmProcess = {
  pid: number;
  started: Promise<void>;
  exited: Promise<Exit>;
  stderr?: NodeJS.ReadableStream;
  /** Called when QEMU closes the QMP connection, which it does as it exits. */
  onQmpClosed?: () => void;
};

function spawnedProcess(child: ChildProcess): VmProcess {
  return {
    pid: child.pid ?? -1,
    stderr: child.stderr ?? undefined,
    exited: new Promise((resolve) => child.once('exit', (code, signal) => resolve({ code, signal }))),
    started: new Promise((resolve, reject) => {
      child.once('spawn', () => resolve());
      child.once('error', (err) => {
        const hint = (err as NodeJS.ErrnoException).code === 'ENOENT' ? `${QEMU_BINARY} is not installed: run \`sudo apt-get install qemu-system-x86\` (or \`clade doctor\`)` : err.message;
        reject(new CladeError('unavailable', hint));
      });
    }),
  };
}

/** True while `pid` is the QEMU process started for sandbox `id` (pids get reused). */
export function isSandboxVm(pid: number, id: string): boolean {
  try {
    return readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0').includes(`clade-${id}`);
  } catch {
    return false;
  }
}

/** An adopted process is not our child: its exit shows as its QMP socket closing, or its pid going. */
function adoptedProcess(pid: number, id: string): VmProcess {
  let check: () => void = () => undefined;
  const exited = new Promise<Exit>((resolve) => {
    check = () => {
      if (isSandboxVm(pid, id)) return;
      clearInterval(poll);
      resolve({ code: null, signal: null });
    };
    const poll = setInterval(check, 1000);
    poll.unref();
  });
  // QEMU closes QMP a moment before its /proc entry goes; look again shortly after. This timer is
  // not unref'd: it keeps a process that is waiting for the VM to die (kill, shutdown) from exiting first.
  return { pid, exited, started: Promise.resolve(), onQmpClosed: () => void setTimeout(check, 50) };
}

function kernelCmdline(l: Launch, tscKhz?: number): string {
  const cmdline = ['console=ttyS0', 'quiet', 'panic=-1', 'mitigations=off', 'random.trust_cpu=on', 'i8042.noaux'];
  // Under emulation the guest reads the host TSC; its own PIT calibration fails
  // when the host is busy and the kernel then hangs without a clocksource.
  if (tscKhz && tscKhz > 0) cmdline.push(`tsc_early_khz=${tscKhz}`, 'tsc=reliable');
  if (l.boot && l.shape.network) cmdline.push(GUEST_NET_CMDLINE);
  cmdline.push(...imageKernelArgs(l.shape.image));
  if (l.boot) cmdline.push(`clade.token=${l.boot.token.toString('hex')}`, `clade.id=${l.id}`, `clade.hostname=${l.boot.hostname}`);
  return cmdline.join(' ');
}

/**
 * The kernel command line carries the agent token, so it goes to QEMU in a
 * 0600 config file (read with -readconfig) instead of on QEMU's own command
 * line, which every local user can read in /proc.
 */
function writeBootConfig(path: string, cmdline: string): void {
  if (/["\\\n]/.test(cmdline)) throw new CladeError('internal', 'the kernel command line may not contain quotes, backslashes or line breaks');
  const fd = openSync(path, constants.O_WRONLY | constants.O_CREAT | constants.O_EXCL | constants.O_NOFOLLOW, 0o600);
  try {
    writeSync(fd, `[machine]\n  append = "${cmdline}"\n`);
  } finally {
    closeSync(fd);
  }
}

/** QEMU reads its config while parsing options, before it creates the QMP socket: then the file can go. */
async function removeOnceRead(config: string, qmpSocket: string, alive: () => boolean): Promise<void> {
  const deadline = Date.now() + 60_000;
  while (!existsSync(qmpSocket) && alive() && Date.now() < deadline) await new Promise((r) => setTimeout(r, 5));
  rmSync(config, { force: true });
}

function qemuArgs(l: Launch, accel: Accelerator, files: RunFiles): string[] {
  const memPath = l.memoryFd !== undefined ? `/proc/self/fd/${INHERITED_MEMORY_FD}` : l.memory.file;
  return [
    '-name', `clade-${l.id}`,
    '-M', 'microvm,pcie=on,rtc=on,memory-backend=ram',
    '-object', `memory-backend-file,id=ram,size=${l.shape.memoryMiB}M,mem-path=${memPath},share=${l.memory.shared ? 'on' : 'off'}`,
    ...(accel === 'kvm' ? ['-accel', 'kvm', '-cpu', 'host'] : ['-accel', `tcg,tb-size=${TCG_TB_MIB}`, '-cpu', 'max']),
    '-smp', String(l.shape.cpus),
    '-m', `${l.shape.memoryMiB}M`,
    '-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot',
    '-sandbox', 'on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny',
    // The console goes to a socket that the host reads into a capped log (SerialLog); QEMU
    // waits for that reader before it starts, so no boot message is lost.
    '-chardev', `socket,id=serial,path=${files.console},server=on,wait=on`,
    '-serial', 'chardev:serial',
    '-kernel', l.shape.image.kernel,
    '-initrd', l.shape.image.initramfs,
    ...rootDiskArgs(l.shape.image.disk),
    ...(l.boot ? ['-readconfig', files.bootConfig] : []),
    '-device', 'virtio-serial-pci,id=vs',
    '-chardev', `socket,id=agent,path=${files.agent},server=on,wait=off`,
    '-device', 'virtserialport,bus=vs.0,chardev=agent,name=org.clade.agent',
    ...netArgs(l.net),
    '-qmp', `unix:${files.qmp},server=on,wait=off`,
    ...(l.boot ? [] : ['-incoming', 'defer']),
  ];
}

/**
 * virtio-net on the sandbox's clade-net socket (QEMU's stream netdev: frames
 * with a 4-byte length, the protocol passt speaks). QEMU connects at start, so
 * the network runs before the VM does; forks' slots connect to their own.
 */
function netArgs(net: NetRelay | undefined): string[] {
  if (!net) return [];
  return ['-netdev', `stream,id=net0,server=off,addr.type=unix,addr.path=${net.socket}`, '-device', `virtio-net-pci,netdev=net0,mac=${GUEST_MAC}`];
}

/**
 * A disk image's root filesystem: read-only, shared by every VM of the image
 * (forks included, since it never changes), through the host page cache.
 * Forks and pre-started slots get the same device, so the migrated
 * virtio-blk state finds its disk.
 */
function rootDiskArgs(disk: string | undefined): string[] {
  if (!disk) return [];
  if (/,/.test(disk)) throw new CladeError('bad_request', `the image path ${disk} contains a comma, which QEMU's -drive cannot take; set CLADE_HOME to a path without commas`);
  return ['-drive', `file=${disk},if=none,id=rootfs,format=raw,readonly=on`, '-device', 'virtio-blk-pci,drive=rootfs,id=rootfs-disk'];
}

export class QemuVm implements Vm {
  readonly engine = 'qemu' as const;
  readonly id: string;
  readonly pid: number;
  readonly agentSocket: string;
  readonly accelerator: Accelerator;
  readonly shape: MachineShape;
  readonly runDir: string;
  readonly exited: Promise<{ code: number | null; signal: string | null }>;
  readonly started: Promise<void>;
  memory: { file: string; shared: boolean };
  /** The frozen RAM this VM maps copy-on-write, if it resumed one: released when the VM ends. */
  base?: FrozenRam;
  /** A VM process pre-started to continue this VM after its next fork (prewarm). */
  warmContinuation?: Promise<QemuVm>;
  /** The sandbox's network (shared with the VM processes that continue this one). */
  readonly net?: NetRelay;
  private warmPid?: number;
  private running = true;
  private netReleased = false;
  private stderrTail = '';
  private qmpClient?: Promise<QmpClient>;
  private readonly serial: SerialLog;

  constructor(
    l: Launch,
    private readonly proc: VmProcess,
    accel: Accelerator,
    private readonly files: RunFiles,
  ) {
    this.id = l.id;
    this.shape = l.shape;
    this.runDir = l.runDir;
    this.memory = { ...l.memory };
    if (l.net) this.net = l.net;
    this.agentSocket = files.agent;
    this.accelerator = accel;
    this.pid = proc.pid;
    proc.stderr?.on('data', (d: Buffer) => {
      this.stderrTail = (this.stderrTail + d.toString('utf8')).slice(-4096);
    });
    this.serial = new SerialLog(files.serial);
    void this.serial.attach(files.console, Date.now() + 30_000, () => this.running);
    this.exited = proc.exited.then((exit) => {
      this.running = false;
      this.serial.close();
      return exit;
    });
    this.started = proc.started.then(
      () => this.recordOwner(),
      (err: unknown) => {
        this.running = false;
        throw err;
      },
    );
  }

  /**
   * Takes over a running VM that another clade process started (a daemon
   * restarted after SIGKILL): this process becomes its owner, so reapers leave it alone.
   */
  static adopt(a: VmRecord, shape: MachineShape): QemuVm {
    // An owner killed in the middle of a fork may have renamed the RAM file for the fork's snapshot:
    // the VM still maps it, but it is no longer this VM's to freeze by name; the next fork first
    // gives the VM a RAM file of its own again (promotion).
    const memory = a.memory.shared && !existsSync(a.memory.file) ? { file: a.memory.file, shared: false } : a.memory;
    const net = a.net ? NetRelay.adopt(a.net, a.runDir) : undefined;
    const vm = new QemuVm({ id: a.id, shape, runDir: a.runDir, memory, ...(net ? { net } : {}) }, adoptedProcess(a.pid, a.id), a.accelerator, runFiles(a.runDir));
    vm.recordOwner();
    return vm;
  }

  /**
   * A VM whose owner was killed between pausing it (to freeze it for a fork or
   * snapshot) and handing it on is still paused: it runs again from here.
   */
  async resumeIfPaused(): Promise<void> {
    const qmp = await this.qmp();
    const { status } = await qmp.execute<{ status: string }>('query-status');
    if (status === 'paused' || status === 'postmigrate' || status === 'finish-migrate') await qmp.execute('cont');
  }

  /** vm.json names the process that owns the VM; reapOrphans kills VMs whose owner is gone. */
  recordOwner(): void {
    writeFileSync(join(this.runDir, 'vm.json'), JSON.stringify({ ...this.toRecord(), ownerPid: process.pid }) + '\n', { mode: 0o600 });
  }

  toRecord(): VmRecord {
    const { manifest } = this.shape.image;
    const shape = { imageDigest: manifest.digest, memoryMiB: this.shape.memoryMiB, cpus: this.shape.cpus, ...(this.shape.network ? { network: this.shape.network } : {}) };
    return { engine: 'qemu', id: this.id, pid: this.pid, runDir: this.runDir, accelerator: this.accelerator, memory: { ...this.memory }, shape, ...(this.net ? { net: this.net.toRecord() } : {}) };
  }

  get ports(): PortMapping[] {
    return this.net?.ports ?? [];
  }

  pids(): number[] {
    return [this.pid, ...(this.warmPid ? [this.warmPid] : []), ...(this.net ? [this.net.pid] : [])];
  }

  /** Keeps a VM process pre-started for this VM's next fork (replacing an older one). */
  setWarmContinuation(vm: Promise<QemuVm>): void {
    void this.warmContinuation?.then((old) => old.kill()).catch(() => undefined);
    this.warmContinuation = vm;
    vm.then((v) => (this.warmPid = v.pid)).catch(() => undefined);
  }

  takeWarmContinuation(): Promise<QemuVm> | undefined {
    const vm = this.warmContinuation;
    this.warmContinuation = undefined;
    this.warmPid = undefined;
    return vm;
  }

  alive(): boolean {
    return this.running;
  }

  /** The QMP control connection, opened on first use (QEMU creates the socket while starting). */
  qmp(): Promise<QmpClient> {
    this.qmpClient ??= (async () => {
      const deadline = Date.now() + 10_000;
      for (;;) {
        try {
          const client = await QmpClient.connect(this.files.qmp);
          void client.closed.then(() => this.proc.onQmpClosed?.());
          return client;
        } catch (err) {
          if (!this.running) throw new CladeError('boot_failed', `QEMU exited while starting: ${this.diagnostics()}`);
          if (Date.now() > deadline) throw new CladeError('timeout', `QEMU control socket did not open: ${(err as Error).message}`);
          await new Promise((r) => setTimeout(r, 5));
        }
      }
    })();
    return this.qmpClient;
  }

  /** Hands the RAM file to a snapshot: killing this VM will no longer delete it. */
  releaseMemoryFile(): string {
    const file = this.memory.file;
    this.memory = { file, shared: false };
    return file;
  }

  /** Takes the RAM file back (at `file`) after a fork that failed before anyone else mapped it. */
  reclaimMemoryFile(file: string): void {
    this.memory = { file, shared: true };
  }

  diagnostics(): string {
    let serial = '';
    try {
      if (existsSync(this.files.serial)) serial = readTail(this.files.serial, 2048);
    } catch {
      // The log may already be gone.
    }
    return [serial.trim() && `console:\n${serial.trim()}`, this.stderrTail.trim() && `qemu:\n${this.stderrTail.trim()}`].filter(Boolean).join('\n');
  }

  async kill(): Promise<void> {
    await this.takeWarmContinuation()?.then((vm) => vm.kill()).catch(() => undefined);
    if (this.running) {
      try {
        process.kill(this.pid, 'SIGKILL');
      } catch {
        // Already gone.
      }
      await this.exited;
    }
    void this.qmpClient?.then((q) => q.close()).catch(() => undefined);
    this.serial.close();
    rmSync(this.runDir, { recursive: true, force: true });
    if (this.memory.shared) rmSync(this.memory.file, { force: true });
    if (!this.netReleased) {
      this.netReleased = true;
      await this.net?.release();
    }
    const base = this.base;
    this.base = undefined;
    base?.release();
  }
}

/** The last `bytes` of a file, without reading the rest. */
function readTail(path: string, bytes: number): string {
  const fd = openSync(path, constants.O_RDONLY | constants.O_NOFOLLOW);
  try {
    const size = fstatSync(fd).size;
    const buf = Buffer.alloc(Math.min(bytes, size));
    readSync(fd, buf, 0, buf.length, size - buf.length);
    return buf.toString('utf8');
  } finally {
    closeSync(fd);
  }
}
