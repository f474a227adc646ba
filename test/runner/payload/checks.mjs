// What the payloads run inside the runner share: one "check ok NAME" or
// "check FAIL NAME: why" line per check, the clade-vmm processes alive, a
// timer, and the final "done" line the host tests look for.
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

export function done() {
  console.log(failed === 0 ? 'done' : `done with ${failed} failures`);
}
