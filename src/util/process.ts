import { readFileSync, readlinkSync } from 'node:fs';

/** Small questions about host processes, asked by pid. */

/** True while a process with this pid exists (ours or another user's). */
export function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export function killPidQuietly(pid: number): void {
  try {
    process.kill(pid, 'SIGKILL');
  } catch {
    // Already gone.
  }
}

/** /proc/<pid>/stat from field 3 (state) on: the command name before it may hold spaces. */
export function procStatFields(pid: number): string[] {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  return stat.slice(stat.lastIndexOf(')') + 2).split(' ');
}

/** Field 22 of /proc/<pid>/stat: when the process started, which a reused pid does not share. */
export function processStartTicks(pid: number): string | undefined {
  try {
    return procStatFields(pid)[19];
  } catch {
    return undefined;
  }
}

/**
 * True while `pid` is a live (not zombie) process that started at `startTicks`
 * (any start time when undefined) and, when `binary` is given, runs a program
 * whose path contains it: the process a record names, not one that reused its pid.
 */
export function isSameProcess(pid: number, startTicks: string | undefined, binary?: string): boolean {
  try {
    if (binary !== undefined && !readlinkSync(`/proc/${pid}/exe`).includes(binary)) return false;
    const fields = procStatFields(pid);
    return fields[0] !== 'Z' && (startTicks === undefined || fields[19] === startTicks);
  } catch {
    return false;
  }
}
