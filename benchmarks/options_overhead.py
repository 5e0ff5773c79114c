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

Run it from the repository root (it imports the built tree).
"""

import argparse
import statistics
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


def submits(fn, limits):
    with ThreadPoolTaskRunner(max_workers=WORKERS, limits=limits) as runner:
        futures = [runner.submit(fn, {"x": i}) for i in range(SUBMITS)]
        return sum(f.result() for f in futures)


def thread_map(fn, limits):
    with ThreadPoolTaskRunner(max_workers=WORKERS, limits=limits) as runner:
        return sum(runner.map(fn, {"x": range(MAP_ITEMS)}).result())


def process_map(fn, limits):
    with ProcessPoolTaskRunner(max_workers=WORKERS, limits=limits) as runner:
        runner.map(fn, {"x": range(1000)}).result()     # the workers up first
        start = time.perf_counter()
        total = sum(runner.map(fn, {"x": range(PROC_ITEMS)}).result())
        return total, time.perf_counter() - start


ROWS = {"submit": submits, "map": thread_map, "proc": process_map}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default="submit,map,proc")
    args = parser.parse_args()
    for row in args.only.split(","):
        measure = ROWS[row]
        times = {name: [] for name in VARIANTS}
        for _ in range(args.rounds):
            for name, fn in VARIANTS.items():
                limits = {"db": 10**9} if name.startswith("tag") else None
                start = time.perf_counter()
                out = measure(fn, limits)
                elapsed = time.perf_counter() - start
                if isinstance(out, tuple):      # timed inside (the pool's start left out)
                    out, elapsed = out
                times[name].append(elapsed)
        base = statistics.median(times["plain"])
        print(f"{row}: median of {args.rounds} rounds")
        for name, values in times.items():
            median = statistics.median(values)
            print(f"  {name:20s} {median * 1e3:9.1f} ms   {median / base:5.2f}x plain")


if __name__ == "__main__":
    main()
