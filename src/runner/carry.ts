import { execFile } from 'node:child_process';
import { createHash } from 'node:crypto';
import { accessSync, constants, existsSync, readFileSync, realpathSync, renameSync } from 'node:fs';
import { basename, delimiter, join } from 'node:path';
import { promisify } from 'node:util';
import { CladeError, errorMessage } from '../util/errors.js';
import { ensurePrivateDir } from '../util/home.js';
import { packageRoot } from '../util/paths.js';
import { QEMU_BINARY } from '../engines/qemu/qemu-vm.js';
import { netBinary, passtBinary } from '../engines/network.js';
import { resolveImage } from '../images/store.js';
import { ensureVmlinux } from '../images/vmlinux.js';
import { runnerCacheDir } from './base.js';
import type { Carry } from './payload.js';

const run = promisify(execFile);

/** Where the ready-made carries put things inside the runner. */
export const GUEST_PATHS = {
  kvmProbe: '/opt/clade/bin/kvm-probe',
  qemu: '/opt/qemu/bin/qemu-system-x86_64',
  node: '/opt/node/bin/node',
  imageKernel: '/opt/clade/image/vmlinuz',
  imageInitramfs: '/opt/clade/image/initramfs.cpio',
} as const;

/**
 * native/kvm-probe built statically: the runner has no C library, only busybox.
 * Cached by the source's hash.
 */
export async function kvmProbeCarry(): Promise<Carry> {
  const source = join(packageRoot(), 'native', 'kvm-probe', 'kvm-probe.c');
  const hash = createHash('sha256').update(readFileSync(source)).digest('hex').slice(0, 12);
  const binary = join(ensurePrivateDir(runnerCacheDir()), `kvm-probe-static-${hash}`);
  if (!existsSync(binary)) {
    const partial = `${binary}.partial-${process.pid}`;
    try {
      await run('gcc', ['-std=c11', '-O2', '-static', '-o', partial, source]);
    } catch (err) {
      throw new CladeError('unavailable', `cannot build a static kvm-probe (needs gcc and libc6-dev; run scripts/setup.sh): ${errorMessage(err)}`);
    }
    renameSync(partial, binary);
  }
  return { hostPath: binary, guestPath: GUEST_PATHS.kvmProbe };
}

/** The kernel and initramfs of a guest image, to boot inside the runner. */
export function imageCarry(ref = 'default'): Carry[] {
  const image = resolveImage(ref);
  return [
    { hostPath: image.kernel, guestPath: GUEST_PATHS.imageKernel },
    { hostPath: image.initramfs, guestPath: GUEST_PATHS.imageInitramfs },
  ];
}

/** Firmware a microvm, q35 or pc machine may ask for; others (other architectures, VGA) stay behind. */
const X86_FIRMWARE = ['bios-microvm.bin', 'qboot.rom', 'bios-256k.bin', 'bios.bin', 'linuxboot_dma.bin', 'linuxboot.bin', 'pvh.bin', 'kvmvapic.bin', 'multiboot_dma.bin'];
const FIRMWARE_DIRS = ['/usr/share/qemu', '/usr/share/seabios'];

/**
 * The host's QEMU with its shared libraries and x86 firmware (~50 MB), so a
 * payload can boot guests with QEMU+KVM inside the runner. GUEST_PATHS.qemu is
 * a wrapper that points QEMU at its libraries and firmware (`-L`).
 */
export async function qemuCarry(): Promise<Carry[]> {
  const binary = findOnPath(QEMU_BINARY);
  const carry: Carry[] = [{ hostPath: binary, guestPath: '/opt/qemu/libexec/qemu-system-x86_64' }, ...(await libraryCarry(binary, '/opt/qemu/lib'))];
  for (const name of X86_FIRMWARE) {
    const dir = FIRMWARE_DIRS.find((d) => existsSync(join(d, name)));
    if (dir) carry.push({ hostPath: join(dir, name), guestPath: `/opt/qemu/share/${name}` });
  }
  const wrapper = `#!/bin/sh\nexec env LD_LIBRARY_PATH=/opt/qemu/lib /opt/qemu/libexec/qemu-system-x86_64 -L /opt/qemu/share "$@"\n`;
  carry.push({ guestPath: GUEST_PATHS.qemu, content: wrapper, mode: 0o755 });
  return carry;
}

