"""A small client for the clade-vmm control protocol (docs/vmm.md), shared by
the fork test and the fork benchmark.

Every process it starts or learns about (fork replies) is tracked by a
Fleet, which kills and reaps all of them on close(), also after a failure.
The calling process becomes a child subreaper, so VMM processes orphaned by
a killed parent are re-parented to it and reaped here, not left as zombies.
"""
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
# The test build: the product plus the requests tests need (read/write guest memory, the test guest's mailbox).
BINARY = os.path.join(HERE, "..", "build", "clade-vmm-test")
PR_SET_CHILD_SUBREAPER = 36

GUEST_DATA = 0x10000
COUNTER, CMD, ARG, ACK, STORED = (GUEST_DATA + off for off in (0x00, 0x08, 0x10, 0x18, 0x20))
GUEST_PML4 = 0x1000
CMD_ECHO, CMD_CRASH, CMD_STORE = 1, 2, 4


class VmmError(Exception):
    pass


class Conn:
    """One control connection; every call has a deadline, so nothing hangs."""

    def __init__(self, path, timeout=5.0):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.timeout = timeout
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.buf = b""

    def raw(self, line):
        self.sock.sendall(line if isinstance(line, bytes) else line.encode())
        while b"\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise VmmError(f"{self.path}: connection closed")
            self.buf += chunk
        reply, self.buf = self.buf.split(b"\n", 1)
        return json.loads(reply)

    def req(self, line, ok=True, timeout=None):
        if timeout is not None:  # a request that takes long by nature (a spawner forking many children)
            self.sock.settimeout(timeout)
        try:
            reply = self.raw(line + "\n")
        finally:
            if timeout is not None:
                self.sock.settimeout(self.timeout)
        if ok and not reply.get("ok"):
            raise VmmError(f"{self.path}: {line!r} -> {reply}")
        return reply

    def close(self):
        self.sock.close()


def become_subreaper():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


class Fleet:
    """All VMM processes of one test or benchmark run, cleaned up together."""

    def __init__(self, idle_us=10000, mem_mib=64):
        become_subreaper()
        self.dir = tempfile.mkdtemp(prefix="clade-vmm-")
        self.idle_us, self.mem_mib = idle_us, mem_mib
        self.pids = set()
        self.roots = []
        self.conns = []

    def start_root(self, name="root", restore=None, extra=()):
        path = os.path.join(self.dir, f"{name}.sock")
        source = ["--restore", restore] if restore else ["--mem-mib", str(self.mem_mib)]
        proc = subprocess.Popen(
            [BINARY, "run", "--socket", path, "--idle-us", str(self.idle_us)] + source + list(extra),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
        self.roots.append(proc)
        self.pids.add(proc.pid)
        line = proc.stdout.readline()
        if not line:
            raise VmmError("clade-vmm exited before it was ready: " + proc.stderr.read().decode(errors="replace").strip())
        info = json.loads(line)
        return self.connect(info["socket"]), info

    def connect(self, path):
        conn = Conn(path)
        self.conns.append(conn)
        return conn

    def track(self, fork_reply):
        for child in fork_reply.get("children", []):
            self.pids.add(child["pid"])
        return fork_reply

    def fork(self, conn, *args):
        return self.track(conn.req(" ".join(("fork",) + args)))

    def forks(self, conn, count, *dirs):
        """One pause for all; the reply comes once the spawner has forked every child (the VMM gives it 60 s)."""
        return self.track(conn.req(" ".join((f"forks {count}",) + dirs), timeout=65))

    def snapshot(self, conn, directory, timeout=30.0):
        """Snapshot to disk: the VMM replies at once, its writer child reports in DIR/done."""
        reply = conn.req(f"snapshot {directory}")
        self.pids.add(reply["writer"])
        done = os.path.join(directory, "done")
        if not wait_for(lambda: os.path.exists(done), timeout):
            raise VmmError(f"snapshot writer did not finish within {timeout}s")
        with open(done) as f:
            return reply, json.loads(f.read())

    def close(self):
        for conn in self.conns:
            try:
                conn.close()
            except OSError:
                pass
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.roots:  # each root leads a process group that all its descendants share
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for proc in self.roots:
            proc.wait(timeout=10)
            proc.stdout.close()
            proc.stderr.close()
        reap_orphans(deadline=time.monotonic() + 10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def alive(self):
        """Tracked pids that still exist (reaped zombies do not count)."""
        reap_orphans(deadline=time.monotonic())
        return sorted(pid for pid in self.pids if pid_exists(pid))


def pid_exists(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone, or exiting right now
        return False


def reap_orphans(deadline):
    """Reaps re-parented VMM processes until none is left or the deadline passes."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            if time.monotonic() >= deadline:
                return
            time.sleep(0.01)


def wait_for(predicate, timeout=5.0, interval=0.005):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            return value
        time.sleep(interval)


def guest_command(conn, cmd, arg=0, timeout=5.0):
    """Runs a mailbox command in the guest and waits for its ack."""
    ack = conn.req(f"guest {cmd} {arg}")["ack"]
    done = wait_for(lambda: conn.req(f"read64 {ACK}")["value"] > ack, timeout)
    if not done:
        raise VmmError(f"guest command {cmd} not acknowledged")


def counter(conn):
    return conn.req(f"read64 {COUNTER}")["value"]


def is_running(conn, timeout=5.0):
    """The guest loop makes progress (its counter moves)."""
    first = counter(conn)
    return bool(wait_for(lambda: counter(conn) > first, timeout))
