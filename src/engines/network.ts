import { spawn } from 'node:child_process';
import { closeSync, constants, existsSync, openSync, readFileSync, rmSync } from 'node:fs';
import { createServer } from 'node:net';
import { delimiter, dirname, join } from 'node:path';
import { isIP } from 'node:net';
import { CladeError, errorMessage } from '../util/errors.js';
import { ensurePrivateDir } from '../util/home.js';
import { packageRoot } from '../util/paths.js';
import { isSameProcess, killPidQuietly, processStartTicks } from '../util/process.js';

// A sandbox's network (docs/network.md): a user-mode stack of its own on the
// host (passt), behind clade-net, which enforces the egress policy and
// answers DNS. The guest's side is the same in every sandbox: 10.0.2.15/24,
// gateway 10.0.2.2, DNS 10.0.2.3.

/** Where a sandbox may connect: nowhere, anywhere public, or the listed hosts, `*.domains` and IPv4 CIDRs. */
export type Egress = 'none' | 'all' | string[];
/** A sandbox's network as asked for (`network` in the SDK and API). */
export type NetworkOptions = { egress?: Egress; ports?: number[] };
/** A sandbox's network, checked and normalized: part of its machine shape (its devices), inherited by forks. */
export type NetworkSpec = { egress: Egress; ports: number[] };
/** A guest TCP port and the host address that reaches it. */
export type PortMapping = { port: number; host: string; hostPort: number };

/** The guest's configuration, given on the kernel command line (native/agent/net.c). */
export const GUEST_NET_CMDLINE = 'clade.net=10.0.2.15/24,10.0.2.2,10.0.2.3';
export const GUEST_MAC = '52:54:00:c1:ad:0f';
const MAX_EGRESS_ENTRIES = 64;
const MAX_PORTS = 32;
const READY_TIMEOUT_MS = 15_000;
/** Attempts at starting the stack; a forwarded host port taken between our pick and passt's bind fails one. */
const START_ATTEMPTS = 3;
const EXIT_PASST_FAILED = 3;

/** Ranges no sandbox may reach, whatever it allows (native/net/net.c, net_never_reachable). */
const NEVER: [string, number, string][] = [
  ['0.0.0.0', 8, 'is "this network"'],
  ['127.0.0.0', 8, "is the host's loopback"],
  ['169.254.0.0', 16, 'is link-local (where cloud metadata services answer)'],
  ['224.0.0.0', 3, 'is multicast or reserved'],
  ['10.0.2.0', 24, "is the sandbox's own network (gateway and DNS are clade's)"],
];

function ip4ToInt(ip: string): number {
  return ip.split('.').reduce((n, part) => (n * 256 + Number(part)) >>> 0, 0);
}

function inRange(addr: number, net: string, bits: number): boolean {
  const mask = bits === 0 ? 0 : (~0 << (32 - bits)) >>> 0;
  return ((addr & mask) >>> 0) === ((ip4ToInt(net) & mask) >>> 0);
}

