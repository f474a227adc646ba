import { spawn, type ChildProcess } from 'node:child_process';
import { createSocket, type Socket } from 'node:dgram';
import { existsSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { get } from 'node:http';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { removeSnapshot } from '../../src/core/snapshots.js';
import { homePaths } from '../../src/util/home.js';
import { CladeError, Sandbox } from '../../src/sdk/index.js';
import { TestDaemon } from '../helpers/daemon.js';
import { okAndTracked, remains } from '../helpers/leaks.js';

// One warm sandbox with a network, forked three times. Egress is checked
// against servers in a network namespace this file makes (never an outside
// address): the host reaches it over a veth pair, and so does the sandbox's
// user-mode stack, which opens its connections from the host. Two subnets:
// a documentation range that stands for the internet, and a private one that
// stands for the host's LAN.
//
//   203.0.113.2  allowed only once DNS answered it for allowed.clade.test
//   203.0.113.3  allowed by the CIDR in the allow-list
//   203.0.113.4  never allowed
//   10.231.77.5  private, what DNS answers for lan.clade.test: never learnt
//   10.231.77.6  private, allowed by an explicit CIDR in the allow-list
// A DNS server on the host side (203.0.113.1:5353) answers every name alike
// but lan.clade.test, and counts the questions it gets.

const NS = `clade-net-test-${process.pid}`;
const VETH = `cnt${process.pid % 100000}`;
const SUBNET = '203.0.113';
const LAN = '10.231.77';
const GUEST_PORT = 8000;
const EGRESS = ['allowed.clade.test', 'lan.clade.test', `${SUBNET}.3/32`, `${LAN}.6/32`];

let sb: Sandbox;
const everyone: Sandbox[] = [];
let nsServer: ChildProcess | undefined;
let dns: Socket | undefined;
const dnsQuestions: string[] = [];

function sh(cmd: string, args: string[]): Promise<{ code: number | null; out: string }> {
  return new Promise((resolve) => {
    const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
    let out = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (out += d.toString()));
    child.on('close', (code) => resolve({ code, out }));
    child.on('error', (err) => resolve({ code: -1, out: err.message }));
  });
}

async function mustSh(cmd: string, ...args: string[]): Promise<void> {
  const r = await sh(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(' ')}: ${r.out}`);
}

async function makeNamespace(): Promise<void> {
  await sh('ip', ['netns', 'del', NS]);
  await mustSh('ip', 'netns', 'add', NS);
  await mustSh('ip', 'link', 'add', VETH, 'type', 'veth', 'peer', 'name', `${VETH}p`);
  await mustSh('ip', 'link', 'set', `${VETH}p`, 'netns', NS);
  await mustSh('ip', 'addr', 'add', `${SUBNET}.1/24`, 'dev', VETH);
  await mustSh('ip', 'addr', 'add', `${LAN}.1/24`, 'dev', VETH);
  await mustSh('ip', 'link', 'set', VETH, 'up');
  for (const host of [2, 3, 4]) await mustSh('ip', 'netns', 'exec', NS, 'ip', 'addr', 'add', `${SUBNET}.${host}/24`, 'dev', `${VETH}p`);
  for (const host of [5, 6]) await mustSh('ip', 'netns', 'exec', NS, 'ip', 'addr', 'add', `${LAN}.${host}/24`, 'dev', `${VETH}p`);
  await mustSh('ip', 'netns', 'exec', NS, 'ip', 'link', 'set', `${VETH}p`, 'up');
  await mustSh('ip', 'netns', 'exec', NS, 'ip', 'link', 'set', 'lo', 'up');
  // One server on every address of the namespace; it answers with the address it was reached at.
  const server = 'import http.server as h\nclass H(h.BaseHTTPRequestHandler):\n def do_GET(s):\n  b=("ns:"+s.connection.getsockname()[0]).encode(); s.send_response(200); s.end_headers(); s.wfile.write(b)\n def log_message(s,*a): pass\nh.ThreadingHTTPServer(("0.0.0.0",8080),H).serve_forever()';
  nsServer = spawn('ip', ['netns', 'exec', NS, 'python3', '-c', server], { stdio: 'ignore' });
  for (let i = 0; i < 100; i++) {
    if ((await httpGet(`${SUBNET}.2:8080`, '/').catch(() => '')).startsWith('ns:')) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error('the namespace server did not start');
}

function startDns(): Promise<void> {
  dns = createSocket('udp4');
  dns.on('message', (msg, from) => {
    if (msg.length < 17) return;
    const labels: string[] = [];
    let o = 12;
    while (o < msg.length && msg[o]! > 0 && msg[o]! < 64) {
      labels.push(msg.subarray(o + 1, o + 1 + msg[o]!).toString());
      o += 1 + msg[o]!;
    }
    const qend = o + 5;
    const name = labels.join('.');
    dnsQuestions.push(name);
    const qtype = msg.readUInt16BE(o + 1);
    const header = Buffer.from(msg.subarray(0, qend));
    header.writeUInt16BE(0x8180, 2); // a response, recursion available, no error
    header.writeUInt16BE(qtype === 1 ? 1 : 0, 6);
    header.writeUInt16BE(0, 8);
    header.writeUInt16BE(0, 10);
    const address = (name === 'lan.clade.test' ? `${LAN}.5` : `${SUBNET}.2`).split('.').map(Number);
    const answer = Buffer.from([0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4, ...address]);
    dns!.send(qtype === 1 ? Buffer.concat([header, answer]) : header, from.port, from.address);
  });
  return new Promise((resolve) => dns!.bind(5353, `${SUBNET}.1`, () => resolve()));
}

function httpGet(hostPort: string, path: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = get(`http://${hostPort}${path}`, { timeout: 10_000 }, (res) => {
      let body = '';
      res.on('data', (d: Buffer) => (body += d.toString()));
      res.on('end', () => resolve(body));
    });
    req.on('timeout', () => req.destroy(new Error(`GET ${hostPort}${path} timed out`)));
    req.on('error', reject);
  });
}

