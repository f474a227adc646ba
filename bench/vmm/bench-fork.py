#!/usr/bin/env python3
"""Fork benchmark for clade-vmm on this host's /dev/kvm, with the CPL3 test guest.

Measures, over repeated runs, as median and p90:
  - parent pause: from the fork request's stop signal to the parent vCPU resumed
    (split into park, state capture and fork(2));
  - child: fork(2) to new VM built, to state restored, to the child's first
    KVM_RUN, and to its first guest exit (the guest has run code);
  - 100 children from one request: until the reply (all forked) and until the
    last child's first guest exit, measured from the request on CLOCK_MONOTONIC,
    and the parent's pause against a single fork's (one fork(2) of a spawner,
    whatever the count: the ratio should stay near 1).
Prints a table and writes JSON (--out). Every VMM process is cleaned up.

--runner measures the pauses inside the runner VM instead (for hosts whose
/dev/kvm cannot run guests, or has none): `forks 1` against `forks N` with
build/vmm-agent's forkbench, through `clade runner run`. Everything there is
emulated, so only the ratio carries over.
"""
import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(ROOT, "native", "vmm", "test"))
sys.dont_write_bytecode = True  # keep the source tree clean
import vmmctl  # noqa: E402


def percentile(values, p):
    ordered = sorted(values)
    k = (len(ordered) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(values):
    return {"median": statistics.median(values), "p90": percentile(values, 90), "min": min(values),
            "max": max(values), "n": len(values)}


def single_forks(fleet, root, runs):
    samples = {k: [] for k in ("pause_us", "park_us", "capture_us", "fork_us", "child_built_us",
                               "child_restored_us", "child_first_run_us", "child_first_exit_us")}
    for _ in range(runs):
        reply = fleet.fork(root)
        child = fleet.connect(reply["socket"])
        timing = vmmctl.wait_for(lambda: child.req("status")["timing"] if child.req("status")["timing"]["firstExitNs"] else None, 5)
        if not timing:
            raise vmmctl.VmmError("child never reached the guest")
        for key, field in (("pause_us", "pauseUs"), ("park_us", "parkUs"), ("capture_us", "captureUs"), ("fork_us", "forkUs")):
            samples[key].append(reply[field])
        zero = timing["forkNs"]
        for key, field in (("child_built_us", "builtNs"), ("child_restored_us", "restoredNs"),
                           ("child_first_run_us", "firstRunNs"), ("child_first_exit_us", "firstExitNs")):
            samples[key].append((timing[field] - zero) / 1e3)
        child.req("quit")
        time.sleep(0.02)  # let the child's teardown finish before the next sample
    return samples


def hundred_children(fleet, root, runs, count):
    samples = {"reply_ms": [], "last_child_in_guest_ms": [], "parent_pause_ms": [], "spawn_ms": []}
    for _ in range(runs):
        t0 = time.monotonic_ns()
        reply = fleet.forks(root, count)
        samples["reply_ms"].append((time.monotonic_ns() - t0) / 1e6)
        samples["parent_pause_ms"].append(reply["pauseUs"] / 1e3)
        samples["spawn_ms"].append(reply["spawnUs"] / 1e3)
        conns = [fleet.connect(c["socket"]) for c in reply["children"]]
        firsts = [vmmctl.wait_for(lambda c=c: c.req("status")["timing"]["firstExitNs"], 10) for c in conns]
        if not all(firsts) or len(firsts) != count:
            raise vmmctl.VmmError("not every child reached the guest")
        samples["last_child_in_guest_ms"].append((max(firsts) - t0) / 1e6)
        for c in conns:
            c.req("quit")
        vmmctl.wait_for(lambda: not [c for c in reply["children"] if vmmctl.pid_exists(c["pid"])], 10)
        time.sleep(0.2)
    return samples


def print_table(title, stats, unit):
    print(f"\n{title}")
    print(f"  {'metric':<26}{'median':>10}{'p90':>10}{'min':>10}{'max':>10}  ({unit}, n={next(iter(stats.values()))['n']})")
    for name, s in stats.items():
        print(f"  {name:<26}{s['median']:>10.1f}{s['p90']:>10.1f}{s['min']:>10.1f}{s['max']:>10.1f}")


FORKBENCH_LINE = re.compile(r"forkbench run=(\d+) forks=(\d+) pause_us=([\d.]+) spawn_us=(-?[\d.]+) reply_ms=([\d.]+) "
                            r"all_answered_ms=([\d.]+) children=(\d+) answered=(\d+)")


def in_runner(args):
    """The pause of `forks 1` against `forks N` on the CPL3 test guest inside the runner VM."""
    build = os.path.join(ROOT, "native", "vmm", "build")
    script = ("mkdir -p /tmp/b && /opt/vmm/clade-vmm run --socket /tmp/b/root.sock --mem-mib 64 --idle-us 100000 > /tmp/b/root.out 2>&1 & "
              "sleep 1; /opt/vmm/vmm-agent forkbench /tmp/b/root.sock %d %d; /opt/vmm/vmm-agent ctl /tmp/b/root.sock quit > /dev/null"
              % (args.children, args.batch_runs))
    cmd = ["node", os.path.join(ROOT, "bin", "clade.js"), "runner", "run", "--timeout", "3600000",
           "--carry", f"{build}/clade-vmm:/opt/vmm/clade-vmm", "--carry", f"{build}/vmm-agent:/opt/vmm/vmm-agent", "--", "sh", "-c", script]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT).stdout
    samples = {1: {"pause_us": [], "reply_ms": []}, args.children: {"pause_us": [], "spawn_ms": [], "reply_ms": [], "all_answered_ms": []}}
    for m in FORKBENCH_LINE.finditer(out):
        n, pause, spawn, reply, answered = int(m[2]), float(m[3]), float(m[4]), float(m[5]), float(m[6])
        if int(m[8]) != n:
            raise SystemExit(f"not every child answered: {m[0]}")
        samples[n]["pause_us"].append(pause)
        samples[n]["reply_ms"].append(reply)
        if n > 1:
            samples[n]["spawn_ms"].append(spawn / 1e3)
            samples[n]["all_answered_ms"].append(answered)
    if not samples[1]["pause_us"] or not samples[args.children]["pause_us"]:
        raise SystemExit("the runner run gave no samples; its output:\n" + out[-3000:])
    one = {k: summary(v) for k, v in samples[1].items()}
    many = {k: summary(v) for k, v in samples[args.children].items()}
    print_table("inside the runner: forks 1", one, "us / ms")
    print_table(f"inside the runner: forks {args.children}", many, "us / ms")
    ratio = many["pause_us"]["median"] / one["pause_us"]["median"]
    print(f"\nparent pause, forks {args.children} / forks 1 (medians): {ratio:.2f} (target: at most 1.5)")
    result = {"where": "inside the runner VM (QEMU TCG, nested SVM, 1 vCPU): absolute times are emulated",
              "host": platform.node(), "loadavg": os.getloadavg(), "forks1": one, f"forks{args.children}": many,
              "pauseRatio": ratio, "children": args.children}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=30, help="single-fork samples")
    ap.add_argument("--batch-runs", type=int, default=5, help="100-children samples")
    ap.add_argument("--children", type=int, default=100)
    ap.add_argument("--runner", action="store_true", help="measure the pauses inside the runner VM (this host's /dev/kvm is not used)")
    ap.add_argument("--out", default=None, help="JSON results (default bench/vmm/fork-results.json, or fork-results-runner.json with --runner)")
    args = ap.parse_args()
    if args.out is None:
        args.out = os.path.join(ROOT, "bench", "vmm", "fork-results-runner.json" if args.runner else "fork-results.json")
    if args.runner:
        return in_runner(args)
    if not os.path.exists("/dev/kvm"):
        print("SKIP: no /dev/kvm (--runner measures inside the runner VM instead)")
        return 0
    fleet = vmmctl.Fleet()
    try:
        root, info = fleet.start_root()
        time.sleep(0.05)
        single = {k: summary(v) for k, v in single_forks(fleet, root, args.runs).items()}
        batch = {k: summary(v) for k, v in hundred_children(fleet, root, args.batch_runs, args.children).items()}
        root.req("quit")
    finally:
        fleet.close()
    print_table("single fork (parent pause, child start)", single, "us")
    print_table(f"{args.children} children from one request", batch, "ms")
    ratio = batch["parent_pause_ms"]["median"] * 1e3 / single["pause_us"]["median"]
    print(f"\nparent pause, forks {args.children} / forks 1 (medians): {ratio:.2f} (target: at most 1.5)")
    result = {"host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
              "loadavg": os.getloadavg(), "vmm": {k: info[k] for k in info if k not in ("socket", "pid", "ready")},
              "singleForkUs": single, "childrenMs": batch, "children": args.children, "pauseRatio": ratio}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
