import { existsSync, readdirSync, readFileSync, readlinkSync, rmdirSync, rmSync, statSync } from 'node:fs';
import { join } from 'node:path';
import type { Engine } from '../engines/engine.js';
import { homePaths, memoryDir } from '../util/home.js';
import { killPidQuietly, processAlive, procStatFields } from '../util/process.js';
import { validVmFile, type VmFile } from './records.js';
import { type LiveSandbox, makerGone, sandboxDir } from './sandbox.js';

/** A run directory or RAM file this young, with no owner recorded yet, may belong to a VM still starting. */
const STARTING_GRACE_MS = 120_000;

/**
 * Removes what a process that died without cleaning up (SIGKILL, power loss)
 * left behind: VM processes whose owner is gone, their directories and RAM
 * files, and VM processes of this clade home that no record names at all
 * (a fork's child whose owner died before it wrote the child's record).
 * `live` are this process's own sandboxes, which are never touched.
 */
export function reapOrphans(live: LiveSandbox[], engines: Engine[]): { killed: number; removed: number } {
  const dir = homePaths.sandboxes();
  let killed = 0;
  let removed = 0;
  if (!existsSync(dir)) return { killed, removed };
  const ours = new Set(live.map((s) => s.id));
  const recorded = new Set<number>(live.flatMap((s) => s.vm.pids()));
  const engineOf = (name: string) => engines.find((e) => e.name === name);
  for (const id of readdirSync(dir)) {
    if (ours.has(id) || !/^sb-[0-9a-f]{12}$/.test(id)) continue;
    const sbDir = join(dir, id);
    const vms = readdirSync(sbDir).filter((d) => /^vm-\d+$/.test(d));
    const files = vms.map((v) => readVmFile(join(sbDir, v, 'vm.json'))).filter((m): m is VmFile => m !== undefined && m.id === id);
    if (files.length === 0) {
      // No VM record yet: its maker may still be starting it. Gone makers are judged at once, unmarked directories by age.
      const gone = makerGone(id);
      if (gone ?? Date.now() - statSync(sbDir).mtimeMs > STARTING_GRACE_MS) (rmSync(sbDir, { recursive: true, force: true }), removed++);
      continue;
    }
    if (files.some((m) => processAlive(m.ownerPid))) {
      for (const m of files) recorded.add(m.pid);
      continue;
    }
    for (const m of files) {
      const engine = engineOf(m.engine);
      if (engine?.recordedAlive(m)) (engine.killRecorded(m), killed++);
      if (m.memory.shared) rmSync(m.memory.file, { force: true });
    }
    rmSync(sbDir, { recursive: true, force: true });
    removed++;
  }
  killed += reapUnrecordedVms(recorded, engines);
  reapMemoryFiles(live);
  return { killed, removed };
}

/**
 * VM processes of this clade home (their command line names a path under its
 * sandboxes directory) that no live owner records. A process whose parent is
 * still alive (other than init) is being started or forked right now and is
 * left alone; one whose parent is gone can never be recorded any more.
 */
function reapUnrecordedVms(recorded: Set<number>, engines: Engine[]): number {
  const marker = `${homePaths.sandboxes()}/`;
  let killed = 0;
  for (const p of vmProcesses(engines)) {
    if (recorded.has(p.pid) || !p.cmdline.includes(marker)) continue;
    if (p.ppid > 1 && processAlive(p.ppid)) continue;
    killPidQuietly(p.pid);
    killed++;
  }
  return killed;
}

/** This user's VM processes of the given engines, from /proc. */
function vmProcesses(engines: Engine[]): { pid: number; ppid: number; cmdline: string }[] {
  const out: { pid: number; ppid: number; cmdline: string }[] = [];
  const uid = process.getuid?.();
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (uid !== undefined && statSync(`/proc/${entry}`).uid !== uid) continue;
      // The exe link names the VM binary only once exec has replaced the starting process, cmdline included.
      const exe = readlinkSync(`/proc/${entry}/exe`);
      if (!engines.some((e) => e.processPattern.test(exe))) continue;
      const fields = procStatFields(Number(entry));
      if (fields[0] === 'Z') continue;
      out.push({ pid: Number(entry), ppid: Number(fields[1]), cmdline: readFileSync(`/proc/${entry}/cmdline`, 'utf8').replaceAll('\0', ' ') });
    } catch {
      // Gone meanwhile, or not readable: not ours to judge.
    }
  }
  return out;
}

/** vm.json, checked: only a record of the right shape, pointing where clade puts things, is used. */
function readVmFile(path: string): VmFile | undefined {
  try {
    return validVmFile(JSON.parse(readFileSync(path, 'utf8')));
  } catch {
    return undefined;
  }
}

/** RAM files are named snap-<owner pid>-… or <sandbox id>.mem; remove those whose owner is gone. */
function reapMemoryFiles(live: LiveSandbox[]): void {
  const dir = memoryDir();
  if (!existsSync(dir)) return;
  const inUse = new Set(live.map((s) => s.vm.toRecord().memory.file));
  for (const f of readdirSync(dir)) {
    const path = join(dir, f);
    if (inUse.has(path)) continue;
    const owner = /^snap-(\d+)-/.exec(f);
    if (owner && processAlive(Number(owner[1]))) continue;
    const sb = /^(sb-[0-9a-f]+)\.mem$/.exec(f);
    if (sb && existsSync(sandboxDir(sb[1]!))) continue;
    if (Date.now() - statSync(path).mtimeMs < STARTING_GRACE_MS && !owner) continue;
    rmSync(path, { force: true });
  }
}

/** The tmpfs directory for RAM files goes away with the last file in it. */
export function removeMemoryDirIfEmpty(): void {
  try {
    rmdirSync(memoryDir());
  } catch {
    // Still in use by another clade process, or already gone.
  }
}
