"""clade's persistent Python interpreter (runs inside the guest).

The host starts it once per sandbox and sends one JSON request per line on
stdin: {"id": n, "nonce": "...", "code": "..."} runs code in one persistent
namespace; {"id": n, "nonce": "...", "reseed": "<hex>"} reseeds `random` and
`numpy.random` and freezes the inherited heap in both processes (sent to every
fork's child, and to every sandbox started from a snapshot, before any code runs
there). User output goes to stdout/stderr as it is produced. Each request ends
with one line on stdout:
    \\x1eclade:<nonce>:<json>\\n
where json is {"id", "value"?, "error"?: {"name", "value", "traceback"}}, and
one line on stderr, \\x1eclade:<nonce>:end\\n, so the host knows it has all
of the request's output on both streams.

Two processes, so that user code cannot forge those lines:

- The supervisor (this process, as started) reads the requests, holds the
  nonces, and is the only writer of the host's stdout and stderr. It never
  runs user code.
- The worker, forked from it at start-up before any request has been read,
  runs user code. Its stdout and stderr are pipes to the supervisor, which
  forwards what they carry; its stdin is /dev/null. It learns each request as
  {"tag", "code" | "reseed"} (a fresh random tag, no nonce), writes the line
  \\x1e<tag>\\n to both pipes before running it, and reports "done <tag> <json>"
  on a private pipe after (or "fatal <message>" if it cannot start).

User code can read the worker's memory but not the supervisor's: the
supervisor is not dumpable, and the worker drops the capabilities that let
root read another process's memory or descriptors (CAP_SYS_PTRACE) or all of
memory (modules, raw I/O, BPF, perf, CAP_SYS_ADMIN) before any user code runs.
What user code can do is write to the private pipe: with its own request's tag
(which it can find) it can end that request early. A stream's output is only
passed on after that request's start line, which code from earlier requests
cannot know, so code that keeps running after a forged "done" cannot put
output into the next request; a report with any other tag is ignored.
"""
import ctypes
import gc
import json
import os
import select
import signal
import sys

# Imported before the worker is forked so both processes share these pages.
import ast
import random
import traceback

READ_CHUNK = 65536
MAX_CONTROL_LINE = 64 << 20  # a "done" line: the result fields are capped far below this
# Characters kept of a result's value and of an error's text and traceback (JSON escapes can take
# 12 bytes a character, so the host's 32 MiB limit on a result line is never reached).
MAX_VALUE = 1 << 20
MAX_ERROR_TEXT = 1 << 18

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
_LINUX_CAPABILITY_VERSION_3 = 0x20080522
# Capabilities that would let root in the worker read the supervisor's memory or descriptors:
# CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_PTRACE, CAP_SYS_ADMIN, CAP_SYS_BOOT (kexec),
# CAP_PERFMON, CAP_BPF, CAP_CHECKPOINT_RESTORE.
WORKER_DROPS = (16, 17, 19, 21, 22, 38, 39, 40)

libc = ctypes.CDLL(None, use_errno=True)


def check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, "%s: %s" % (what, os.strerror(err)))


# ---- worker ----


class CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities():
    """Out of the bounding set (so no exec regains them) and out of this process's sets."""
    for cap in WORKER_DROPS:
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0 and ctypes.get_errno() != 22:  # EINVAL: unknown to this kernel
            check(-1, "dropping capability %d" % cap)
    hdr = CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (CapData * 2)()
    check(libc.capget(ctypes.byref(hdr), data), "capget")
    for cap in WORKER_DROPS:
        keep = ~(1 << (cap % 32)) & 0xFFFFFFFF
        d = data[cap // 32]
        d.effective &= keep
        d.permitted &= keep
        d.inheritable &= keep
    check(libc.capset(ctypes.byref(hdr), data), "capset")


def clip(text, limit):
    if len(text) <= limit:
        return text
    return text[:limit] + "\n[clade: %d more characters left out]" % (len(text) - limit)


def describe(exc):
    tb = exc.__traceback__
    while tb is not None and tb.tb_frame.f_code.co_filename != "<code>":
        tb = tb.tb_next  # the interpreter's own frames are not the user's business
    try:
        value = str(exc)
        text = "".join(traceback.format_exception(type(exc), exc, tb))
    except BaseException:  # an exception whose __str__ fails
        value = "<exception str() failed>"
        text = type(exc).__name__ + "\n"
    return {"name": type(exc).__name__, "value": clip(value, MAX_ERROR_TEXT), "traceback": clip(text, MAX_ERROR_TEXT)}


class Worker:
    def __init__(self, requests, control):
        self.requests = requests
        self.control = control
        self.namespace = {"__name__": "__main__", "__builtins__": __builtins__}

    def report(self, line):
        data = line.encode()
        while data:
            data = data[os.write(self.control, data):]

    def finish(self, tag, **result):
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # user code may have closed or replaced it
                pass
        self.report("done %s %s\n" % (tag, json.dumps(result)))

    def run_code(self, tag, code):
        namespace = self.namespace
        try:
            tree = ast.parse(code, "<code>", "exec")
            last = None
            if tree.body and isinstance(tree.body[-1], ast.Expr):
                last = ast.Expression(tree.body.pop().value)
            exec(compile(tree, "<code>", "exec"), namespace)
            value = None
            if last is not None:
                result = eval(compile(last, "<code>", "eval"), namespace)
                if result is not None:
                    value = clip(repr(result), MAX_VALUE)
                    namespace["_"] = result
            self.finish(tag, value=value)
        except BaseException as exc:  # the user's code may raise anything, SystemExit included
            self.finish(tag, error=describe(exc))

    def reseed(self, tag, hexseed):
        # A reseed is the first thing a fork's child does. Everything it inherited is kept out of the
        # collector's reach from now on: a full collection would otherwise write the header of every
        # object of the warm heap, copying each of its pages into this child (measured: a 200,000-entry
        # dict cost a child ~29 MiB at its first allocating request). gc.freeze() only splices lists:
        # it writes a few objects, not the heap. The cost: cyclic garbage among inherited objects is
        # never collected in this child.
        gc.freeze()
        seed = int(hexseed, 16)
        random.seed(seed)
        numpy = sys.modules.get("numpy")
        if numpy is not None:
            numpy.random.seed(seed % (2**32))
        self.finish(tag, value=None)

    def serve(self):
        for line in self.requests:
            req = json.loads(line)
            tag = req["tag"]
            start = ("\x1e%s\n" % tag).encode()
            for fd in (1, 2):
                try:
                    os.write(fd, start)  # what the supervisor got on this stream before it is not ours
                except OSError:
                    pass  # user code closed or moved the stream: its output does not reach the host anyway
            if "reseed" in req:
                self.reseed(tag, req["reseed"])
            else:
                self.run_code(tag, req.get("code", ""))


def worker_main(supervisor, requests_fd, control_fd, out_fd, err_fd):
    # Nothing of the supervisor's stays open here: its stdin carries the nonces.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    keep = {0, 1, 2, requests_fd, control_fd}
    for fd in [int(n) for n in os.listdir("/proc/self/fd")]:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass  # the directory listing's own descriptor
    # Die with the supervisor (the host kills the process group on a timeout; user code may leave it).
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != supervisor:
        os._exit(1)
    drop_capabilities()
    # Ordinary dumpability again (inherited off from the supervisor), e.g. for debuggers of user code.
    check(libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    sys.stdin = open(os.devnull)
    # What exists now is never garbage: keep the collector off it, so pages stay shared with
    # the supervisor and, after a VM fork, between sibling sandboxes.
    gc.freeze()
    Worker(os.fdopen(requests_fd, "rb"), control_fd).serve()


# ---- supervisor ----


class Lines:
    """Splits a byte stream into lines, scanning each byte once; lines over `limit` are dropped."""

    def __init__(self, limit):
        self.buf = bytearray()
        self.scanned = 0
        self.limit = limit
        self.skipping = False

    def feed(self, data):
        self.buf += data
        out = []
        while True:
            nl = self.buf.find(b"\n", self.scanned)
            if nl < 0:
                self.scanned = len(self.buf)
                if len(self.buf) > self.limit:
                    self.buf.clear()
                    self.scanned = 0
                    self.skipping = True
                return out
            line = bytes(self.buf[:nl])
            del self.buf[: nl + 1]
            self.scanned = 0
            if self.skipping:
                self.skipping = False
            else:
                out.append(line)


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def result_json(host_id, raw):
    """The worker's report, re-encoded under the host's request id with only the known fields."""
    try:
        result = json.loads(raw)
        value, error = result.get("value"), result.get("error")
        if value is not None and not isinstance(value, str):
            raise ValueError
        if error is not None:
            error = {k: error[k] for k in ("name", "value", "traceback")}
            if not all(isinstance(v, str) for v in error.values()):
                raise ValueError
    except (ValueError, TypeError, KeyError, AttributeError):
        value = None
        error = {"name": "InterpreterError", "value": "the interpreter reported a malformed result", "traceback": ""}
    out = {"id": host_id, "value": value}
    if error is not None:
        out["error"] = error
    return json.dumps(out)


class Stream:
    """One of the worker's output pipes and the host stream it feeds."""

    def __init__(self, fd, target):
        self.fd = fd
        self.target = target
        self.live = False  # the current request's start line has been seen: pass output on
        self.tail = b""  # while not live: the last bytes, which may hold the start of that line


class Supervisor:
    def __init__(self, worker, requests_fd, control_fd, out_fd, err_fd):
        self.worker = worker
        self.requests_fd = requests_fd
        self.control_fd = control_fd
        self.streams = {out_fd: Stream(out_fd, 1), err_fd: Stream(err_fd, 2)}
        self.pidfd = os.pidfd_open(worker)
        self.stdin_lines = Lines(1 << 40)  # the host is trusted; requests may be large
        self.control_lines = Lines(MAX_CONTROL_LINE)
        self.queue = []  # host requests not yet given to the worker
        self.current = None  # {"id", "nonce", "tag", "start"}
        self.pending = bytearray()  # bytes for the worker's request pipe it has not taken yet
        self.writing = False  # the request pipe is polled for room
        self.stdin_open = True
        self.fatal = None  # why the worker could not start, if it could not
        self.poll = select.poll()
        for fd in (0, control_fd, out_fd, err_fd, self.pidfd):
            self.poll.register(fd, select.POLLIN)
        for fd in self.streams:
            os.set_blocking(fd, False)
        os.set_blocking(requests_fd, False)

    def forward(self, st):
        """Passes on what the worker wrote for the current request and drops the rest; False once
        nothing is left to read."""
        try:
            data = os.read(st.fd, READ_CHUNK)
        except BlockingIOError:
            return False
        if not data:
            self.poll.unregister(st.fd)
            del self.streams[st.fd]
            return False
        cur = self.current
        if cur is None:
            return True
        if not st.live:
            data = st.tail + data
            at = data.find(cur["start"])
            if at < 0:
                st.tail = data[-(len(cur["start"]) - 1):]
                return True
            st.live = True
            st.tail = b""
            data = data[at + len(cur["start"]):]
        if data:
            write_all(st.target, data)
        return True

    def drain_output(self):
        """Takes all the worker wrote before its latest report: it is in the pipes by now."""
        for st in list(self.streams.values()):
            while self.forward(st):
                pass

    def push_requests(self):
        try:
            while self.pending:
                del self.pending[: os.write(self.requests_fd, self.pending)]
        except BlockingIOError:
            pass
        except BrokenPipeError:
            self.pending.clear()  # the worker is gone; its pidfd says so next
        if bool(self.pending) != self.writing:
            self.writing = bool(self.pending)
            if self.writing:
                self.poll.register(self.requests_fd, select.POLLOUT)
            else:
                self.poll.unregister(self.requests_fd)

    def next_request(self):
        if self.current is not None or not self.queue:
            return
        req = self.queue.pop(0)
        tag = os.urandom(16).hex()
        start = ("\x1e%s\n" % tag).encode()
        self.current = {"id": req.get("id"), "nonce": str(req.get("nonce", "")), "tag": tag, "start": start}
        for st in self.streams.values():
            st.live = False
            st.tail = b""
        if "reseed" in req:
            msg = {"tag": tag, "reseed": str(req["reseed"])}
        else:
            msg = {"tag": tag, "code": str(req.get("code", ""))}
        self.pending += json.dumps(msg).encode() + b"\n"
        self.push_requests()

    def on_stdin(self):
        data = os.read(0, READ_CHUNK)
        if not data:
            self.stdin_open = False
            self.poll.unregister(0)
            return
        for line in self.stdin_lines.feed(data):
            try:
                req = json.loads(line)
            except ValueError:
                continue
            if isinstance(req, dict):
                if "reseed" in req:
                    gc.freeze()  # this process is a fork's child too: keep the collector off what it inherited
                self.queue.append(req)
        self.next_request()

    def on_control(self):
        data = os.read(self.control_fd, READ_CHUNK)
        if not data:
            self.poll.unregister(self.control_fd)
            self.control_fd = None
            return
        for line in self.control_lines.feed(data):
            kind, _, rest = line.partition(b" ")
            if kind == b"fatal" and self.fatal is None:
                self.fatal = rest.decode(errors="replace")
                continue
            tag, _, payload = rest.partition(b" ")
            cur = self.current
            if kind != b"done" or cur is None or tag.decode(errors="replace") != cur["tag"]:
                continue  # about a request that is over, or made up
            self.drain_output()
            self.answer(result_json(cur["id"], payload))
            self.next_request()

    def answer(self, result):
        """Ends the current request: its stderr marker, then its stdout marker with the result."""
        nonce = self.current["nonce"]
        self.current = None
        write_all(2, ("\x1eclade:%s:end\n" % nonce).encode())
        write_all(1, ("\x1eclade:%s:%s\n" % (nonce, result)).encode())

    def serve(self):
        while True:
            if not self.stdin_open and self.current is None and not self.queue and self.requests_fd is not None:
                if self.writing:
                    self.poll.unregister(self.requests_fd)
                os.close(self.requests_fd)  # the worker ends at EOF, and so does this process
                self.requests_fd = None
            for fd, _ in self.poll.poll():
                if fd == 0:
                    self.on_stdin()
                elif fd == self.control_fd:
                    self.on_control()
                elif fd in self.streams:
                    self.forward(self.streams[fd])
                elif fd == self.requests_fd:
                    self.push_requests()
                elif fd == self.pidfd:
                    return self.worker_exited()

    def worker_exited(self):
        """The worker is gone, and with it the interpreter's state: pass on its last output and end too."""
        while self.control_fd is not None and select.select([self.control_fd], [], [], 0)[0]:
            self.on_control()
        self.drain_output()
        _, status = os.waitpid(self.worker, 0)
        code = os.waitstatus_to_exitcode(status)
        if self.fatal is not None:
            self.refuse()
        return code if code >= 0 else 128 - code

    def refuse(self):
        """The worker could not start: the first request gets the reason as its error (a runCode
        after it starts a new interpreter), rather than only seeing the process end."""
        while self.current is None and not self.queue and self.stdin_open:
            if select.select([0], [], [], 30)[0]:
                self.on_stdin()
            else:
                return
        if self.current is None and self.queue:
            req = self.queue.pop(0)
            self.current = {"id": req.get("id"), "nonce": str(req.get("nonce", ""))}
        if self.current is not None:
            error = {"name": "InterpreterError", "value": "the Python interpreter could not start: " + self.fatal, "traceback": ""}
            self.answer(json.dumps({"id": self.current["id"], "value": None, "error": error}))


def main():
    # Before any request is read: the worker must never have a nonce in its copy of memory.
    check(libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0), "prctl(PR_SET_DUMPABLE)")
    requests_r, requests_w = os.pipe()
    control_r, control_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            worker_main(supervisor, requests_r, control_w, out_w, err_w)
        except BaseException as exc:  # set-up failed (serve() itself only ends at EOF): say why
            os.write(control_w, ("fatal %s: %s\n" % (type(exc).__name__, exc)).encode(errors="replace"))
            code = 1
        os._exit(code)
    for fd in (requests_r, control_w, out_w, err_w):
        os.close(fd)
    supervisor = Supervisor(pid, requests_w, control_r, out_r, err_r)
    gc.freeze()  # as in the worker: what start-up made is never garbage, and stays shared after a VM fork
    sys.exit(supervisor.serve())


if __name__ == "__main__":
    main()
