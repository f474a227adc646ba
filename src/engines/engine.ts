import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { ResolvedImage } from '../images/store.js';
import { CladeError } from '../util/errors.js';
import { ensurePrivateDir } from '../util/home.js';
import type { Accelerator } from '../util/kvm-probe.js';
import type { NetRecord, NetworkSpec, PortMapping } from './network.js';

export type EngineName = 'qemu' | 'vmm';

/** The machine shape; a snapshot can only be resumed by a VM of the same shape. */
export type MachineShape = {
  image: ResolvedImage;
  memoryMiB: number;
  cpus: number;
  /** A network device and a user-mode stack of its own on the host (docs/network.md); forks inherit the policy and get their own host ports. */
  network?: NetworkSpec;
};

/** What an engine needs to start one VM. */
export type BootSpec = MachineShape & {
  id: string;
  /** 32-byte secret the agent will require on every request. */
  token: Buffer;
  hostname: string;
  /** Private directory for this VM's sockets and logs; the engine removes it when the VM ends. */
  runDir: string;
};

/** Where a new VM (a fork's child, a start from a snapshot) lives: its sandbox id and its own run directory. */
export type VmTarget = { id: string; runDir: string };

/**
 * The one persisted shape of a VM: what its `vm.json` holds (with the owner's
 * pid) and what a daemon's record of a sandbox holds, and all an engine needs
 * to take the VM over again (`adopt`) or to tell whether it still runs.
 */
export type VmRecord = {
  engine: EngineName;
  id: string;
  pid: number;
  /** When the process started (/proc/<pid>/stat field 22): a reused pid does not share it. */
  startTicks?: string;
  runDir: string;
  accelerator: Accelerator;
  /** The VM's RAM file and whether the VM writes to it (shared) or maps it copy-on-write; '' when RAM is anonymous. */
  memory: { file: string; shared: boolean };
  shape: { imageDigest: string; memoryMiB: number; cpus: number; network?: NetworkSpec };
  /** The VM's network process on the host, when it has a network. */
  net?: NetRecord;
};

/** A running VM as the engine sees it. The agent channel is a unix socket. */
export interface Vm {
  readonly engine: EngineName;
  readonly id: string;
  readonly pid: number;
  readonly runDir: string;
  readonly agentSocket: string;
  readonly accelerator: Accelerator;
  readonly shape: MachineShape;
  /** The guest's forwarded TCP ports and the host addresses that reach them; empty without a network. */
  readonly ports: readonly PortMapping[];
  alive(): boolean;
  /** Resolves when the VM process has exited. */
  readonly exited: Promise<{ code: number | null; signal: string | null }>;
  /** Last lines of the VM's console and stderr, for error messages. */
  diagnostics(): string;
  /** Stops the VM at once and removes every file it owns. Safe to call twice. */
  kill(): Promise<void>;
  /** Processes to SIGKILL when the owner exits abruptly: the VM and whatever the engine pre-started for it. */
  pids(): number[];
  toRecord(): VmRecord;
}

export type ForkTimings = {
  /** Parent stopped → parent running again, ms. */
  parentPauseMs: number;
  /** qemu: promotion of a copy-on-write parent to its own RAM file (a RAM copy), ms; 0 if not needed. */
  promoteMs: number;
  /** qemu: VM processes taken ready from a pool, and started for this fork. */
  warmSlots: number;
  coldSlots: number;
  /** qemu: per child, its device state loaded into its VM process until that VM runs, ms. Empty on vmm. */
  childRestoreMs: number[];
};

export type ForkResult = {
  /** The VM the parent continues in: the same one, or a new process that resumed it. */
  parent: Vm;
  /** One entry per target, in order: a running VM that resumed the parent's state, or why that one failed. */
  children: (Vm | CladeError)[];
  timings: ForkTimings;
};

/** A snapshot to disk as an engine took it: the files are written, the parent runs on (perhaps in a new process). */
export type SnapshotResult = {
  parent: Vm;
  /** Hashes the engine computed while writing, so the caller need not read the files again. */
  hashed: Partial<Record<'memory.raw' | 'state.bin', { sha256: string; bytes: number }>>;
  timings: { pauseMs: number; totalMs: number } & Record<string, number>;
};

