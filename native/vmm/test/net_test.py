#!/usr/bin/env python3
"""The NIC's host side in clade-vmm on this host's /dev/kvm (docs/vmm.md, "Network").

The guest is a minimal PVH kernel built here (a HLT loop: this host's KVM runs
no Linux), so the VMM builds its Linux board, NIC included, with no driver
behind it: what is checked is the VMM's side. Unix listeners in this script
stand in for the sandboxes' network processes.

Checks: --net connects before the VM starts and a missing socket is refused;
a fork without run directories is refused; `forks 3 DIR...` makes each child
connect to its own DIR/net.sock (status names it) while the parent keeps its
connection, and a child whose DIR has no net.sock fails alone; a snapshot of a
VM with a NIC needs --net to start (exit 2 without) and connects to it; every
process started is gone at the end. Prints "PASS: N checks, 0 failed".

Run by hand on a host whose /dev/kvm runs the CPL3 test guest
(`make -C native/vmm && python3 native/vmm/test/net_test.py`); it is not yet
part of test/native/vmm-fork.test.ts.
"""
import os
import socket
import subprocess
import sys
import traceback

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.dont_write_bytecode = True  # keep the source tree clean
import vmmctl  # noqa: E402
from vmmctl import Fleet, wait_for  # noqa: E402

USAGE, FAILURE = 2, 1  # clade-vmm's exit statuses: bad command line, could not start
results = []

# A PVH kernel that halts for ever: the Xen note (type 18) names its 32-bit entry.
TINY_KERNEL_S = """
    .section .note.Xen, "a", @note
    .align 4
    .long 4, 4, 18
    .asciz "Xen"
    .long entry
    .text
    .code32
    .globl entry
entry:
    hlt
    jmp entry
"""
TINY_KERNEL_LD = """
ENTRY(entry)
PHDRS { text PT_LOAD; note PT_NOTE; }
SECTIONS {
  . = 0x100000;
  .text : { *(.text) } :text
  .note.Xen : { *(.note.Xen) } :text :note
}
"""


def check(name, condition, detail=""):
    results.append((name, bool(condition)))
    print(f"{'ok  ' if condition else 'FAIL'} {name}{'' if condition else ' -- ' + str(detail)}", flush=True)


def build_kernel(directory):
    src, script, obj, elf = (os.path.join(directory, n) for n in ("tiny.S", "tiny.ld", "tiny.o", "tiny.elf"))
    with open(src, "w") as f:
        f.write(TINY_KERNEL_S)
    with open(script, "w") as f:
        f.write(TINY_KERNEL_LD)
    subprocess.run(["gcc", "-c", src, "-o", obj], check=True, timeout=60)
    subprocess.run(["ld", "-m", "elf_x86_64", "-T", script, "-o", elf, obj], check=True, timeout=60)
    initramfs = os.path.join(directory, "initramfs")
    with open(initramfs, "wb") as f:
        f.write(bytes(4096))
    return elf, initramfs


class NetProcess:
    """A listening unix socket where a network process would be; accepts what connects."""

    def __init__(self, path):
        self.path = path
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(path)
        self.listener.listen(8)
        self.conns = []

    def accept(self, timeout=10.0):
        self.listener.settimeout(timeout)
        try:
            conn, _ = self.listener.accept()
        except socket.timeout:
            return None
        self.conns.append(conn)
        return conn

    def close(self):
        for c in self.conns:
            c.close()
        self.listener.close()
        os.unlink(self.path)


def start_linux(fleet, name, kernel, initramfs, net_path):
    extra = ["--kernel", kernel, "--initramfs", initramfs]
    return fleet.start_root(name, extra=extra + (["--net", net_path] if net_path else []))


def refused(fleet, name, code, expect, **kwargs):
    try:
        fleet.start_root(name, **kwargs)
        return False, "started"
    except vmmctl.VmmError as e:
        status = fleet.roots[-1].wait(timeout=10)
        return status == code and expect in str(e), f"exit {status}: {e}"


