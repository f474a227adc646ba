import { CladeError } from '../util/errors.js';
import type { ResolvedImage } from '../images/store.js';

export type EngineName = 'qemu' | 'vmm';

/** The machine shape; a snapshot can only be resumed by a VM of the same shape. */
export type MachineShape = {
  image: ResolvedImage;
  memoryMiB: number;
  cpus: number;
};

/** What an engine needs to start one VM. */
export type BootSpec = MachineShape & {
  id: string;
  /** 32-byte secret the agent will require on every request. */
  token: Buffer;
  hostname: string;
  /** Private directory for this VM's sockets and logs; the engine removes it when the VM ends. */
  runDir: string;
  /** File that holds guest RAM (in tmpfs); the VM owns it until a snapshot takes it. */
  memoryFile: string;
};

/** A VM process started ahead of time, waiting for a snapshot's device state. */
export type SlotSpec = MachineShape & {
  id: string;
  runDir: string;
  /** The snapshot's RAM, mapped privately (copy-on-write). */
  baseMemoryFile: string;
  /** The same file already open and checked: the VM maps it through this descriptor, not by name. */
  baseMemoryFd?: number;
};

/** A running VM as the engine sees it. The agent channel is a unix socket. */
export interface VmHandle {
  readonly id: string;
  readonly pid: number;
  readonly agentSocket: string;
  readonly accelerator: string;
  readonly shape: MachineShape;
  /** The VM's RAM file and whether the VM writes to it (shared) or maps it copy-on-write. */
  readonly memory: { file: string; shared: boolean };
  alive(): boolean;
  /** Resolves when the VM process has exited. */
  readonly exited: Promise<{ code: number | null; signal: string | null }>;
  /** Last lines of the VM's console and stderr, for error messages. */
  diagnostics(): string;
  /** Stops the VM at once and removes every file it owns. Safe to call twice. */
  kill(): Promise<void>;
}

export interface Engine {
  readonly name: EngineName;
  boot(spec: BootSpec): Promise<VmHandle>;
}

/** Longest path a unix socket can bind (sun_path is 108 bytes with its NUL). */
const UNIX_PATH_MAX = 107;

/** Every VM's sockets live in its run directory under the clade home, whose length is the user's to choose. */
export function assertSocketPath(path: string): void {
  if (path.length > UNIX_PATH_MAX) throw new CladeError('bad_request', `the clade home path is too long for unix sockets (${path}); set CLADE_HOME to a shorter directory`);
}