/** A persistent snapshot's files, opened and checked by the caller: an engine uses these descriptors, never the paths. */
export type SnapshotSource = {
  dir: string;
  tag: string;
  shape: MachineShape;
  memory: { path: string; fd: number };
  state: { fd: number; bytes: Buffer };
};

/** What the core does while an engine pauses or moves a VM. */
export type PauseHooks = {
  /** Just before the pause: the agent channel delivers everything written so far. */
  beforePause(): Promise<void>;
  /**
   * The VM now runs in another process (a qemu fork's continuation, a
   * promotion): the core moves the agent channel and its records there, then
   * the old process may go.
   */
  moved(vm: Vm): Promise<void>;
};

/** Makes the id and run directory of a new VM (a child, a pre-started slot): the core's, so sandbox ids stay the core's. */
export type NewTarget = () => VmTarget;

/**
 * A way to run VMs. Everything engine-specific lives behind this: how a VM
 * boots, how it forks (qemu freezes RAM into a file and resumes children from
 * pre-started processes; vmm is fork(2) of its process), how it is written to
 * and started from disk, and how a VM another process started is taken over.
 * The core drives every engine the same way, and a fake engine can stand in.
 */
export interface Engine {
  readonly name: EngineName;
  /** Why this engine cannot run VMs here, or undefined when it can. */
  unavailableReason(): Promise<string | undefined>;
  /** Why this engine cannot run a VM of this shape (e.g. an image it has no device for), or undefined. */
  refusesShape?(shape: MachineShape): string | undefined;
  boot(spec: BootSpec): Promise<Vm>;
  /** Forks a running VM into `count` children, in one pause of the parent where the engine can. */
  fork(parent: Vm, count: number, newTarget: NewTarget, hooks: PauseHooks): Promise<ForkResult>;
  /** Writes memory.raw and state.bin of a running VM into `dir` (an empty private directory). */
  snapshot(vm: Vm, dir: string, hooks: PauseHooks): Promise<SnapshotResult>;
  /** Starts `count` VMs from a snapshot this engine took; the caller keeps the source's descriptors open until this returns. */
  restore(source: SnapshotSource, count: number, newTarget: NewTarget): Promise<(Vm | CladeError)[]>;
  /** Takes over a VM another process started (a daemon restarted after a crash). */
  adopt(record: VmRecord, shape: MachineShape): Promise<Vm>;
  /** Whether the recorded VM process still runs (not just a process that got its pid). */
  recordedAlive(record: VmRecord): boolean;
  /** Kills the recorded VM process if it still runs (synchronously: reapers run where there is no time for more). */
  killRecorded(record: VmRecord): void;
  /** Prepares `size` forks of `vm` ahead of time; may move the VM to a new process (through `hooks.moved`). */
  prewarm(vm: Vm, size: number, newTarget: NewTarget, hooks: PauseHooks): Promise<void>;
  /** Keeps `size` starts of a snapshot ready ahead of time; takes over the source's descriptors (`close` when done with them). */
  warmPool(source: SnapshotSource & { close(): Promise<void> }, size: number, newTarget: NewTarget): Promise<void>;
  /** VM processes started ahead of time (prewarm, warmPool) and waiting. */
  readonly preparedVms: number;
  /** At process exit, synchronously: kills what the engine started ahead of time. */
  releaseAllSync(): void;
  /** A VM binary of this engine, by /proc/<pid>/exe: for finding VM processes nothing records. */
  readonly processPattern: RegExp;
}

/**
 * The run directory for the next process of the VM whose directory is
 * `current` (vm-<n> → the first free vm-<n+k>): a VM that moves to a new
 * process gets a fresh directory beside its old one.
 */
export function nextRunDir(current: string): string {
  const n = Number(/vm-(\d+)$/.exec(current)?.[1] ?? 0);
  for (let k = n + 1; ; k++) {
    const dir = join(dirname(current), `vm-${k}`);
    if (!existsSync(dir)) return ensurePrivateDir(dir);
  }
}

/** Longest path a unix socket can bind (sun_path is 108 bytes with its NUL). */
const UNIX_PATH_MAX = 107;

/** Every VM's sockets live in its run directory under the clade home, whose length is the user's to choose. */
export function assertSocketPath(path: string): void {
  if (path.length > UNIX_PATH_MAX) throw new CladeError('bad_request', `the clade home path is too long for unix sockets (${path}); set CLADE_HOME to a shorter directory`);
}
