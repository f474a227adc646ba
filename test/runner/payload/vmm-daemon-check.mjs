// Runs inside the runner VM (whose /dev/kvm runs Linux guests): starts the
// daemon (`clade serve`) from the built package, which picks the vmm engine by
// itself, and drives it over HTTP on its unix socket: create, exec, runCode,
// fork, then SIGKILL and restart, adoption of the VMs left running, and
// cleanup. Prints one "check ok NAME" or "check FAIL NAME: why" line per check,
// then "timing" lines, then "done". The host test
// (test/runner/vmm-daemon.test.ts) reads them.
import { spawn } from 'node:child_process';
import { existsSync, readdirSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { check, checkNoVmmLeft, done, isVmmPid, ms, vmmPids, waitUntil } from './checks.mjs';

const root = process.argv[2];
const home = process.env.CLADE_HOME;
const socketPath = `${home}/daemon.sock`;
const stateDir = `${home}/daemon-state`;
const sandboxesDir = `${home}/sandboxes`;
// Node runs emulated in the runner: the daemon takes ~11 s to start (loading
// fastify) and a boot ~7 s. Generous limits, so a hang still ends in a FAIL line.
const DAEMON_START_MS = 45_000;
const REQUEST_MS = 45_000;

const sleep = (t) => new Promise((r) => setTimeout(r, t));


/** One JSON request to the daemon over its unix socket: { status, body }. */
function call(method, path, body) {
  return new Promise((resolve, reject) => {
    const payload = body === undefined ? undefined : JSON.stringify(body);
    const headers = payload === undefined ? {} : { 'content-type': 'application/json', 'content-length': Buffer.byteLength(payload) };
    const req = request({ socketPath, method, path, headers }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => {
        const text = Buffer.concat(chunks).toString('utf8');
        let parsed = text;
        try {
          parsed = text ? JSON.parse(text) : undefined;
        } catch {
          // Not JSON: keep the text for the failure message.
        }
        resolve({ status: res.statusCode, body: parsed });
      });
      res.on('error', reject);
    });
    req.setTimeout(REQUEST_MS, () => req.destroy(new Error(`${method} ${path}: no answer in ${REQUEST_MS} ms`)));
    req.on('error', reject);
    req.end(payload);
  });
}
/** A request that must answer `status`; its body, or an exception saying what came instead. */
async function expectStatus(status, method, path, body) {
  const r = await call(method, path, body);
  if (r.status !== status) throw new Error(`${method} ${path} answered ${r.status}, expected ${status}: ${JSON.stringify(r.body)}`);
  return r.body;
}

/** The daemon as a child process; its log (pino, on stdout) is kept to explain failures. */
class Daemon {
  log = '';
  constructor() {
    this.child = spawn(process.execPath, [`${root}/bin/clade.js`, 'serve', '--socket', socketPath, '--state-dir', stateDir], { stdio: ['ignore', 'pipe', 'pipe'] });
    const keep = (d) => (this.log = (this.log + d.toString('utf8')).slice(-8192));
    this.child.stdout.on('data', keep);
    this.child.stderr.on('data', keep);
    this.exited = new Promise((resolve) => this.child.once('exit', (code, signal) => resolve({ code, signal })));
    this.running = true;
    void this.exited.then(() => (this.running = false));
  }

  /** Resolves once the daemon answers on its socket; throws if it exits or takes too long. */
  async ready() {
    const deadline = Date.now() + DAEMON_START_MS;
    while (Date.now() < deadline) {
      if (!this.running) throw new Error(`the daemon exited while starting:\n${this.log}`);
      const health = await call('GET', '/v1/health').catch(() => undefined);
      if (health?.status === 200) return health.body;
      await sleep(100);
    }
    throw new Error(`the daemon did not answer within ${DAEMON_START_MS} ms:\n${this.log}`);
  }

  async stop(signal) {
    if (this.running) this.child.kill(signal);
    return this.exited;
  }
}

