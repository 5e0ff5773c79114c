"""What task options cost when no run needs them (issue 10, "Performance").

The bench's 200,000-submit row (no-op tasks, submit each then result each,
thread runner) and a 1,000,000-item thread map and a 200,000-item process
map, each with the plain function and with the same function as a Task
carrying options that never fire: retries=3 (no run fails), a tag with a
limit no run reaches, and timeout_seconds (a deadline per run on the
engine's timer).  The variants alternate within each round, so the
machine's drift hits them alike; the medians of `--rounds` rounds are
printed, and each variant's ratio to the plain one.

    python benchmarks/options_overhead.py [--rounds 7] [--only submit,map,proc]
        [--baseline /path/to/a/checkout/before/the/options, built in place]

Run it from the repository root (it imports the built tree).  --baseline
also times the plain variant on that build, in a child interpreter per
round ("before": the code before task options existed).
"""

import argparse
import inspect
import os
import statistics
import subprocess
import sys
import time

from taskrunner import ProcessPoolTaskRunner, ThreadPoolTaskRunner, task
from taskrunner.bench import inc

SUBMITS = 200_000
MAP_ITEMS = 1_000_000
PROC_ITEMS = 200_000
WORKERS = 2

VARIANTS = {
    "plain": inc,
    "retries=3": task(inc, retries=3),
    "tag, limit unmet": task(inc, tags=["db"]),
    "timeout_seconds=60": task(inc, timeout_seconds=60),
}


def _with(cls, limits):
    """A runner of `cls`; limits only when given (a build before them takes none)."""
    return cls(max_workers=WORKERS, **({"limits": limits} if limits else {}))


def submits(fn, limits):
    with _with(ThreadPoolTaskRunner, limits) as runner:
        futures = [runner.submit(fn, {"x": i}) for i in range(SUBMITS)]
        return sum(f.result() for f in futures)


def thread_map(fn, limits):
    with _with(ThreadPoolTaskRunner, limits) as runner:
        return sum(runner.map(fn, {"x": range(MAP_ITEMS)}).result())


def process_map(fn, limits):
    with _with(ProcessPoolTaskRunner, limits) as runner:
        runner.map(fn, {"x": range(1000)}).result()     # the workers up first
        start = time.perf_counter()
        total = sum(runner.map(fn, {"x": range(PROC_ITEMS)}).result())
        return total, time.perf_counter() - start


ROWS = {"submit": submits, "map": thread_map, "proc": process_map}


def _timed(measure, fn, limits):
    start = time.perf_counter()
    out = measure(fn, limits)
    elapsed = time.perf_counter() - start
    if isinstance(out, tuple):      # timed inside (the pool's start left out)
        out, elapsed = out
    return elapsed


def baseline_round(checkout, row):
    """One round of the plain variant of `row` on another build."""
    source = "\n".join([
        "import sys, time",
        f"sys.path.insert(0, {checkout!r})",
        "from taskrunner import ProcessPoolTaskRunner, ThreadPoolTaskRunner",
        "from taskrunner.bench import inc",
        f"SUBMITS, MAP_ITEMS, PROC_ITEMS, WORKERS = {SUBMITS}, {MAP_ITEMS}, {PROC_ITEMS}, {WORKERS}",
        inspect.getsource(_with), inspect.getsource(ROWS[row]), inspect.getsource(_timed),
        "if __name__ == '__main__':",
        f"    print(_timed({ROWS[row].__name__}, inc, None))",
    ])
    out = subprocess.run([sys.executable, "-c", source], cwd=checkout, capture_output=True,
                         text=True, check=True, env={**os.environ, "PYTHONPATH": checkout})
    return float(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default="submit,map,proc")
    parser.add_argument("--baseline", help="a checkout of the code before, built in place")
    args = parser.parse_args()
    for row in args.only.split(","):
        measure = ROWS[row]
        times = {name: [] for name in VARIANTS}
        if args.baseline:
            times["before (baseline)"] = []
        for _ in range(args.rounds):
            for name, fn in VARIANTS.items():
                limits = {"db": 10**9} if name.startswith("tag") else None
                times[name].append(_timed(measure, fn, limits))
            if args.baseline:
                times["before (baseline)"].append(baseline_round(args.baseline, row))
        base = statistics.median(times["plain"])
        print(f"{row}: median of {args.rounds} rounds")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:20s} {median * 1e3:9.1f} ms   {median / base:5.2f}x plain")


if __name__ == "__main__":
    main()
