// What the payloads run inside the runner share: one "check ok NAME" or
// "check FAIL NAME: why" line per check, the clade-vmm and network processes
// alive, a timer, and the final "done" line the host tests look for.
import { readdirSync, readlinkSync } from 'node:fs';

let failed = 0;

export function check(name, ok, detail = '') {
  if (!ok) failed++;
  console.log(ok ? `check ok ${name}` : `check FAIL ${name}: ${detail}`);
  return ok;
}

export function isVmmPid(pid) {
  try {
    return readlinkSync(`/proc/${pid}/exe`).endsWith('clade-vmm');
  } catch {
    return false; // gone, or a zombie (its exe link is unreadable)
  }
}

export function vmmPids() {
  return readdirSync('/proc').filter((p) => /^\d+$/.test(p) && isVmmPid(p));
}

export const ms = (t0) => (performance.now() - t0).toFixed(1);

export async function waitUntil(predicate, timeoutMs) {
  const deadline = Date.now() + timeoutMs;
  while (!predicate()) {
    if (Date.now() > deadline) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
  return true;
}

/** After everything is killed, no clade-vmm process may remain (give them 5 s to exit). */
export async function checkNoVmmLeft() {
  check('no-vmm-left', await waitUntil(() => vmmPids().length === 0, 5_000), vmmPids().join(' '));
}

/** Processes whose executable's file name is one of `names`, as "pid:path". */
export function processesNamed(names) {
  const found = [];
  for (const pid of readdirSync('/proc').filter((p) => /^\d+$/.test(p))) {
    try {
      const exe = readlinkSync(`/proc/${pid}/exe`);
      if (names.some((n) => exe.endsWith(`/${n}`))) found.push(`${pid}:${exe}`);
    } catch {
      // Gone, a zombie, or a kernel thread.
    }
  }
  return found;
}

/** The processes behind sandbox networks: clade-net and the passt each one runs. */
export const networkProcesses = () => processesNamed(['clade-net', 'passt', 'passt.avx2']);

/** After everything is killed, no clade-net or passt may remain (give them 5 s to exit). */
export async function checkNoNetworkLeft() {
  check('no-network-left', await waitUntil(() => networkProcesses().length === 0, 5_000), networkProcesses().join(' '));
}

export function done() {
  console.log(failed === 0 ? 'done' : `done with ${failed} failures`);
}
