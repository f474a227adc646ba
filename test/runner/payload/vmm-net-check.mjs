// Runs inside the runner VM with the built SDK: sandbox networks on the vmm
// engine (clade-vmm's virtio-net on a clade-net of the sandbox's own, with
// passt behind it). A sandbox with egress 'none' and port 8000 forwarded
// boots; a guest HTTP server answers on the runner's side through
// sb.getHost(8000); a TCP connection out of the guest and DNS for any name
// fail. Two forked children each get a clade-net and a host port of their
// own, and the HTTP server they inherited (still listening in each) serves
// each child's own file; killing one leaves its sibling serving. A start from
// a snapshot gets a network too. A second sandbox whose allow-list names one
// of two addresses the runner has on its loopback device reaches that one and
// is refused the other. After the kills no clade-vmm, clade-net or passt
// process is left. Prints "check ok NAME" / "check FAIL NAME: why", "timing"
// and "note" lines, then "done" (read by test/runner/vmm-net.test.ts).
import { execFile } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { get } from 'node:http';
import { createServer } from 'node:net';
import { promisify } from 'node:util';
import { check, checkNoNetworkLeft, checkNoVmmLeft, done, ms, networkProcesses } from './checks.mjs';

const root = process.argv[2];
const { Sandbox } = await import(`${root}/dist/sdk/index.js`);
const run = promisify(execFile);
const PORT = 8000;
// Two addresses of the runner that are not loopback (TEST-NET-1, on the lo device): only the first is listed.
const LISTED = '192.0.2.1';
const UNLISTED = '192.0.2.2';
const OUTSIDE_PORT = 9000;

