"""What the run trace costs: the bench's "submit" row (200,000 no-op
submits, then result() of each, ThreadPoolTaskRunner, 6 threads; see
taskrunner/bench.py, submit_ours) with trace off and on, the trace file in
a temporary directory; the exit, which writes the file, is timed.  Rounds
alternate off and on, after an untimed warm-up of each; medians of
--repeat rounds.

    python benchmarks/trace_overhead.py [--repeat 5] [--size 200000]
        [--baseline /path/to/a/checkout/of/main]

--baseline also times the same job on another build (a worktree of main
built in place), in a child interpreter per round: the code before the
run trace, for "off costs nothing".
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from taskrunner import ThreadPoolTaskRunner
from taskrunner.bench import inc

WORKERS = 6


def submits(n, trace=None):
    """Seconds for the submit row's job (the exit included)."""
    start = time.perf_counter()
    with ThreadPoolTaskRunner(max_workers=WORKERS, trace=trace) as runner:
        futures = [runner.submit(inc, {"x": i}) for i in range(n)]
        assert sum(f.result() for f in futures) == n * (n + 1) // 2
    return time.perf_counter() - start


_CHILD = """
import json, os, sys, time
import taskrunner._engine
from taskrunner import ThreadPoolTaskRunner
from taskrunner.bench import inc
assert taskrunner._engine.__file__.startswith(os.getcwd()), taskrunner._engine.__file__
n = int(sys.argv[1])
def once():
    start = time.perf_counter()
    with ThreadPoolTaskRunner(max_workers=6) as runner:
        futures = [runner.submit(inc, {"x": i}) for i in range(n)]
        assert sum(f.result() for f in futures) == n * (n + 1) // 2
    return time.perf_counter() - start
once()
print(json.dumps(once()))
"""


def baseline_round(checkout, n):
    """One timed run (after a warm-up) on the build in `checkout`."""
    out = subprocess.run([sys.executable, "-c", _CHILD, str(n)], cwd=checkout, check=True,
                         capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": checkout}).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--size", type=int, default=200_000)
    parser.add_argument("--baseline", help="a checkout of the code before, built in place")
    args = parser.parse_args(argv)
    n = args.size
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "run.json")
        submits(n)
        submits(n, path)
        off, on, before = [], [], []
        for _ in range(args.repeat):
            off.append(submits(n))
            on.append(submits(n, path))
            if args.baseline:
                before.append(baseline_round(args.baseline, n))
        size = os.path.getsize(path)

    def line(name, times):
        median = statistics.median(times)
        return (f"{name:<22} median {median * 1000:7.1f} ms  {n / median / 1000:6.0f}k runs/s  "
                f"(min {min(times) * 1000:.1f}, max {max(times) * 1000:.1f} ms)")

    print(f"{n:,} submits, ThreadPoolTaskRunner({WORKERS}), medians of {args.repeat} rounds, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    if before:
        print(line("before (baseline)", before))
    print(line("trace off", off))
    print(line("trace on", on))
    print(f"on/off time {statistics.median(on) / statistics.median(off):.2f}x "
          f"(target <= 2x: throughput at least half)"
          + (f"; off/before {statistics.median(off) / statistics.median(before):.2f}x"
             if before else ""))
    print(f"trace file {size / 1e6:.1f} MB, {size / n:.0f} B a run")


if __name__ == "__main__":
    main()
