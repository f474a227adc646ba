/**
 * The runner's /init, a busybox shell script. It loads KVM, runs the payload
 * command with its output on /dev/hvc0 (the host reads it from QEMU's stdout),
 * reports progress as `clade-runner: ...` lines on the serial console, and
 * powers the runner off. Kernel messages share the serial console; the payload's
 * output never does, so the host can tell the two apart without escaping.
 */

/** Every status line the init writes to the serial console starts with this. */
export const STATUS_PREFIX = 'clade-runner: ';

/** KVM modules in load order (kvm needs irqbypass; kvm-amd needs kvm), with the parameters the runner wants. */
export const KVM_MODULES = [
  { name: 'irqbypass', path: 'virt/lib/irqbypass', params: '' },
  { name: 'kvm', path: 'arch/x86/kvm/kvm', params: '' },
  // nested=1 lets a payload run its own nested hypervisor; npt=1 is what makes guests fast.
  { name: 'kvm-amd', path: 'arch/x86/kvm/kvm-amd', params: 'npt=1 nested=1' },
] as const;

/** Where the decompressed modules sit inside the runner. */
export const MODULE_DIR = '/lib/modules/clade-runner';
/** The payload command the host writes; run with `sh`. */
export const COMMAND_FILE = '/runner/command';

export const INIT_SCRIPT = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin HOME=/root
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run /root /dev/shm
mount -t tmpfs tmpfs /dev/shm

say() { echo "${STATUS_PREFIX}$*" > /dev/ttyS0; }
uptime_s() { cut -d' ' -f1 /proc/uptime; }
say "init uptime=$(uptime_s)"

${KVM_MODULES.map((m) => `insmod ${MODULE_DIR}/${m.name}.ko ${m.params} || say "module-failed ${m.name}"`).join('\n')}
if [ -c /dev/kvm ]; then
  say "kvm ok"
else
  say "kvm missing"
  dmesg | grep -i -E 'kvm|svm' | tail -n 8 | while read -r line; do say "dmesg $line"; done
fi

# The output channel is a virtio console; it appears while the kernel probes PCI, before /init normally.
for i in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do [ -c /dev/hvc0 ] && break; sleep 0.25; done
if [ ! -c /dev/hvc0 ]; then
  say "no-output-channel"
  poweroff -f
fi
# Raw mode: no newline translation or echo, so the host gets the payload's bytes as written.
exec 3<>/dev/hvc0
stty raw -echo <&3

say "payload-start uptime=$(uptime_s)"
cd /
sh ${COMMAND_FILE} </dev/null >&3 2>&3
status=$?
say "payload-exit status=$status uptime=$(uptime_s)"
exec 3>&-
poweroff -f
`;
