import { existsSync, readdirSync, readFileSync, readlinkSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { homePaths } from '../../src/util/home.js';
import { TestDaemon } from '../helpers/daemon.js';
import { waitFor } from '../helpers/leaks.js';

// The daemon is SIGKILLed at a random moment while a client creates a sandbox
// and forks it 20 times, then restarted: every VM process must end up adopted
// (and answering) or killed, none orphaned, and every sandbox the client was
// told about must still be there, and no sandbox directory may be left.

const ROUNDS = 20;
const FORK_COUNT = 20;

type View = { sandboxId: string; pid: number };
type Child = { sandboxId: string } | { error: { code: string; message: string } };

const daemon = new TestDaemon();

/** Pids of this clade home's VM processes (their command line names a path under its sandboxes directory). */
function homeVmPids(): number[] {
  const marker = `${homePaths.sandboxes()}/`;
  const pids: number[] = [];
  for (const entry of readdirSync('/proc')) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      if (!/qemu-system|clade-vmm/.test(readlinkSync(`/proc/${entry}/exe`))) continue;
      const stat = readFileSync(`/proc/${entry}/stat`, 'utf8');
      if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z')) continue;
      if (readFileSync(`/proc/${entry}/cmdline`, 'utf8').includes(marker)) pids.push(Number(entry));
    } catch {
      // Gone meanwhile.
    }
  }
  return pids;
}

/** Sandbox directories of this clade home that were not there before this file ran. */
const before = new Set<string>();
const sandboxDirs = () => (existsSync(homePaths.sandboxes()) ? readdirSync(homePaths.sandboxes()) : []).filter((d) => d.startsWith('sb-') && !before.has(d));

/** The counts the restarted daemon logged when it recovered its state. */
function recovered(log: string): { adopted: number; dropped: number; killed: number } {
  const line = log.split('\n').filter((l) => l.includes('"msg":"state recovered"')).at(-1);
  const r = JSON.parse(line ?? '{}') as { adopted?: string[]; dropped?: string[]; reaped?: { killed: number } };
  return { adopted: r.adopted?.length ?? 0, dropped: r.dropped?.length ?? 0, killed: r.reaped?.killed ?? 0 };
}

beforeAll(async () => {
  await daemon.start();
  for (const d of sandboxDirs()) before.add(d);
});

afterAll(async () => {
  const client = daemon.client();
  const views = await client.json<View[]>('GET', '/v1/sandboxes').catch(() => [] as View[]);
  for (const v of views) await client.json('DELETE', `/v1/sandboxes/${v.sandboxId}`).catch(() => undefined);
  await daemon.stop('SIGTERM');
  rmSync(daemon.dir, { recursive: true, force: true });
});

describe('chaos: the daemon killed at random moments', () => {
  it(`${ROUNDS} rounds of create + fork ${FORK_COUNT}, SIGKILL, restart: every VM adopted or killed, no record lost`, async () => {
    const totals = { acknowledged: 0, adopted: 0, dropped: 0, killed: 0, orphans: 0, lost: 0 };
    // Kill moments are spread over how long create + fork take on this machine now (measured by the
    // first round, which is killed only after its work is done), and a little past it.
    let windowMs = 0;
    for (let round = 1; round <= ROUNDS; round++) {
      const client = daemon.client();
      const acknowledged = new Set<string>();
      const t0 = Date.now();
      const work = (async () => {
        const parent = await client.json<View>('POST', '/v1/sandboxes', {});
        acknowledged.add(parent.sandboxId);
        const kids = await client.json<Child[]>('POST', `/v1/sandboxes/${parent.sandboxId}/fork`, { count: FORK_COUNT });
        for (const k of kids) if ('sandboxId' in k) acknowledged.add(k.sandboxId);
      })().catch(() => undefined); // the daemon dies under it
      const killAt = round === 1 ? Infinity : Math.floor(Math.random() * windowMs * 1.2);
      await Promise.race([work, new Promise((r) => setTimeout(r, Math.min(killAt, 600_000)))]);
      if (round === 1) windowMs = Date.now() - t0;
      await daemon.stop('SIGKILL');
      await work;

      daemon.log = '';
      await daemon.start();
      const counts = recovered(daemon.log);
      const views = await client.json<View[]>('GET', '/v1/sandboxes');
      const adopted = new Set(views.map((v) => v.sandboxId));
      const adoptedPids = new Set(views.map((v) => v.pid));
      const lost = [...acknowledged].filter((id) => !adopted.has(id));
      await waitFor(() => homeVmPids().every((p) => adoptedPids.has(p)), 10_000);
      const orphans = homeVmPids().filter((p) => !adoptedPids.has(p));
      // Adopted means answering: each runs a command (all at once, as clients would).
      const answers = await Promise.all(views.map((v) => client.json<{ stdout: string }>('POST', `/v1/sandboxes/${v.sandboxId}/exec`, { cmd: 'echo ok' })));
      for (const r of answers) expect(r.stdout).toBe('ok\n');
      console.log(`round ${round}: killed at ${round === 1 ? `the end (${windowMs} ms)` : `${killAt} ms`}; acknowledged ${acknowledged.size}, adopted ${counts.adopted}, dropped ${counts.dropped}, VM processes killed ${counts.killed}, orphans ${orphans.length}, lost ${lost.length}`);
      totals.acknowledged += acknowledged.size;
      totals.adopted += counts.adopted;
      totals.dropped += counts.dropped;
      totals.killed += counts.killed;
      totals.orphans += orphans.length;
      totals.lost += lost.length;
      const why = daemon.log.split('\n').filter((l) => l.includes('could not adopt'));
      expect(lost, `round ${round}: sandboxes the client was told about are gone:\n${why.join('\n')}`).toEqual([]);
      expect(orphans, `round ${round}: VM processes neither adopted nor killed`).toEqual([]);

      await Promise.all(views.map((v) => client.json('DELETE', `/v1/sandboxes/${v.sandboxId}`)));
      expect(await waitFor(() => homeVmPids().length === 0, 15_000)).toBe(true);
      // Nor is anything left on disk, not even the run directory of a VM the killed daemon never got to start.
      // (A kill inside newRunDir, between making a sandbox directory and its run directory and mark, leaves it
      // empty and unmarked; the reaper removes it after two minutes.)
      const leftovers = sandboxDirs().filter((d) => readdirSync(join(homePaths.sandboxes(), d)).length > 0);
      expect(leftovers, `round ${round}: sandbox directories left behind`).toEqual([]);
    }
    console.log(`chaos totals over ${ROUNDS} rounds: ${JSON.stringify(totals)}`);
  }, 900_000);
});
