import { spawn } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Value } from '@sinclair/typebox/value';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { SandboxManager } from '../../src/core/manager.js';
import { NetRelay, netDirOf, normalizeNetwork } from '../../src/engines/network.js';
import { VmmEngine, VmmVm } from '../../src/engines/vmm/vmm-engine.js';
import { CladeError } from '../../src/util/errors.js';
import { homePaths } from '../../src/util/home.js';
import { CreateBody } from '../../src/wire/schemas.js';
import { FakeEngine, fakeImage } from '../helpers/fake-engine.js';

// The network option's checks (the same for the SDK, the daemon and records)
// and what the core does with it, on the fake engine. The network itself is
// tested with real VMs in network.test.ts.

const saved = process.env.CLADE_HOME;
const home = mkdtempSync(join(tmpdir(), 'clade-unit-home-'));

beforeAll(() => {
  process.env.CLADE_HOME = home;
  fakeImage();
});

afterAll(() => {
  if (saved === undefined) delete process.env.CLADE_HOME;
  else process.env.CLADE_HOME = saved;
  rmSync(home, { recursive: true, force: true });
});

function refusal(raw: unknown): string {
  try {
    normalizeNetwork(raw);
  } catch (err) {
    expect(err).toBeInstanceOf(CladeError);
    expect((err as CladeError).code).toBe('bad_request');
    return (err as CladeError).message;
  }
  throw new Error(`accepted ${JSON.stringify(raw)}`);
}