/**
 * This Node.js with its shared libraries, so a payload can run clade itself
 * (the SDK on the vmm engine) inside the runner: GUEST_PATHS.node runs it.
 */
export async function nodeCarry(): Promise<Carry[]> {
  const binary = realpathSync(process.execPath);
  const wrapper = `#!/bin/sh\nexec env LD_LIBRARY_PATH=/opt/node/lib /opt/node/libexec/node "$@"\n`;
  return [{ hostPath: binary, guestPath: '/opt/node/libexec/node' }, ...(await libraryCarry(binary, '/opt/node/lib')), { guestPath: GUEST_PATHS.node, content: wrapper, mode: 0o755 }];
}

/** Where cladeCarry() puts clade inside the runner. */
export const CLADE_IN_RUNNER = { package: '/opt/clade', home: '/root/clade-home' } as const;

/**
 * clade itself, for a payload that runs it inside the runner (the SDK or the
 * daemon on the vmm engine): this Node.js, the built package (package.json,
 * bin/, dist/), clade-vmm, a static kvm-probe, with `daemon` the npm packages
 * the daemon needs at run time, with `network` what sandbox networks need
 * (networkCarry), and the image `image` ("default" unless told) as the
 * default image of a clade home of its own (CLADE_IN_RUNNER.home).
 */
export async function cladeCarry(opts: { daemon?: boolean; image?: string; network?: boolean } = {}): Promise<Carry[]> {
  const root = packageRoot();
  const pkg = CLADE_IN_RUNNER.package;
  const vmm = join(root, 'native', 'vmm', 'build', 'clade-vmm');
  for (const [file, fix] of [
    [join(root, 'dist', 'sdk', 'index.js'), 'npm run build'],
    [vmm, 'make -C native/vmm'],
  ] as const) {
    if (!existsSync(file)) throw new CladeError('unavailable', `${file} is missing: run \`${fix}\` first`);
  }
  const probe = await kvmProbeCarry();
  return [
    ...(await nodeCarry()),
    ...['package.json', 'bin', 'dist'].map((path) => ({ hostPath: join(root, path), guestPath: `${pkg}/${path}` })),
    ...(opts.daemon ? runtimePackages(root).map((path) => ({ hostPath: join(root, path), guestPath: `${pkg}/${path}` })) : []),
    { hostPath: vmm, guestPath: `${pkg}/native/vmm/build/clade-vmm` },
    { ...probe, guestPath: `${pkg}/native/kvm-probe/build/kvm-probe` },
    ...(opts.network ? await networkCarry(`${pkg}/native/net/build/clade-net`) : []),
    ...(await imageInHome(opts.image ?? 'default', CLADE_IN_RUNNER.home)),
  ];
}

/** The user and group both clade-net and passt become once their sockets are open. */
const NOBODY_PASSWD = 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin\n';
const NOBODY_GROUP = 'root:x:0:\nnogroup:x:65534:\n';

/**
 * What sandbox networks need in the runner: clade-net (at `netGuestPath`,
 * where the carried package looks for it) and the host's passt at
 * /usr/bin/passt, where clade finds it on PATH. clade-net starts passt with an
 * empty environment, so their C library goes where the dynamic loader looks
 * without being told (the paths it has here), and /etc/passwd names nobody,
 * the user passt looks up to drop root.
 */
