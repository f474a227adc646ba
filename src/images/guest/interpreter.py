"""clade's persistent Python interpreter (runs inside the guest).

The host starts it once per sandbox and sends one JSON request per line on
stdin: {"id": n, "nonce": "...", "code": "..."} runs code in one persistent
namespace; {"id": n, "nonce": "...", "reseed": "<hex>"} reseeds `random` and
`numpy.random` (sent after every fork). User output goes to stdout/stderr as it
is produced. Each request ends with one line on stdout:
    \\x1eclade:<nonce>:<json>\\n
where json is {"id", "value"?, "error"?: {"name", "value", "traceback"}}, and
one line on stderr, \\x1eclade:<nonce>:end\\n, so the host knows it has all
of the request's output on both streams.
"""
import ast
import json
import random
import sys
import traceback

namespace = {"__name__": "__main__", "__builtins__": __builtins__}


def finish(req, **result):
    sys.stdout.flush()
    sys.stderr.flush()
    payload = json.dumps({"id": req.get("id"), **result})
    nonce = req.get("nonce", "")
    sys.__stderr__.write("\x1eclade:%s:end\n" % nonce)
    sys.__stderr__.flush()
    sys.__stdout__.write("\x1eclade:%s:%s\n" % (nonce, payload))
    sys.__stdout__.flush()


def run_code(req):
    code = req.get("code", "")
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
                value = repr(result)
                namespace["_"] = result
        finish(req, value=value)
    except BaseException as exc:  # the user's code may raise anything, SystemExit included
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        finish(req, error={"name": type(exc).__name__, "value": str(exc), "traceback": "".join(tb)})


def reseed(req):
    seed = int(req["reseed"], 16)
    random.seed(seed)
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(seed % (2**32))
    finish(req, value=None)


def main():
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            req = json.loads(line)
        except ValueError:
            continue
        if "reseed" in req:
            reseed(req)
        else:
            run_code(req)


if __name__ == "__main__":
    main()