describe('network options', () => {
  it('normalizes what it accepts', () => {
    expect(normalizeNetwork(undefined)).toBeUndefined();
    expect(normalizeNetwork({})).toEqual({ egress: 'none', ports: [] });
    expect(normalizeNetwork({ egress: 'all', ports: [8000, 8000, 22] })).toEqual({ egress: 'all', ports: [8000, 22] });
    expect(normalizeNetwork({ egress: ['PyPI.org', '*.Example.com', '203.0.113.7', '10.0.0.0/8', '0.0.0.0/0'] })).toEqual({
      egress: ['pypi.org', '*.example.com', '203.0.113.7', '10.0.0.0/8', '0.0.0.0/0'],
      ports: [],
    });
  });

  it('refuses bad ports and allow-list entries with a message that names the entry and what is accepted', () => {
    expect(refusal({ ports: [70000] })).toMatch(/70000 is not a TCP port \(an integer from 1 to 65535\)/);
    expect(refusal({ ports: [0] })).toMatch(/0 is not a TCP port/);
    expect(refusal({ ports: [80.5] })).toMatch(/80.5 is not a TCP port/);
    expect(refusal({ ports: '80' })).toMatch(/must be a list of TCP ports/);
    expect(refusal({ egress: ['exa mple.com'] })).toMatch(/"exa mple.com" is not a host name, \*\.domain, IPv4 address or IPv4 CIDR/);
    expect(refusal({ egress: ['1.2.3.4/33'] })).toMatch(/prefix length is 0 to 32/);
    expect(refusal({ egress: ['1.2.3.4/24'] })).toMatch(/did you mean 1\.2\.3\.0\/24/);
    expect(refusal({ egress: ['1.2.3'] })).toMatch(/not an IPv4 address or CIDR/);
    expect(refusal({ egress: ['::1'] })).toMatch(/IPv6/);
    expect(refusal({ egress: ['127.0.0.1'] })).toMatch(/loopback/);
    expect(refusal({ egress: ['169.254.169.254'] })).toMatch(/link-local/);
    expect(refusal({ egress: ['10.0.2.2'] })).toMatch(/sandbox's own network/);
    expect(refusal({ egress: [42] })).toMatch(/entries are strings/);
    expect(refusal({ egress: 'some' })).toMatch(/must be "none", "all" or a list/);
    expect(refusal({ egress: Array.from({ length: 65 }, (_, i) => `h${i}.example`) })).toMatch(/at most 64/);
    expect(refusal({ egres: 'all' })).toMatch(/no option "egres"/);
    expect(refusal('all')).toMatch(/must be an object/);
  });

  it('the daemon\'s schema refuses a port out of range before the core sees it', () => {
    expect(Value.Check(CreateBody, { network: { egress: ['example.com'], ports: [8000] } })).toBe(true);
    expect(Value.Check(CreateBody, { network: { ports: [70000] } })).toBe(false);
    expect(Value.Check(CreateBody, { network: { egress: 'some' } })).toBe(false);
    expect(Value.Check(CreateBody, { network: { extra: 1 } })).toBe(false);
  });

  it('the core refuses a bad network before it makes anything, and forks inherit a good one', async () => {
    const engine = new FakeEngine();
    const manager = new SandboxManager({ qemu: engine }, { requestMs: 3000 });
    await expect(manager.create({ network: { ports: [70000] } })).rejects.toThrow(/not a TCP port/);
    expect(existsSync(homePaths.sandboxes()) ? readdirSync(homePaths.sandboxes()).filter((d) => !d.startsWith('.')) : []).toEqual([]);
    const sb = await manager.create({ network: { egress: ['example.com'], ports: [8000] } });
    try {
      expect(sb.shape.network).toEqual({ egress: ['example.com'], ports: [8000] });
      expect(sb.ports.map((p) => p.port)).toEqual([8000]);
      expect(manager.record(sb, null).vm.shape.network).toEqual({ egress: ['example.com'], ports: [8000] });
      const [kid] = (await manager.fork(sb, 1)).children;
      if (kid instanceof CladeError) throw kid;
      expect(kid!.shape.network).toEqual(sb.shape.network);
      expect(kid!.ports[0]!.host).not.toBe(sb.ports[0]!.host);
    } finally {
      await Promise.all(manager.list().map((s) => s.kill()));
    }
  });

  it('a sandbox with a network runs on vmm where vmm is the default, and on qemu when asked', async () => {
    const saved = process.env.CLADE_ENGINE;
    delete process.env.CLADE_ENGINE;
    try {
      // A fake that judges shapes the way clade-vmm does.
      const vmm = Object.assign(new FakeEngine(), { refusesShape: (shape: never) => VmmEngine.prototype.refusesShape.call(undefined as never, shape) });
      const manager = new SandboxManager({ qemu: new FakeEngine(), vmm: vmm as never }, { requestMs: 3000 });
      const networked = { image: { manifest: { name: 'default' } }, memoryMiB: 512, cpus: 1, network: { egress: 'none', ports: [8000] } } as never;
      expect(new VmmEngine().refusesShape(networked)).toBeUndefined();
      expect(await manager.chooseEngine(undefined)).toBe('vmm');
      expect(await manager.chooseEngine(undefined, networked)).toBe('vmm');
      expect(await manager.chooseEngine('vmm', networked)).toBe('vmm');
      expect(await manager.chooseEngine('qemu', networked)).toBe('qemu');
    } finally {
      if (saved !== undefined) process.env.CLADE_ENGINE = saved;
    }
  });

  it('a vmm VM with a network records it, shows its ports, and releases it when killed', async () => {
    const sandbox = join(home, 'sandboxes', 'sb-vmm-net');
    const runDir = join(sandbox, 'vm-0');
    const netDir = netDirOf(runDir);
    mkdirSync(runDir, { recursive: true });
    mkdirSync(netDir, { recursive: true });
    // A recorded network whose process is gone: the VM takes it over as a restarted daemon would.
    const net = NetRelay.adopt({ pid: 999_999_999, ports: [{ port: 8000, hostPort: 41234 }] }, runDir, join(runDir, 'net.sock'));
    expect(net.socket).toBe(join(runDir, 'net.sock'));
    const shape = { image: { manifest: { name: 'default', digest: 'd'.repeat(64) } }, memoryMiB: 256, cpus: 1, network: { egress: 'none', ports: [8000] } } as never;
    const files = { control: join(runDir, 'control.sock'), agent: join(runDir, 'agent.sock'), serial: join(runDir, 'serial.log'), net: join(runDir, 'net.sock') };
    const vm = new VmmVm('sb-vmm-net', 999_999_999, shape, runDir, files as never, undefined, net);
    expect(vm.ports).toEqual([{ port: 8000, hostPort: 41234, host: '127.0.0.1:41234' }]);
    const record = vm.toRecord();
    expect(record.net).toEqual({ pid: 999_999_999, ports: [{ port: 8000, hostPort: 41234 }] });
    expect(record.shape.network).toEqual({ egress: 'none', ports: [8000] });
    expect(vm.pids()).toEqual([999_999_999, 999_999_999]);
    await vm.kill();
    await vm.kill(); // twice is safe: the network is released once
    expect(existsSync(runDir)).toBe(false);
    expect(existsSync(netDir)).toBe(false);
    expect(vm.ports).toEqual([]);
    rmSync(sandbox, { recursive: true, force: true });
  });

  it('the CLI refuses bad --port and --egress values with the same errors, in --json too', async () => {
    const cli = (...args: string[]) =>
      new Promise<{ code: number | null; out: string; err: string }>((resolve) => {
        const child = spawn(process.execPath, ['--import', 'tsx', join(import.meta.dirname, '../../src/cli/main.ts'), ...args], { env: { ...process.env, CLADE_DAEMON: '' } });
        let out = '';
        let err = '';
        child.stdout.on('data', (d: Buffer) => (out += d.toString()));
        child.stderr.on('data', (d: Buffer) => (err += d.toString()));
        child.on('close', (code) => resolve({ code, out, err }));
      });
    const [port, egress] = await Promise.all([cli('run', '--port', 'abc', '--', 'true'), cli('--json', 'run', '--egress', '10.0.0.1/40', '--', 'true')]);
    expect(port.code).toBe(1);
    expect(port.err).toMatch(/--port takes a TCP port number \(1 to 65535\), got "abc"/);
    expect(egress.code).toBe(1);
    expect(JSON.parse(egress.out).error).toMatchObject({ code: 'bad_request', message: expect.stringMatching(/prefix length is 0 to 32/) });
    expect(existsSync(homePaths.sandboxes()) ? readdirSync(homePaths.sandboxes()).filter((d) => !d.startsWith('.')) : []).toEqual([]);
  });
});
