import { randomBytes } from 'node:crypto';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import type { AgentClient } from '../agent-protocol/client.js';
import type { EngineName, MachineShape, Vm } from '../engines/engine.js';
import type { PortMapping } from '../engines/network.js';
import { ensurePrivateDir, homePaths } from '../util/home.js';
import { isSameProcess, processStartTicks } from '../util/process.js';
import type { CommandHost } from './commands.js';
import type { InterpreterHost, InterpreterSession } from './interpreter.js';

export function newSandboxId(): string {
  return 'sb-' + randomBytes(6).toString('hex');
}

/** A sandbox's directory: one run directory per VM process it has had (vm-<n>). */
export function sandboxDir(id: string): string {
  return join(homePaths.sandboxes(), id);
}

/**
 * Makes a new sandbox's directory and its first run directory, marked with the
 * process that made it (pid and start time). Until the VM's record exists, the
 * mark is how a reaper tells a sandbox still starting from one whose maker was
 * killed before it got that far.
 */
export function newRunDir(id: string): string {
  const runDir = ensurePrivateDir(join(sandboxDir(id), 'vm-0'));
  writeFileSync(join(sandboxDir(id), 'maker'), `${process.pid} ${processStartTicks(process.pid) ?? ''}\n`, { mode: 0o600, flag: 'wx' });
  return runDir;
}

/** Whether the process that made a sandbox's directory is gone: true, false, or undefined when the mark is missing or unreadable. */
export function makerGone(id: string): boolean | undefined {
  let mark: string;
  try {
    mark = readFileSync(join(sandboxDir(id), 'maker'), 'utf8');
  } catch {
    return undefined;
  }
  const m = /^(\d{1,7}) (\d{1,20})\n$/.exec(mark);
  if (!m) return undefined;
  return !isSameProcess(Number(m[1]), m[2]);
}

/**
 * A sandbox as the host sees it: its current VM process, the authenticated
 * channel to its agent, and what it was made from. An engine may move a
 * sandbox to another VM process (a qemu fork's parent continues in a new one),
 * so `vm` changes while the sandbox's identity, token and agent channel stay.
 */
export class LiveSandbox implements CommandHost, InterpreterHost {
  private killing?: Promise<void>;
  private exclusiveTail: Promise<unknown> = Promise.resolve();
  interpreter?: InterpreterSession;
  interpreterExecId?: number;
  /** Persistent interpreters besides the sandbox's own, by name: processes of their own, forked with the sandbox. */
  readonly interpreters = new Map<string, NamedInterpreter>();
  /** The persistent snapshot this sandbox descends from, if any. */
  snapshotTag?: string;
  /**
   * Called when the sandbox has moved to another VM process, before the old
   * one is killed: a daemon rewrites its record here, so a crash at any moment
   * leaves a record naming a VM that still runs the guest.
   */
  onVmChanged?: () => void;

  constructor(
    readonly id: string,
    public vm: Vm,
    readonly agent: AgentClient,
    public token: Buffer,
    readonly shape: MachineShape,
    readonly env: Record<string, string>,
    readonly createdAt: Date,
    readonly bootMs: number,
    readonly parentId: string | undefined,
    /** Called once the sandbox is gone (killed, or its VM ended), to forget it. */
    private readonly onGone: (sb: LiveSandbox) => void,
  ) {
    this.watch(vm);
  }

  get alive(): boolean {
    return this.vm.alive() && !this.killing;
  }

  get engineName(): EngineName {
    return this.vm.engine;
  }

  /** The guest's forwarded TCP ports and the host addresses that reach them (its current VM's: a fork's child has its own). */
  get ports(): readonly PortMapping[] {
    return this.vm.ports;
  }

  /** The named interpreters whose process has started: what a fork's child or a restarted daemon attaches to. */
  startedInterpreters(): NamedInterpreterRecord[] {
    return [...this.interpreters.values()].flatMap((n) => (n.interpreterExecId ? [{ name: n.name, execId: n.interpreterExecId, ...(n.interpreterCwd !== undefined ? { cwd: n.interpreterCwd } : {}) }] : []));
  }

  /** The named interpreter `name`, made (not yet started: the first runCode starts it) if there is none. */
  namedInterpreter(name: string, cwd?: string): NamedInterpreter {
    let named = this.interpreters.get(name);
    if (!named) {
      named = new NamedInterpreter(this, name, cwd);
      this.interpreters.set(name, named);
    }
    return named;
  }

  /**
   * Runs operations that pause or move this sandbox's VM (fork, snapshot,
   * prewarm) one at a time: two at once would freeze the same RAM twice.
   */
  exclusive<T>(fn: () => Promise<T>): Promise<T> {
    const run = this.exclusiveTail.then(fn);
    this.exclusiveTail = run.catch(() => undefined);
    return run;
  }

  /** Puts the sandbox on another VM process and retires the old one; the agent channel follows. */
  async replaceVm(next: Vm): Promise<void> {
    if (next === this.vm) return;
    const old = this.vm;
    this.vm = next;
    this.watch(next);
    this.onVmChanged?.();
    await this.agent.rebind(next.agentSocket, Date.now() + 10_000);
    void old.kill();
  }

  /** Stops the VM, then removes the sandbox's directory (only once its processes are gone). Safe to call twice. */
  kill(): Promise<void> {
    this.killing ??= (async () => {
      this.agent.close();
      await this.vm.kill();
      rmSync(sandboxDir(this.id), { recursive: true, force: true });
      this.onGone(this);
    })();
    return this.killing;
  }

  /** If the current VM dies on its own (crash, guest poweroff), the sandbox ends. */
  private watch(vm: Vm): void {
    void vm.exited.then(() => {
      if (this.vm === vm && !this.killing) void this.kill();
    });
  }
}

/** A named interpreter's process in the guest, as a child or a record knows it. */
export type NamedInterpreterRecord = { name: string; execId: number; cwd?: string };

/**
 * A persistent interpreter of a sandbox besides its own (runCode's): its own
 * Python process and namespace in the same guest, started on first use. It
 * is part of the guest, so a fork's children have it too.
 */
export class NamedInterpreter implements InterpreterHost {
  interpreter?: InterpreterSession;
  interpreterExecId?: number;

  constructor(
    private readonly sandbox: LiveSandbox,
    readonly name: string,
    readonly interpreterCwd?: string,
  ) {}

  get id(): string {
    return this.sandbox.id;
  }

  get agent(): AgentClient {
    return this.sandbox.agent;
  }

  get env(): Record<string, string> {
    return this.sandbox.env;
  }

  get alive(): boolean {
    return this.sandbox.alive;
  }
}
