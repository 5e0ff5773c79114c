"""How long a Ctrl-C takes to reach a loop over imap() (issue 14, point 7:
at most 0.2 s), per runner, and in how many tries it was lost.

    python benchmarks/ctrl_c_latency.py TREE ROUNDS

TREE is a checkout with its extensions built in place.  Each round is a
fresh interpreter that enters a runner of 2 workers, starts an imap of 600
runs of 10 ms, and once 8 runs have started sends itself a real SIGINT;
it prints the seconds from the signal to the `except KeyboardInterrupt`
around the loop.  Prints, per runner, the median and the largest latency.
"""

import os
import statistics
import subprocess
import sys
import tempfile

KINDS = ("threadpool", "processpool", "dask")

CHILD = """
import os, signal, sys, threading, time
signal.signal(signal.SIGINT, signal.default_int_handler)

def tick(x, log):
    with open(log, "a") as f:
        f.write(f"{x}\\n")
    time.sleep(0.01)
    return x

def started(log):
    try:
        with open(log) as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0

def make(kind):
    from taskrunner import DaskTaskRunner, ProcessPoolTaskRunner, ThreadPoolTaskRunner
    if kind == "threadpool":
        return ThreadPoolTaskRunner(max_workers=2)
    if kind == "processpool":
        return ProcessPoolTaskRunner(max_workers=2)
    return DaskTaskRunner(cluster_kwargs={"n_workers": 1, "threads_per_worker": 2,
                                          "processes": True, "dashboard_address": None})

if __name__ == "__main__":
    kind, log = sys.argv[2:4]
    sent = []
    def interrupt():
        while started(log) < 8:
            time.sleep(0.002)
        sent.append(time.monotonic())
        os.kill(os.getpid(), signal.SIGINT)
    try:
        with make(kind) as runner:
            threading.Thread(target=interrupt, daemon=True).start()
            try:
                for _ in runner.imap(tick, {"x": range(600), "log": log}):
                    pass
                print("lost")
            except KeyboardInterrupt:
                print(time.monotonic() - sent[0])
                raise
    except KeyboardInterrupt:
        pass
"""


def one_round(tree, kind):
    """The latency of one round, in seconds (None: the Ctrl-C was lost)."""
    with tempfile.TemporaryDirectory() as scratch:
        script = os.path.join(scratch, "child.py")
        with open(script, "w") as f:
            f.write(CHILD)
        out = subprocess.run(
            [sys.executable, script, tree, kind, os.path.join(scratch, "log")],
            env=dict(os.environ, PYTHONPATH=tree), capture_output=True, text=True,
            timeout=300, check=True).stdout.split()
    return None if out[0] == "lost" else float(out[0])


def main():
    tree, rounds = os.path.abspath(sys.argv[1]), int(sys.argv[2])
    for kind in KINDS:
        latencies = [one_round(tree, kind) for _ in range(rounds)]
        caught = [t for t in latencies if t is not None]
        print(f"{kind}: median {statistics.median(caught) * 1000:.1f} ms, "
              f"max {max(caught) * 1000:.1f} ms, lost {len(latencies) - len(caught)} "
              f"of {rounds}")


if __name__ == "__main__":
    main()