def test_network(fleet, nets, kernel, initramfs):
    ok, detail = refused(fleet, "no-net", FAILURE, "cannot connect to the network socket",
                         extra=["--kernel", kernel, "--initramfs", initramfs, "--net", os.path.join(fleet.dir, "missing.sock")])
    check("a missing network socket is refused before anything starts", ok, detail)
    ok, detail = refused(fleet, "relative-net", FAILURE, "absolute path",
                         extra=["--kernel", kernel, "--initramfs", initramfs, "--net", "net.sock"])
    check("a relative network socket path is refused", ok, detail)

    root_net = NetProcess(os.path.join(fleet.dir, "net.sock"))
    nets.append(root_net)
    root, _ = start_linux(fleet, "root", kernel, initramfs, root_net.path)
    check("the VM connects to its network socket", root_net.accept() is not None)
    st = root.req("status")
    check("status names the network and says it is connected",
          st.get("net") == root_net.path and st.get("netConnected") is True and st.get("state") == "running", st)

    for request in ("forks 2", "fork"):
        reply = root.req(request, ok=False)
        check(f"`{request}` without run directories is refused", reply["ok"] is False and "network" in reply.get("error", ""), reply)

    dirs = [os.path.join(fleet.dir, f"child-{i}") for i in range(3)]
    for d in dirs:
        os.mkdir(d)
    child_nets = [NetProcess(os.path.join(d, "net.sock")) for d in dirs[:2]]  # the third child's network is missing
    nets.extend(child_nets)
    reply = fleet.forks(root, 3, *dirs)
    children = reply.get("children", [])
    check("forks 3 into run directories", reply["ok"] and len(children) == 3, reply)
    check("each child connects to its own network socket", all(n.accept() is not None for n in child_nets))
    for i, net in enumerate(child_nets):
        conn = fleet.connect(os.path.join(dirs[i], "control.sock"))
        cst = conn.req("status")
        check(f"child {i} runs on its own network", cst.get("net") == net.path and cst.get("netConnected") is True and
              cst.get("state") == "running", cst)
    failed_pid = children[2]["pid"] if len(children) == 3 else 0
    check("a child without its network fails alone, and exits", wait_for(lambda: not vmmctl.pid_exists(failed_pid), 10), failed_pid)
    st = root.req("status")
    check("the parent keeps its connection", st.get("netConnected") is True and st.get("net") == root_net.path and
          st.get("state") == "running", st)
    check("the parent made no new connection", root_net.accept(timeout=0.2) is None)

    snap = os.path.join(fleet.dir, "snap")
    os.mkdir(snap)
    _, done = fleet.snapshot(root, snap)
    check("a VM with a NIC snapshots", done.get("ok") is True, done)
    ok, detail = refused(fleet, "restored-no-net", USAGE, "has a network", restore=snap)
    check("its snapshot needs --net", ok, detail)
    restored_net = NetProcess(os.path.join(fleet.dir, "restored-net.sock"))
    nets.append(restored_net)
    restored, _ = fleet.start_root("restored", restore=snap, extra=["--net", restored_net.path])
    check("and starts with it, connected", restored_net.accept() is not None and restored.req("status").get("netConnected") is True)
    for conn in (restored, root):
        conn.req("quit")


def main():
    if not os.path.exists("/dev/kvm"):
        print("SKIP: no /dev/kvm")
        return 0
    fleet = Fleet()
    nets = []
    try:
        kernel, initramfs = build_kernel(fleet.dir)
        test_network(fleet, nets, kernel, initramfs)
    except Exception:
        traceback.print_exc()
        check("no exception", False)
    finally:
        for net in nets:
            net.close()
        fleet.close()
    check("no VMM process left behind", not fleet.alive(), fleet.alive())
    check("temporary directory removed", not os.path.exists(fleet.dir))
    failed = sum(1 for _, ok in results if not ok)
    print(f"{'PASS' if not failed else 'FAIL'}: {len(results)} checks, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
