"""The first map of a new process pool: its workers' start included.

    python benchmarks/cold_proc_map.py ROUNDS

The bench's proc-map row times a started pool (spawned workers, both
sides).  A program that makes a pool for one map also waits for its
workers to start, and the start method then decides more than the map:
ProcessPoolTaskRunner spawns by default, multiprocessing.Pool() on Linux
before Python 3.14 forks.  Each round times, in turn, the first
map(square) over range(1,000,000) of a new ProcessPoolTaskRunner (spawn,
then fork) and of a new multiprocessing.Pool (spawn, then the default
context), 2 workers each, from the pool's creation to the sum of the
results.  Prints the median of each.
"""

import multiprocessing
import statistics
import sys
import time

from taskrunner import ProcessPoolTaskRunner
from taskrunner.bench import square

ITEMS = 1_000_000
WORKERS = 2


def ours(method):
    start = time.perf_counter()
    with ProcessPoolTaskRunner(max_workers=WORKERS, mp_context=method) as runner:
        sum(runner.map(square, {"x": range(ITEMS)}).result())
        return time.perf_counter() - start


def pool(method):
    start = time.perf_counter()
    with multiprocessing.get_context(method).Pool(WORKERS) as workers:
        sum(workers.map(square, range(ITEMS)))
        return time.perf_counter() - start


VARIANTS = {
    "taskrunner (spawn, its default)": lambda: ours("spawn"),
    "taskrunner, mp_context='fork'": lambda: ours("fork"),
    "multiprocessing.Pool (spawn)": lambda: pool("spawn"),
    "multiprocessing.Pool (default: "
    f"{multiprocessing.get_start_method()})": lambda: pool(None),
}


def main():
    times = {name: [] for name in VARIANTS}
    for _ in range(int(sys.argv[1])):
        for name, variant in VARIANTS.items():
            times[name].append(variant())
    for name, samples in times.items():
        print(f"{name}: {statistics.median(samples) * 1000:.0f} ms "
              f"(rounds: {[round(s * 1000) for s in samples]})")


if __name__ == "__main__":
    main()
