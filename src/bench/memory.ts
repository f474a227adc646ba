import { readFileSync } from 'node:fs';

/** Proportional set size of a process in bytes (shared pages divided among their users). */
export function pssBytes(pid: number): number {
  try {
    const text = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
    const m = /^Pss:\s+(\d+) kB/m.exec(text);
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

/** Resident memory of a process in bytes, shared pages counted in full. */
export function rssBytes(pid: number): number {
  try {
    const m = /^Rss:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8'));
    return m ? Number(m[1]) * 1024 : 0;
  } catch {
    return 0;
  }
}

/** Private (unshared) resident memory of a process in bytes: what it would free on exit. */
export function privateBytes(pid: number): number {
  try {
    const text = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
    const get = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? 0) * 1024;
    return get('Private_Clean') + get('Private_Dirty');
  } catch {
    return 0;
  }
}

/** Host memory in use (MemTotal - MemAvailable), bytes. */
export function hostUsedBytes(): number {
  const text = readFileSync('/proc/meminfo', 'utf8');
  const get = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(text)?.[1] ?? 0) * 1024;
  return get('MemTotal') - get('MemAvailable');
}