function httpGet(hostPort, path) {
  return new Promise((resolve, reject) => {
    const req = get(`http://${hostPort}${path}`, { timeout: 10_000 }, (res) => {
      let body = '';
      res.on('data', (d) => (body += d.toString()));
      res.on('end', () => resolve(body));
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${hostPort}${path} timed out`)));
    req.on('error', reject);
  });
}

/** A TCP connection from inside the guest; "ok FIRST-LINE" or "error REASON". */
async function guestConnect(sb, host, port) {
  const py = `import socket\ntry:\n s = socket.create_connection(("${host}", ${port}), timeout=8); print("ok", s.recv(100).decode().strip())\nexcept Exception as e:\n print("error", e)`;
  return (await sb.commands.run(`python3 -c '${py}'`, { timeoutMs: 30_000 })).stdout.trim();
}

async function guestResolve(sb, name) {
  const py = `import socket\ntry:\n print("ok", socket.gethostbyname("${name}"))\nexcept Exception as e:\n print("error", e)`;
  return (await sb.commands.run(`python3 -c '${py}'`, { timeoutMs: 30_000 })).stdout.trim();
}

/** Starts python3's HTTP server on PORT in the guest, serving /root/www, and waits until it listens. */
async function startGuestServer(sb, who) {
  await sb.commands.run(`mkdir -p /root/www && echo ${who} > /root/www/who && cd /root/www && (python3 -m http.server ${PORT} > /dev/null 2>&1 &)`);
  const probe = `python3 -c 'import socket; socket.create_connection(("127.0.0.1", ${PORT}), 1)'`;
  for (let i = 0; i < 100; i++) {
    if ((await sb.commands.run(probe)).exitCode === 0) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error('the guest HTTP server did not start');
}

/** What the guest's server at `host` answers for /who, or "error ...". */
const who = (host) => httpGet(host, '/who').then((b) => b.trim(), (e) => `error ${e.message}`);

/** Why a forwarded port may not answer: the network's log, its processes, and what listens (for a failed check). */
function printNetworkState(sb) {
  const log = `${process.env.CLADE_HOME}/sandboxes/${sb.sandboxId}/net/net.log`;
  const text = (path) => {
    try {
      return readFileSync(path, 'utf8').trim();
    } catch (e) {
      return `(${e.code ?? e})`;
    }
  };
  for (const line of [`net.log: ${text(log)}`, `processes: ${networkProcesses().join(' ')}`, `tcp listeners: ${text('/proc/net/tcp').split('\n').filter((l) => / 0A /.test(l)).map((l) => l.trim().split(/\s+/)[1]).join(' ')}`]) {
    console.log(`note ${line.replace(/\n/g, ' | ')}`);
  }
}

const sandboxes = [];
let outside;
try {
  // The runner's loopback is down until someone brings it up: forwarded ports are bound on 127.0.0.1.
  // The runner has no NIC, and passt wants the interface of a default route: lo is all there is.
  await run('ip', ['link', 'set', 'lo', 'up']);
  for (const addr of [LISTED, UNLISTED]) await run('ip', ['addr', 'add', `${addr}/32`, 'dev', 'lo']);
  await run('ip', ['route', 'add', 'default', 'dev', 'lo']);
  outside = createServer((c) => c.end(`outside:${c.localAddress}\n`));
  await new Promise((resolve) => outside.listen(OUTSIDE_PORT, '0.0.0.0', resolve));

  let t0 = performance.now();
  const sb = await Sandbox.create({ memoryMiB: 512, engine: 'vmm', network: { egress: 'none', ports: [PORT] } });
  sandboxes.push(sb);
  console.log(`timing create-with-network-to-ready ${ms(t0)}`);
  check('engine-vmm', sb.getInfo().engine === 'vmm', JSON.stringify(sb.getInfo()));
  const addr = await sb.commands.run('cat /sys/class/net/*/address; grep -q 10.0.2.15 /proc/net/fib_trie && echo has-10.0.2.15');
  check('guest-has-nic', addr.stdout.includes('52:54:00:c1:ad:0f\n') && addr.stdout.includes('has-10.0.2.15'), JSON.stringify(addr));
  check('ports-listed', sb.ports.length === 1 && sb.ports[0].port === PORT && /^127\.0\.0\.1:\d+$/.test(sb.getHost(PORT)), JSON.stringify(sb.ports));

  t0 = performance.now();
  await startGuestServer(sb, 'parent');
  const first = await who(sb.getHost(PORT));
  console.log(`timing guest-server-to-first-answer ${ms(t0)}`);
  if (!check('port-forward-answers', first === 'parent', first)) printNetworkState(sb);

  t0 = performance.now();
  const outbound = await guestConnect(sb, LISTED, OUTSIDE_PORT);
  // Refused by clade-net with a reset (not a dead link's timeout or unreachable route); NXDOMAIN from its DNS (not no answer).
  check('egress-none-refuses-tcp', /refused/i.test(outbound) && performance.now() - t0 < 8_000, `${outbound} after ${ms(t0)} ms`);
  const resolved = await guestResolve(sb, 'example.com');
  check('dns-outside-list-fails', /not known|no address/i.test(resolved), resolved);

  t0 = performance.now();
  const kids = await sb.fork(2);
  console.log(`timing fork2-with-network-to-children-ready ${ms(t0)}`);
  check('fork-children', kids.length === 2 && kids.every((k) => k instanceof Sandbox), kids.map(String).join(', '));
  for (const k of kids) if (k instanceof Sandbox) sandboxes.push(k);
  const [a, b] = kids;
  const hosts = new Set([sb, a, b].map((s) => s.getHost(PORT)));
  check('children-own-host-ports', hosts.size === 3, [...hosts].join(' '));
  await a.files.write('/root/www/who', 'child-a\n');
  await b.files.write('/root/www/who', 'child-b\n');
  // The server each child inherited still listens (a fork resets connections, never listeners).
  const answers = [await who(a.getHost(PORT)), await who(b.getHost(PORT)), await who(sb.getHost(PORT))];
  console.log(`note the inherited python3 http.server answered in the children: ${JSON.stringify(answers)}`);
  check('child-a-serves-own-state', answers[0] === 'child-a', answers[0]);
  check('child-b-serves-own-state', answers[1] === 'child-b', answers[1]);
  check('parent-serves-own-state', answers[2] === 'parent', answers[2]);
  const childOut = await guestConnect(a, LISTED, OUTSIDE_PORT);
  check('child-keeps-egress-none', /refused/i.test(childOut), childOut);

  const hostOfA = a.getHost(PORT);
  await a.kill();
  const afterKill = await who(b.getHost(PORT));
  check('sibling-unaffected', afterKill === 'child-b', afterKill);
  const goneA = await who(hostOfA);
  check('killed-child-port-closed', goneA.startsWith('error'), goneA);

  t0 = performance.now();
  await sb.snapshot({ tag: 'vmm-net-snap' });
  const [restored] = await Sandbox.fromSnapshot('vmm-net-snap');
  console.log(`timing snapshot-and-restore-with-network ${ms(t0)}`);
  check('restore-runs', restored instanceof Sandbox, String(restored));
  if (restored instanceof Sandbox) {
    sandboxes.push(restored);
    const own = restored.getHost(PORT);
    const answer = await who(own);
    check('restored-serves-on-own-port', answer === 'parent' && own !== sb.getHost(PORT), `${own}: ${answer}`);
  }

  const listed = await Sandbox.create({ memoryMiB: 512, engine: 'vmm', network: { egress: [LISTED] } });
  sandboxes.push(listed);
  const allowed = await guestConnect(listed, LISTED, OUTSIDE_PORT);
  check('egress-list-allows-named-address', allowed === `ok outside:${LISTED}`, allowed);
  const refused = await guestConnect(listed, UNLISTED, OUTSIDE_PORT);
  check('egress-list-refuses-other-address', /refused/i.test(refused), refused);
} catch (e) {
  check('no-exception', false, e?.stack ?? String(e));
} finally {
  await Promise.all(sandboxes.map((s) => s.kill().catch(() => undefined)));
  outside?.close();
  await checkNoVmmLeft();
  await checkNoNetworkLeft();
  done();
}
