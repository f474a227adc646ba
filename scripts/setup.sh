#!/usr/bin/env bash
# Sets clade up on this machine, idempotently: the Debian packages it needs
# (installed when run as root, otherwise printed as a command to run), npm
# dependencies, the native programs, the TypeScript build, and the default
# guest image (cached by content digest, so a second run is quick).
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v qemu-system-x86_64 >/dev/null || missing+=(qemu-system-x86)
command -v dpkg-deb >/dev/null || missing+=(dpkg)
command -v gcc >/dev/null || missing+=(gcc)
command -v make >/dev/null || missing+=(make)
# The image tests check the initramfs writer against GNU cpio.
command -v cpio >/dev/null || missing+=(cpio)
# The runner VM (docs/runner.md) decompresses the kernel's KVM modules with xz.
command -v xz >/dev/null || missing+=(xz-utils)
# clade-vmm boots the kernel's uncompressed vmlinux, extracted from the bzImage with zstd.
command -v zstd >/dev/null || missing+=(zstd)
# Images with a disk root filesystem (--rootfs disk, or big ones) are written as erofs.
command -v mkfs.erofs >/dev/null || missing+=(erofs-utils)
[ -e /usr/lib/x86_64-linux-gnu/libc.a ] || missing+=(libc6-dev)
# Sandbox networks: passt is the user-mode TCP/IP stack behind clade-net; ip (iproute2) makes the tests' network namespace.
command -v passt >/dev/null || missing+=(passt)
command -v ip >/dev/null || missing+=(iproute2)
# The leak checks look for left-over VM and network processes with pgrep.
command -v pgrep >/dev/null || missing+=(procps)
# Tests make FIFOs (a copy source that is one must be refused) with mkfifo.
command -v mkfifo >/dev/null || missing+=(coreutils)
command -v clang >/dev/null || missing+=(clang) # fuzzing native/vmm/devices
[ -n "$(ls /usr/lib/llvm-*/lib/clang/*/lib/linux/libclang_rt.fuzzer-x86_64.a 2>/dev/null)" ] || missing+=(libclang-rt-14-dev)
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: clade needs these Debian packages; run:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}" >&2
    exit 1
  fi
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: installing npm dependencies"
  # npm ci rejects lockfiles that lack other platforms' optional packages; install keeps the locked versions.
  npm install --no-audit --no-fund --loglevel=error
fi

echo "setup: building native programs and TypeScript"
make -s -C native/agent
make -s -C native/kvm-probe
make -s -C native/vmm
make -s -C native/net
npx tsc -p tsconfig.json

node bin/clade.js image build
