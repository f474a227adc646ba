import { execFile } from 'node:child_process';
import { chmodSync, existsSync, mkdirSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { CladeError, errorMessage } from '../util/errors.js';

const run = promisify(execFile);

/** Where the agent finds them (native/agent/net.c), loaded in this order only when a sandbox has a network. */
export const NET_MODULES_DIR = 'usr/lib/clade/net-modules';
/** virtio-net (a module in Debian's cloud kernel) and what it needs; the socket diagnostics let the agent reset a fork's inherited connections. */
export const NET_MODULES = ['net/core/failover', 'drivers/net/net_failover', 'drivers/net/virtio_net', 'net/ipv4/inet_diag', 'net/ipv4/tcp_diag'];

/**
 * Puts the network modules of the unpacked kernel package `kernelDir` into
 * the guest tree `root`, decompressed (the agent loads them with plain
 * finit_module), numbered in load order.
 */
export async function installNetworkModules(kernelDir: string, root: string): Promise<void> {
  const modules = join(kernelDir, 'lib/modules');
  const release = existsSync(modules) ? readdirSync(modules)[0] : undefined;
  if (!release) throw new CladeError('not_found', `the kernel package in ${kernelDir} has no modules`);
  const dest = join(root, NET_MODULES_DIR);
  mkdirSync(dest, { recursive: true });
  let n = 0;
  for (const rel of NET_MODULES) {
    const name = rel.split('/').pop()!;
    const src = join(modules, release, 'kernel', `${rel}.ko.xz`);
    const target = join(dest, `${String(++n).padStart(2, '0')}-${name}.ko`);
    if (!existsSync(src)) throw new CladeError('not_found', `the kernel ${release} has no module ${rel}.ko.xz, which sandbox networking needs`);
    try {
      await run('sh', ['-c', 'xz -dc "$1" > "$2"', 'sh', src, target]);
    } catch (err) {
      throw new CladeError('unavailable', `could not decompress kernel module ${name} (needs xz-utils): ${errorMessage(err)}`);
    }
    chmodSync(target, 0o644);
  }
}
