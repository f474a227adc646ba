// Runs inside the runner VM (whose /dev/kvm runs Linux guests): starts the
// daemon (`clade serve`) from the built package, which picks the vmm engine by
// itself, and drives it over HTTP on its unix socket: create, exec, runCode,
// fork, then SIGKILL and restart, adoption of the VMs left running, and
// cleanup. A second sandbox has a network (egress 'none', guest port 8000
// forwarded) with a guest HTTP server behind it: the restarted daemon adopts
// it with its network, whose host address still answers; a fork through the
// new daemon gets a port of its own; and once deleted, no clade-net or passt
// is left. Prints one "check ok NAME" or "check FAIL NAME: why" line per check,
// then "timing" lines, then "done". The host test
// (test/runner/vmm-daemon.test.ts) reads them.
import { execFile, spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { get, request } from 'node:http';
import { promisify } from 'node:util';
import { check, checkNoNetworkLeft, checkNoVmmLeft, done, isVmmPid, ms, networkProcesses, vmmPids, waitUntil } from './checks.mjs';

const root = process.argv[2];
const home = process.env.CLADE_HOME;
const socketPath = `${home}/daemon.sock`;
const stateDir = `${home}/daemon-state`;
const sandboxesDir = `${home}/sandboxes`;
// Node runs emulated in the runner: the daemon takes ~11 s to start (loading
// fastify) and a boot ~7 s. Generous limits, so a hang still ends in a FAIL line.
const DAEMON_START_MS = 45_000;
const REQUEST_MS = 45_000;
const GUEST_PORT = 8000;
const GUEST_SERVER_MS = 20_000;

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

/** What the guest HTTP server behind `hostPort` answers for /who, or "error ...". */
function who(hostPort) {
  return new Promise((resolve) => {
    const req = get(`http://${hostPort}/who`, { timeout: 10_000 }, (res) => {
      let body = '';
      res.on('data', (d) => (body += d.toString()));
      res.on('end', () => resolve(body.trim()));
      res.on('error', (e) => resolve(`error ${e.message}`));
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${hostPort}/who timed out`)));
    req.on('error', (e) => resolve(`error ${e.message}`));
  });
}

/** Starts python3's HTTP server on GUEST_PORT in the guest, serving /root/www, and waits until `hostPort` answers `name`. */
async function startGuestServer(id, hostPort, name) {
  const started = await expectStatus(200, 'POST', `/v1/sandboxes/${id}/exec`, { cmd: `mkdir -p /root/www && echo ${name} > /root/www/who && cd /root/www && (python3 -m http.server ${GUEST_PORT} > /dev/null 2>&1 &)` });
  if (started.exitCode !== 0) throw new Error(`the guest HTTP server did not start: ${JSON.stringify(started)}`);
  const deadline = Date.now() + GUEST_SERVER_MS;
  let last = '';
  while (Date.now() < deadline) {
    last = await who(hostPort);
    if (last === name) return last;
    await sleep(100);
  }
  return last;
}

/** The one forwarded port of a view, if it is GUEST_PORT on the host's loopback. */
function forwardedHost(view) {
  const [p, ...more] = view.ports ?? [];
  return p && more.length === 0 && p.port === GUEST_PORT && /^127\.0\.0\.1:\d+$/.test(p.host) ? p.host : undefined;
}

const netRecordOf = (id) => JSON.parse(readFileSync(`${stateDir}/sandboxes/${id}.json`, 'utf8')).vm.net;

let daemon;
const created = new Set();
try {
  // Forwarded ports are bound on the runner's loopback, which is down until brought up;
  // passt wants the interface of a default route, and the runner has no NIC: lo is all there is.
  const run = promisify(execFile);
  await run('ip', ['link', 'set', 'lo', 'up']);
  await run('ip', ['route', 'add', 'default', 'dev', 'lo']);

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

  t0 = performance.now();
  const netted = await expectStatus(201, 'POST', '/v1/sandboxes', { memoryMiB: 512, network: { egress: 'none', ports: [GUEST_PORT] } });
  created.add(netted.sandboxId);
  console.log(`timing create-with-network-to-ready ${ms(t0)}`);
  const nettedHost = forwardedHost(netted);
  if (!check('net-ports-listed', nettedHost !== undefined, JSON.stringify(netted))) throw new Error('no forwarded port to go on with');
  t0 = performance.now();
  const firstAnswer = await startGuestServer(netted.sandboxId, nettedHost, 'netted');
  console.log(`timing guest-server-to-first-answer ${ms(t0)}`);
  check('net-port-answers', firstAnswer === 'netted', firstAnswer);
  const netRecord = netRecordOf(netted.sandboxId);
  check('net-recorded', netRecord?.ports?.length === 1 && `127.0.0.1:${netRecord.ports[0].hostPort}` === nettedHost, JSON.stringify(netRecord));

  const pids = {};
  for (const id of [parent.sandboxId, ...kids, netted.sandboxId]) pids[id] = (await expectStatus(200, 'GET', `/v1/sandboxes/${id}`)).pid;
  const netBefore = networkProcesses();

  // The daemon dies without a chance to clean up; its VMs, and their networks, must keep running.
  await daemon.stop('SIGKILL');
  check('vms-outlive-daemon', Object.values(pids).every(isVmmPid), JSON.stringify(pids));
  const netAfterKill = networkProcesses();
  check('network-outlives-daemon', netBefore.length >= 2 && JSON.stringify(netAfterKill) === JSON.stringify(netBefore), `before ${netBefore.join(' ')}; after ${netAfterKill.join(' ')}`);
  // A VM no record names belongs to nobody: the next daemon must kill it.
  rmSync(`${stateDir}/sandboxes/${forgottenKid}.json`);

  t0 = performance.now();
  daemon = new Daemon();
  await daemon.ready();
  console.log(`timing daemon-restart ${ms(t0)}`);
  const listed = (await expectStatus(200, 'GET', '/v1/sandboxes')).map((s) => s.sandboxId).sort();
  check('adopted-listed', JSON.stringify(listed) === JSON.stringify([parent.sandboxId, keptKid, netted.sandboxId].sort()), `${JSON.stringify(listed)}\ndaemon log:\n${daemon.log}`);
  for (const id of [parent.sandboxId, keptKid]) {
    const view = await call('GET', `/v1/sandboxes/${id}`);
    check('adopted-same-vm', view.status === 200 && view.body.pid === pids[id] && view.body.engine === 'vmm', JSON.stringify(view));
    const echo = await call('POST', `/v1/sandboxes/${id}/exec`, { cmd: 'echo $MODE; hostname' });
    check('adopted-exec', echo.status === 200 && echo.body.exitCode === 0 && echo.body.stdout === `daemon\n${id}\n`, JSON.stringify(echo));
    const kept = await call('POST', `/v1/sandboxes/${id}/code`, { code: 'x' });
    check('adopted-keeps-interpreter', kept.status === 200 && kept.body.value === '41', JSON.stringify(kept));
  }

  const adoptedNet = await expectStatus(200, 'GET', `/v1/sandboxes/${netted.sandboxId}`);
  check('adopted-net-same-vm', adoptedNet.pid === pids[netted.sandboxId] && adoptedNet.engine === 'vmm', JSON.stringify(adoptedNet));
  check('adopted-net-same-ports', JSON.stringify(adoptedNet.ports) === JSON.stringify(netted.ports) && JSON.stringify(adoptedNet.network) === JSON.stringify(netted.network), `${JSON.stringify(adoptedNet)} vs ${JSON.stringify(netted)}`);
  check('adopted-net-record-intact', JSON.stringify(netRecordOf(netted.sandboxId)) === JSON.stringify(netRecord), `${JSON.stringify(netRecordOf(netted.sandboxId))} vs ${JSON.stringify(netRecord)}`);
  const adoptedAnswer = await who(nettedHost);
  check('adopted-port-still-answers', adoptedAnswer === 'netted', adoptedAnswer);

  t0 = performance.now();
  const [netChild] = await expectStatus(200, 'POST', `/v1/sandboxes/${netted.sandboxId}/fork`, { count: 1 });
  console.log(`timing adopted-fork-with-network ${ms(t0)}`);
  if (netChild?.sandboxId) created.add(netChild.sandboxId);
  if (!check('adopted-net-fork', typeof netChild?.sandboxId === 'string', JSON.stringify(netChild))) throw new Error('no child to go on with');
  const childView = await expectStatus(200, 'GET', `/v1/sandboxes/${netChild.sandboxId}`);
  const childHost = forwardedHost(childView);
  check('adopted-fork-own-port', childHost !== undefined && childHost !== nettedHost, `${JSON.stringify(childView.ports)} vs parent ${nettedHost}`);
  // The server the child inherited still listens there; the child serves a file of its own.
  await expectStatus(200, 'POST', `/v1/sandboxes/${netChild.sandboxId}/exec`, { cmd: 'echo netted-child > /root/www/who' });
  const childAnswer = childHost ? await who(childHost) : 'no host';
  const parentAnswer = await who(nettedHost);
  check('adopted-fork-port-answers', childAnswer === 'netted-child' && parentAnswer === 'netted', `child ${childAnswer}, parent ${parentAnswer}`);

  check('unrecorded-vm-killed', await waitUntil(() => !isVmmPid(pids[forgottenKid]), 5_000), `pid ${pids[forgottenKid]} still runs clade-vmm`);
  check('unrecorded-vm-files-removed', !existsSync(`${sandboxesDir}/${forgottenKid}`), `${sandboxesDir}/${forgottenKid} remains`);
  created.delete(forgottenKid);

  for (const id of [keptKid, parent.sandboxId, netChild.sandboxId, netted.sandboxId]) {
    const del = await call('DELETE', `/v1/sandboxes/${id}`);
    check('delete', del.status === 204, JSON.stringify(del));
    created.delete(id);
  }
  await checkNoVmmLeft();
  await checkNoNetworkLeft();
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