export async function networkCarry(netGuestPath: string): Promise<Carry[]> {
  const net = netBinary();
  const passt = passtBinary();
  if (!existsSync(net)) throw new CladeError('unavailable', `${net} is missing: run \`make -C native/net\` first`);
  if (!passt) throw new CladeError('unavailable', 'passt is not installed: run `sudo apt-get install passt`');
  return [
    { hostPath: net, guestPath: netGuestPath },
    ...(await libraryCarry(net)),
    { hostPath: passt, guestPath: '/usr/bin/passt' },
    ...(await libraryCarry(passt)),
    // passt runs its AVX2 build instead, found beside it, when the CPU has AVX2.
    ...(existsSync(`${passt}.avx2`) ? [{ hostPath: `${passt}.avx2`, guestPath: '/usr/bin/passt.avx2' }, ...(await libraryCarry(`${passt}.avx2`))] : []),
    { guestPath: '/etc/passwd', content: NOBODY_PASSWD },
    { guestPath: '/etc/group', content: NOBODY_GROUP },
  ];
}

/**
 * An image as `clade image build` leaves it in a clade home (with its vmlinux for clade-vmm, and a disk image's
 * root disk), named "default" there whatever its name here. The runner's root is RAM: a disk costs its size there.
 */
async function imageInHome(ref: string, home: string): Promise<Carry[]> {
  const image = resolveImage(ref);
  const vmlinux = await ensureVmlinux(image);
  const dir = `${home}/images/${image.manifest.digest}`;
  return [
    { hostPath: join(image.dir, 'image.json'), guestPath: `${dir}/image.json` },
    { hostPath: image.kernel, guestPath: `${dir}/vmlinuz` },
    { hostPath: vmlinux, guestPath: `${dir}/vmlinux` },
    { hostPath: image.initramfs, guestPath: `${dir}/initramfs.cpio` },
    ...(image.disk ? [{ hostPath: image.disk, guestPath: `${dir}/${basename(image.disk)}` }] : []),
    { guestPath: `${home}/images/refs/default`, content: `${image.manifest.digest}\n` },
  ];
}

/**
 * The packages the daemon needs at run time: package-lock.json's non-dev
 * entries, without those nested inside another one (they come with it).
 */
function runtimePackages(root: string): string[] {
  const lock = JSON.parse(readFileSync(join(root, 'package-lock.json'), 'utf8')) as { packages: Record<string, { dev?: boolean }> };
  const runtime = Object.entries(lock.packages)
    .filter(([path, meta]) => path.startsWith('node_modules/') && !meta.dev)
    .map(([path]) => path);
  return runtime.filter((path) => !runtime.some((outer) => path.startsWith(`${outer}/`)));
}

/**
 * The shared libraries `ldd` lists for a binary, into `libDir` (for a wrapper's
 * LD_LIBRARY_PATH), or without one where they are here; the dynamic loader
 * goes where the binary names it.
 */
async function libraryCarry(binary: string, libDir?: string): Promise<Carry[]> {
  const { stdout } = await run('ldd', [binary]).catch((err: unknown) => {
    throw new CladeError('unavailable', `cannot list ${binary}'s libraries with ldd: ${errorMessage(err)}`);
  });
  const carry: Carry[] = [];
  for (const line of stdout.split('\n')) {
    const lib = /^\s*(\S+) => (\/\S+)/.exec(line);
    const loader = /^\s*(\/\S+) \(0x/.exec(line);
    if (lib) carry.push({ hostPath: lib[2]!, guestPath: libDir ? `${libDir}/${lib[1]!}` : lib[2]! });
    else if (loader) carry.push({ hostPath: loader[1]!, guestPath: loader[1]! });
  }
  return carry;
}

function findOnPath(command: string): string {
  const candidates = command.includes('/') ? [command] : (process.env.PATH ?? '').split(delimiter).map((d) => join(d, command));
  for (const c of candidates) {
    try {
      accessSync(c, constants.X_OK);
      return realpathSync(c);
    } catch {
      // Not here.
    }
  }
  throw new CladeError('unavailable', `${basename(command)} is not installed: run \`sudo apt-get install qemu-system-x86\``);
}