/** Fetches a URL from inside the guest; the first line is "ok BODY" or "error REASON". */
async function guestFetch(s: Sandbox, url: string): Promise<string> {
  const py = `import urllib.request,sys\ntry:\n print("ok", urllib.request.urlopen("${url}", timeout=8).read().decode())\nexcept Exception as e:\n print("error", e)`;
  return (await s.commands.run(`python3 -c '${py}'`, { timeoutMs: 30_000 })).stdout.trim();
}

async function guestResolve(s: Sandbox, name: string): Promise<string> {
  const py = `import socket\ntry:\n print("ok", socket.gethostbyname("${name}"))\nexcept Exception as e:\n print("error", e)`;
  return (await s.commands.run(`python3 -c '${py}'`, { timeoutMs: 30_000 })).stdout.trim();
}

/** Starts an HTTP server on GUEST_PORT in the guest serving /root/www/who, and waits until it listens. */
async function startGuestServer(s: Sandbox, who: string): Promise<void> {
  await s.commands.run(`mkdir -p /root/www && echo ${who} > /root/www/who && cd /root/www && (python3 -m http.server ${GUEST_PORT} > /dev/null 2>&1 &)`);
  for (let i = 0; i < 100; i++) {
    if ((await s.commands.run(`python3 -c 'import socket; socket.create_connection(("127.0.0.1", ${GUEST_PORT}), 1)'`)).exitCode === 0) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error('the guest HTTP server did not start');
}

beforeAll(async () => {
  await makeNamespace();
  await startDns();
  process.env.CLADE_NET_DNS = `${SUBNET}.1:5353`;
  sb = await Sandbox.create({ network: { egress: EGRESS, ports: [GUEST_PORT] } });
  everyone.push(sb);
  await startGuestServer(sb, 'parent');
});

afterAll(async () => {
  const ids = everyone.map((s) => s.sandboxId);
  await Promise.all(everyone.map((s) => s.kill()));
  delete process.env.CLADE_NET_DNS;
  dns?.close();
  nsServer?.kill('SIGKILL');
  await sh('ip', ['netns', 'del', NS]);
  await sh('ip', ['link', 'del', VETH]);
  expect(ids.flatMap((id) => remains(id))).toEqual([]);
  // No network process outlives its sandbox.
  const nets = (await sh('pgrep', ['-f', `${homePaths.sandboxes()}/(${ids.join('|')})/`])).out.trim();
  expect(nets).toBe('');
});

describe('network', () => {
  it('a guest server answers on sb.getHost(port) right after create', async () => {
    expect(sb.ports).toEqual([{ port: GUEST_PORT, host: sb.getHost(GUEST_PORT), hostPort: expect.any(Number) }]);
    expect(sb.getHost(GUEST_PORT)).toMatch(/^127\.0\.0\.1:\d+$/);
    expect(await httpGet(sb.getHost(GUEST_PORT), '/who')).toBe('parent\n');
    expect(() => sb.getHost(9999)).toThrow(/not forwarded.*8000/);
  });

  it('its network process runs confined: no new privileges, a seccomp filter', async () => {
    const pids = (await sh('pgrep', ['-f', `clade-net --socket ${homePaths.sandboxes()}/${sb.sandboxId}/`])).out.trim().split('\n');
    expect(pids).toHaveLength(1);
    const status = readFileSync(`/proc/${pids[0]}/status`, 'utf8');
    expect(status).toMatch(/^NoNewPrivs:\s+1$/m);
    expect(status).toMatch(/^Seccomp:\s+2$/m);
  });

  it('egress: a listed CIDR is reachable, other addresses are refused at once', async () => {
    expect(await guestFetch(sb, `http://${SUBNET}.3:8080/`)).toBe(`ok ns:${SUBNET}.3`);
    const t0 = Date.now();
    expect(await guestFetch(sb, `http://${SUBNET}.4:8080/`)).toMatch(/^error .*refused/i);
    expect(Date.now() - t0).toBeLessThan(8_000); // a reset, not a timeout
    // The host itself is never reachable through the gateway, whatever the list says.
    expect(await guestFetch(sb, `http://10.0.2.2:${GUEST_PORT}/`)).toMatch(/^error/);
  });

  it('egress "all": any outside address and name, but still never the host through the gateway', async () => {
    const open = okAndTracked([await Sandbox.create({ network: { egress: 'all' } })], everyone)[0]!;
    try {
      expect(await guestFetch(open, `http://${SUBNET}.4:8080/`)).toBe(`ok ns:${SUBNET}.4`);
      expect(await guestResolve(open, 'blocked.clade.test')).toBe(`ok ${SUBNET}.2`);
      expect(await guestFetch(open, `http://10.0.2.2:${GUEST_PORT}/`)).toMatch(/^error/);
      // "all" is the internet: private networks (the host's LAN) stay closed.
      expect(await guestFetch(open, `http://${LAN}.6:8080/`)).toMatch(/^error .*refused/i);
    } finally {
      await open.kill();
    }
  });

  it('DNS answers allowed names only; an allowed name\'s addresses become reachable', async () => {
    expect(await guestFetch(sb, `http://${SUBNET}.2:8080/`)).toMatch(/^error .*refused/i);
    const before = dnsQuestions.length;
    expect(await guestResolve(sb, 'blocked.clade.test')).toMatch(/^error/);
    expect(dnsQuestions.slice(before)).not.toContain('blocked.clade.test'); // never asked upstream
    expect(await guestResolve(sb, 'allowed.clade.test')).toBe(`ok ${SUBNET}.2`);
    expect(dnsQuestions).toContain('allowed.clade.test');
    expect(await guestFetch(sb, 'http://allowed.clade.test:8080/')).toBe(`ok ns:${SUBNET}.2`);
  });

  it('an allowed name that answers with a private address opens nothing; a listed private CIDR is reachable', async () => {
    expect(await guestResolve(sb, 'lan.clade.test')).toBe(`ok ${LAN}.5`);
    expect(await guestFetch(sb, `http://${LAN}.5:8080/`)).toMatch(/^error .*refused/i);
    expect(await guestFetch(sb, `http://${LAN}.6:8080/`)).toBe(`ok ns:${LAN}.6`);
  });

  it('each of 3 forked children has its own host port and its own state', async () => {
    const kids = okAndTracked(await sb.fork(3), everyone);
    const hosts = new Set([sb.getHost(GUEST_PORT), ...kids.map((k) => k.getHost(GUEST_PORT))]);
    expect(hosts.size).toBe(4);
    await Promise.all(kids.map((k, i) => k.files.write('/root/www/who', `child-${i}\n`)));
    for (const [i, k] of kids.entries()) expect(await httpGet(k.getHost(GUEST_PORT), '/who')).toBe(`child-${i}\n`);
    expect(await httpGet(sb.getHost(GUEST_PORT), '/who')).toBe('parent\n');
    // The policy goes with the fork: allowed stays allowed, refused stays refused.
    expect(await guestFetch(kids[0]!, `http://${SUBNET}.3:8080/`)).toBe(`ok ns:${SUBNET}.3`);
    expect(await guestFetch(kids[1]!, `http://${SUBNET}.4:8080/`)).toMatch(/^error .*refused/i);
  });

  it('a child starts with its parent\'s connections reset; the parent keeps them', async () => {
    await sb.runCode(`import socket\nconn = socket.create_connection(("${SUBNET}.3", 8080), timeout=10)`);
    const [kid] = okAndTracked(await sb.fork(1), everyone);
    const ask = 'try:\n conn.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n"); answer = conn.recv(200).decode()\nexcept OSError as e:\n answer = "error " + str(e)\nanswer';
    expect((await kid!.runCode(ask)).value).toMatch(/error .*(abort|reset)/i);
    expect((await sb.runCode(ask)).value).toMatch(/HTTP\/1.0 200/);
  });

  it('a snapshot keeps the policy; a sandbox started from it gets a stack and ports of its own', async () => {
    const tag = `net-test-${process.pid}`;
    try {
      const meta = await sb.snapshot({ tag });
      expect(meta.network).toEqual({ egress: ['allowed.clade.test', 'lan.clade.test', `${SUBNET}.3`, `${LAN}.6`], ports: [GUEST_PORT] }); // as normalized
      const [copy] = okAndTracked(await Sandbox.fromSnapshot(tag, { count: 1 }), everyone);
      expect(copy!.getHost(GUEST_PORT)).not.toBe(sb.getHost(GUEST_PORT));
      expect(await httpGet(copy!.getHost(GUEST_PORT), '/who')).toBe('parent\n');
      expect(await guestFetch(copy!, `http://${SUBNET}.4:8080/`)).toMatch(/^error .*refused/i);
      await copy!.kill();
    } finally {
      removeSnapshot(tag);
    }
  });

  it('through the daemon: create with a network, ports in the view, a fork with its own, both adopted with their networks after a SIGKILL', async () => {
    const daemon = new TestDaemon();
    await daemon.start();
    try {
      const bad = await daemon.client().json('POST', '/v1/sandboxes', { network: { ports: [70000] } }).catch((e: unknown) => e);
      expect(bad).toBeInstanceOf(CladeError);
      expect((bad as CladeError).code).toBe('bad_request');
      await using remote = await Sandbox.create({ daemon: `unix://${daemon.socket}`, network: { egress: 'none', ports: [GUEST_PORT] } });
      await startGuestServer(remote, 'remote');
      const view = await daemon.client().json<{ network?: unknown; ports?: { port: number; host: string }[] }>('GET', `/v1/sandboxes/${remote.sandboxId}`);
      expect(view.network).toEqual({ egress: 'none', ports: [GUEST_PORT] });
      expect(view.ports?.[0]?.host).toBe(remote.getHost(GUEST_PORT));
      expect(await httpGet(remote.getHost(GUEST_PORT), '/who')).toBe('remote\n');
      const [kid] = await daemon.client().json<{ sandboxId: string }[]>('POST', `/v1/sandboxes/${remote.sandboxId}/fork`, { count: 1 });
      const kidView = await daemon.client().json<{ ports?: { port: number; host: string }[] }>('GET', `/v1/sandboxes/${kid!.sandboxId}`);
      expect(kidView.ports?.[0]?.host).not.toBe(remote.getHost(GUEST_PORT));
      expect(await httpGet(kidView.ports![0]!.host, '/who')).toBe('remote\n');
      // A daemon killed and restarted adopts the sandboxes with their networks: the same ports, still answering.
      await daemon.stop('SIGKILL');
      await daemon.start();
      const adopted = await daemon.client().json<{ ports?: { port: number; host: string }[] }>('GET', `/v1/sandboxes/${kid!.sandboxId}`);
      expect(adopted.ports).toEqual(kidView.ports);
      expect(await httpGet(adopted.ports![0]!.host, '/who')).toBe('remote\n');
      expect(await httpGet(remote.getHost(GUEST_PORT), '/who')).toBe('remote\n');
      await daemon.client().json('DELETE', `/v1/sandboxes/${kid!.sandboxId}`);
      // Its network went with it.
      expect((await sh('pgrep', ['-f', `${homePaths.sandboxes()}/${kid!.sandboxId}/`])).out.trim()).toBe('');
    } finally {
      await daemon.stop('SIGTERM');
      rmSync(daemon.dir, { recursive: true, force: true });
    }
  });

  it('refuses bad network options with a clear error and leaves nothing behind', async () => {
    const before = readdirSync(homePaths.sandboxes()).length;
    const cases: [unknown, RegExp][] = [
      [{ ports: [70000] }, /70000 is not a TCP port/],
      [{ ports: [0] }, /0 is not a TCP port/],
      [{ egress: ['not a host!'] }, /is not a host name/],
      [{ egress: ['10.0.0.1/40'] }, /prefix length is 0 to 32/],
      [{ egress: ['127.0.0.1'] }, /loopback/],
      [{ egress: 'some' }, /must be "none", "all" or a list/],
    ];
    for (const [network, message] of cases) {
      const err = await Sandbox.create({ network: network as never }).catch((e: unknown) => e);
      expect(err).toBeInstanceOf(CladeError);
      expect((err as CladeError).code).toBe('bad_request');
      expect((err as CladeError).message).toMatch(message);
    }
    expect(readdirSync(homePaths.sandboxes()).length).toBe(before);
    expect(existsSync(join(homePaths.sandboxes(), 'net'))).toBe(false);
  });
});