const HOST_NAME = /^(?=.{1,253}$)([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)(\.[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?)*$/;

/** One allow-list entry, normalized: an IPv4 address or CIDR, a host name, or `*.` and a domain. */
function normalizeEntry(raw: unknown): string {
  if (typeof raw !== 'string' || raw.length === 0) throw new CladeError('bad_request', `network.egress entries are strings (host names, *.domains, IPv4 addresses or CIDRs), got ${JSON.stringify(raw)}`);
  const entry = raw.trim().toLowerCase();
  const [addr, bitsText, extra] = entry.split('/');
  if (isIP(addr!) === 6 || (addr!.includes(':') && extra === undefined)) throw new CladeError('bad_request', `network.egress entry ${JSON.stringify(raw)} is IPv6: sandboxes have IPv4 networking only`);
  if (isIP(addr!) === 4 || /^[0-9.]+$/.test(addr!)) {
    if (isIP(addr!) !== 4 || extra !== undefined || (bitsText !== undefined && !/^\d{1,2}$/.test(bitsText))) throw new CladeError('bad_request', `network.egress entry ${JSON.stringify(raw)} is not an IPv4 address or CIDR (like 203.0.113.7 or 10.0.0.0/8)`);
    const bits = bitsText === undefined ? 32 : Number(bitsText);
    if (bits > 32) throw new CladeError('bad_request', `network.egress entry ${JSON.stringify(raw)}: a prefix length is 0 to 32`);
    const n = ip4ToInt(addr!);
    const mask = bits === 0 ? 0 : (~0 << (32 - bits)) >>> 0;
    if (((n & mask) >>> 0) !== n) throw new CladeError('bad_request', `network.egress entry ${JSON.stringify(raw)} has bits set past its prefix; did you mean ${intToIp4((n & mask) >>> 0)}/${bits}?`);
    if (bits >= 8) for (const [net, b, why] of NEVER) if (inRange(n, net, b)) throw new CladeError('bad_request', `network.egress entry ${JSON.stringify(raw)} ${why}, which no sandbox may reach`);
    return bits === 32 ? addr! : `${addr}/${bits}`;
  }
  const name = entry.startsWith('*.') ? entry.slice(2) : entry;
  if (bitsText !== undefined || !HOST_NAME.test(name) || !/[a-z_-]/.test(name.split('.').pop()!)) {
    throw new CladeError('bad_request', `network.egress entry ${JSON.stringify(raw)} is not a host name, *.domain, IPv4 address or IPv4 CIDR (like example.com, *.example.com, 203.0.113.7, 10.0.0.0/8)`);
  }
  return entry;
}

function intToIp4(n: number): string {
  return [24, 16, 8, 0].map((s) => (n >>> s) & 255).join('.');
}

/**
 * Checks a sandbox's `network` option; undefined when it has none. Errors say
 * which entry is wrong and what is accepted.
 */
export function normalizeNetwork(raw: unknown): NetworkSpec | undefined {
  if (raw === undefined || raw === null || raw === false) return undefined;
  if (raw === true) return { egress: 'none', ports: [] };
  if (typeof raw !== 'object' || Array.isArray(raw)) throw new CladeError('bad_request', 'network must be an object: { egress?: "none" | "all" | string[], ports?: number[] }');
  const { egress = 'none', ports = [], ...rest } = raw as Record<string, unknown>;
  const unknown = Object.keys(rest);
  if (unknown.length) throw new CladeError('bad_request', `network has no option ${JSON.stringify(unknown[0])}; it takes egress and ports`);
  let normalized: Egress;
  if (egress === 'none' || egress === 'all') normalized = egress;
  else if (Array.isArray(egress)) {
    if (egress.length > MAX_EGRESS_ENTRIES) throw new CladeError('bad_request', `network.egress lists ${egress.length} entries; at most ${MAX_EGRESS_ENTRIES}`);
    normalized = [...new Set(egress.map(normalizeEntry))];
  } else throw new CladeError('bad_request', `network.egress must be "none", "all" or a list of hosts and CIDRs, got ${JSON.stringify(egress)}`);
  if (!Array.isArray(ports)) throw new CladeError('bad_request', `network.ports must be a list of TCP ports, got ${JSON.stringify(ports)}`);
  if (ports.length > MAX_PORTS) throw new CladeError('bad_request', `network.ports lists ${ports.length} ports; at most ${MAX_PORTS}`);
  for (const p of ports) if (!Number.isInteger(p) || (p as number) < 1 || (p as number) > 65535) throw new CladeError('bad_request', `network.ports: ${JSON.stringify(p)} is not a TCP port (an integer from 1 to 65535)`);
  return { egress: normalized, ports: [...new Set(ports as number[])] };
}

/** clade-net's arguments for a policy. */
function policyArgs(egress: Egress): string[] {
  if (egress === 'none' || egress === 'all') return ['--egress', egress];
  const args = ['--egress', 'list'];
  for (const e of egress) args.push(/^[0-9./]+$/.test(e) ? '--allow' : '--allow-name', e);
  return args;
}

export function netBinary(): string {
  return process.env.CLADE_NET ?? join(packageRoot(), 'native', 'net', 'build', 'clade-net');
}

/** passt, found on PATH (and in the sbin directories a non-login root shell may lack). */
export function passtBinary(): string | undefined {
  if (process.env.CLADE_PASST) return process.env.CLADE_PASST;
  for (const dir of [...(process.env.PATH ?? '').split(delimiter), '/usr/bin', '/usr/sbin', '/bin', '/sbin']) {
    if (dir && existsSync(join(dir, 'passt'))) return join(dir, 'passt');
  }
  return undefined;
}

/** The resolver allowed names are looked up with: CLADE_NET_DNS (IP or IP:PORT), else the host's first IPv4 nameserver. */
export function dnsUpstream(): string | undefined {
  const configured = process.env.CLADE_NET_DNS;
  if (configured) return configured;
  try {
    for (const line of readFileSync('/etc/resolv.conf', 'utf8').split('\n')) {
      const m = /^\s*nameserver\s+(\S+)/.exec(line);
      if (m && isIP(m[1]!) === 4) return m[1];
    }
  } catch {
    // No resolv.conf: allowed names cannot be resolved; their DNS answers SERVFAIL.
  }
  return undefined;
}

/** Why sandboxes cannot have a network here, or undefined when they can. */
export function networkUnavailableReason(): string | undefined {
  if (!existsSync(netBinary())) return 'clade-net is not built (run `make -C native/net`, or `npm run setup`)';
  if (!passtBinary()) return 'passt is not installed (run `sudo apt-get install passt`, or `npm run setup` as root)';
  return undefined;
}

/** Free TCP ports on the host's loopback, picked by binding port 0 (passt binds them a moment later). */
async function freeLoopbackPorts(n: number): Promise<number[]> {
  const servers = await Promise.all(
    Array.from({ length: n }, () => new Promise<import('node:net').Server>((resolve, reject) => {
      const s = createServer();
      s.once('error', reject);
      s.listen(0, '127.0.0.1', () => resolve(s));
    })),
  );
  const ports = servers.map((s) => (s.address() as import('node:net').AddressInfo).port);
  await Promise.all(servers.map((s) => new Promise((r) => s.close(r))));
  return ports;
}

/** The persisted shape of a sandbox's network process (part of its VM record). */
export type NetRecord = { pid: number; startTicks?: string; ports: { port: number; hostPort: number }[] };

/** A sandbox's network directory: beside its VMs' run directories, since one network outlives a qemu VM process. */
export function netDirOf(runDir: string): string {
  return join(dirname(runDir), 'net');
}

/**
 * One sandbox's network on the host: a clade-net process (with its passt)
 * whose socket the VM connects to. Several VM processes of one sandbox may
 * hold it (a qemu fork's continuation joins before the old process goes),
 * so it is counted: the last release kills it. clade-net also exits by
 * itself when its last VM disconnects, so a VM killed by anyone takes its
 * network along.
 */
export class NetRelay {
  private refs = 1;
  private constructor(
    readonly pid: number,
    readonly startTicks: string | undefined,
    readonly dir: string,
    readonly ports: PortMapping[],
    /** Where the VM connects: in `dir` unless the caller named another place. */
    readonly socket: string = join(dir, 'net.sock'),
  ) {}

  /**
   * Starts a network whose log lives in `dir` (removed by the last release).
   * `socket` is where it listens, `dir`/net.sock unless given: clade-vmm's
   * forked children connect to a socket in their own run directory.
   */
  static async start(spec: NetworkSpec, dir: string, socket = join(dir, 'net.sock')): Promise<NetRelay> {
    const whyNot = networkUnavailableReason();
    if (whyNot) throw new CladeError('unavailable', `sandbox networking is unavailable: ${whyNot}`);
    ensurePrivateDir(dir);
    let last: unknown;
    for (let attempt = 1; attempt <= START_ATTEMPTS; attempt++) {
      try {
        return await NetRelay.startOnce(spec, dir, socket);
      } catch (err) {
        last = err;
        if (!(err instanceof PasstFailed)) break;
      }
    }
    rmSync(dir, { recursive: true, force: true });
    throw last instanceof CladeError ? last : new CladeError('unavailable', `the sandbox's network did not start: ${errorMessage(last)}`, { cause: last });
  }

  private static async startOnce(spec: NetworkSpec, dir: string, socket: string): Promise<NetRelay> {
    const hostPorts = await freeLoopbackPorts(spec.ports.length);
    const ports = spec.ports.map((port, i) => ({ port, hostPort: hostPorts[i]!, host: `127.0.0.1:${hostPorts[i]}` }));
    const upstream = dnsUpstream();
    const args = ['--socket', socket, '--passt', passtBinary()!, ...policyArgs(spec.egress), ...(upstream ? ['--dns', upstream] : []), ...ports.flatMap((p) => ['--tcp', `${p.hostPort}:${p.port}`])];
    const logPath = join(dir, 'net.log');
    const log = openSync(logPath, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC | constants.O_NOFOLLOW, 0o600);
    // Its own process group, an empty environment; it runs until its last VM disconnects.
    const child = spawn(netBinary(), args, { stdio: ['ignore', 'pipe', log], detached: true, env: {} });
    closeSync(log);
    const ready = await new Promise<{ ok: true } | { ok: false; code: number | null; why: string }>((resolve) => {
      let out = '';
      const timer = setTimeout(() => resolve({ ok: false, code: null, why: `not ready within ${READY_TIMEOUT_MS} ms` }), READY_TIMEOUT_MS);
      child.stdout!.on('data', (d: Buffer) => {
        out += d.toString('utf8');
        if (out.includes('ready\n')) {
          clearTimeout(timer);
          resolve({ ok: true });
        }
      });
      child.once('error', (err) => {
        clearTimeout(timer);
        resolve({ ok: false, code: null, why: err.message });
      });
      child.once('exit', (code) => {
        clearTimeout(timer);
        resolve({ ok: false, code, why: readLog(logPath) || `exit status ${code}` });
      });
    });
    child.stdout!.destroy();
    child.unref();
    if (!ready.ok) {
      if (child.pid) killPidQuietly(child.pid);
      const message = `the sandbox's network did not start: ${ready.why}`;
      throw ready.code === EXIT_PASST_FAILED ? new PasstFailed(message) : new CladeError('unavailable', message);
    }
    child.removeAllListeners('exit');
    return new NetRelay(child.pid!, processStartTicks(child.pid!), dir, ports, socket);
  }

  /** Takes over the network of a recorded VM (a restarted daemon). */
  static adopt(rec: NetRecord, runDir: string, socket?: string): NetRelay {
    const dir = netDirOf(runDir);
    return new NetRelay(rec.pid, rec.startTicks, dir, rec.ports.map((p) => ({ ...p, host: `127.0.0.1:${p.hostPort}` })), socket ?? join(dir, 'net.sock'));
  }

  toRecord(): NetRecord {
    return { pid: this.pid, ...(this.startTicks ? { startTicks: this.startTicks } : {}), ports: this.ports.map(({ port, hostPort }) => ({ port, hostPort })) };
  }

  alive(): boolean {
    return isNetProcess(this.pid, this.startTicks);
  }

  /** Another VM process of the same sandbox uses this network too. */
  retain(): NetRelay {
    this.refs++;
    return this;
  }

  /** A VM process is done with it; the last one kills it and removes its directory. */
  async release(): Promise<void> {
    if (--this.refs > 0) return;
    killNet(this.toRecord());
    rmSync(this.dir, { recursive: true, force: true });
  }
}

class PasstFailed extends CladeError {
  constructor(message: string) {
    super('unavailable', message);
  }
}

function readLog(path: string): string {
  try {
    return readFileSync(path, 'utf8').trim().slice(-2000);
  } catch {
    return '';
  }
}

/** True while `pid` is the clade-net process that started at `startTicks`. */
export function isNetProcess(pid: number, startTicks: string | undefined): boolean {
  return isSameProcess(pid, startTicks, 'clade-net');
}

/** Kills a recorded network process if it still runs (its passt exits with it). */
export function killNet(rec: NetRecord): void {
  if (isNetProcess(rec.pid, rec.startTicks)) killPidQuietly(rec.pid);
}