let daemon;
const created = new Set();
try {
  let t0 = performance.now();
  daemon = new Daemon();
  await daemon.ready();
  console.log(`timing daemon-start ${ms(t0)}`);

  t0 = performance.now();
  const parent = await expectStatus(201, 'POST', '/v1/sandboxes', { memoryMiB: 512, env: { MODE: 'daemon' } });
  created.add(parent.sandboxId);
  console.log(`timing create-to-ready ${ms(t0)}`);
  check('engine-chosen-automatically', parent.engine === 'vmm', JSON.stringify(parent));
  const base = `/v1/sandboxes/${parent.sandboxId}`;

  const uname = await expectStatus(200, 'POST', `${base}/exec`, { cmd: 'echo $MODE; uname -r' });
  check('exec', uname.exitCode === 0 && uname.stdout.startsWith('daemon\n6.12'), JSON.stringify(uname));
  const assign = await expectStatus(200, 'POST', `${base}/code`, { code: 'x = 41' });
  check('runCode', assign.error === undefined, JSON.stringify(assign));

  t0 = performance.now();
  const forked = await expectStatus(200, 'POST', `${base}/fork`, { count: 2 });
  console.log(`timing fork2 ${ms(t0)}`);
  const kids = forked.map((c) => c.sandboxId).filter(Boolean);
  kids.forEach((id) => created.add(id));
  if (!check('fork-children', kids.length === 2, JSON.stringify(forked))) throw new Error('no children to go on with');
  for (const id of kids) {
    const hostname = await expectStatus(200, 'POST', `/v1/sandboxes/${id}/exec`, { cmd: 'hostname' });
    check('child-hostname', hostname.stdout === `${id}\n`, JSON.stringify(hostname));
    const next = await expectStatus(200, 'POST', `/v1/sandboxes/${id}/code`, { code: 'x + 1' });
    check('child-keeps-interpreter-state', next.value === '42', JSON.stringify(next));
    const view = await expectStatus(200, 'GET', `/v1/sandboxes/${id}`);
    check('child-view', view.parentId === parent.sandboxId && view.engine === 'vmm', JSON.stringify(view));
  }
  const [keptKid, forgottenKid] = kids;
  const pids = {};
  for (const id of [parent.sandboxId, ...kids]) pids[id] = (await expectStatus(200, 'GET', `/v1/sandboxes/${id}`)).pid;

  // The daemon dies without a chance to clean up; its VMs must keep running.
  await daemon.stop('SIGKILL');
  check('vms-outlive-daemon', Object.values(pids).every(isVmmPid), JSON.stringify(pids));
  // A VM no record names belongs to nobody: the next daemon must kill it.
  rmSync(`${stateDir}/sandboxes/${forgottenKid}.json`);

  t0 = performance.now();
  daemon = new Daemon();
  await daemon.ready();
  console.log(`timing daemon-restart ${ms(t0)}`);
  const listed = (await expectStatus(200, 'GET', '/v1/sandboxes')).map((s) => s.sandboxId).sort();
  check('adopted-listed', JSON.stringify(listed) === JSON.stringify([parent.sandboxId, keptKid].sort()), `${JSON.stringify(listed)}\ndaemon log:\n${daemon.log}`);
  for (const id of [parent.sandboxId, keptKid]) {
    const view = await call('GET', `/v1/sandboxes/${id}`);
    check('adopted-same-vm', view.status === 200 && view.body.pid === pids[id] && view.body.engine === 'vmm', JSON.stringify(view));
    const echo = await call('POST', `/v1/sandboxes/${id}/exec`, { cmd: 'echo $MODE; hostname' });
    check('adopted-exec', echo.status === 200 && echo.body.exitCode === 0 && echo.body.stdout === `daemon\n${id}\n`, JSON.stringify(echo));
    const kept = await call('POST', `/v1/sandboxes/${id}/code`, { code: 'x' });
    check('adopted-keeps-interpreter', kept.status === 200 && kept.body.value === '41', JSON.stringify(kept));
  }
  check('unrecorded-vm-killed', await waitUntil(() => !isVmmPid(pids[forgottenKid]), 5_000), `pid ${pids[forgottenKid]} still runs clade-vmm`);
  check('unrecorded-vm-files-removed', !existsSync(`${sandboxesDir}/${forgottenKid}`), `${sandboxesDir}/${forgottenKid} remains`);
  created.delete(forgottenKid);

  for (const id of [keptKid, parent.sandboxId]) {
    const del = await call('DELETE', `/v1/sandboxes/${id}`);
    check('delete', del.status === 204, JSON.stringify(del));
    created.delete(id);
  }
  await checkNoVmmLeft();
  const dirs = existsSync(sandboxesDir) ? readdirSync(sandboxesDir) : [];
  check('no-sandbox-dir-left', dirs.length === 0, dirs.join(' '));
  const records = readdirSync(`${stateDir}/sandboxes`);
  check('no-record-left', records.length === 0, records.join(' '));

  const stopped = await daemon.stop('SIGTERM');
  check('daemon-stopped', stopped.code === 0 && !existsSync(socketPath), `${JSON.stringify(stopped)}\n${daemon.log}`);
} catch (err) {
  check('no-exception', false, `${err && err.stack ? err.stack : String(err)}${daemon ? `\ndaemon log:\n${daemon.log}` : ''}`);
} finally {
  // On failure: leave nothing running, whatever state the run stopped in.
  if (daemon?.running) for (const id of created) await call('DELETE', `/v1/sandboxes/${id}`).catch(() => undefined);
  await daemon?.stop('SIGKILL');
  for (const pid of vmmPids()) process.kill(Number(pid), 'SIGKILL');
  rmSync(socketPath, { force: true });
}
done();
