"""Where proc-map's time goes: wall time, the parent's CPU and the workers'
CPU around each map of 1,000,000 items, ours and multiprocessing.Pool.map's,
alternating in one process (medians of ROUNDS maps each).

    python benchmarks/proc_map_cpu.py TREE ROUNDS

TREE is a checkout with its extensions built in place; it is imported
first.  The workers' CPU is read from /proc (Linux only).
"""

import multiprocessing
import os
import resource
import statistics
import sys
import time

SIZE = 1_000_000
TICKS = os.sysconf("SC_CLK_TCK")


def children_cpu():
    """CPU seconds used so far by this process's children (the workers)."""
    me, total = os.getpid(), 0.0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def parent_cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def measure(fn):
    """(wall, parent CPU, workers' CPU) seconds of one call of fn."""
    workers, parent, start = children_cpu(), parent_cpu(), time.perf_counter()
    fn()
    wall = time.perf_counter() - start
    return wall, parent_cpu() - parent, children_cpu() - workers


def main():
    sys.path.insert(0, os.path.abspath(sys.argv[1]))
    from taskrunner import ProcessPoolTaskRunner
    from taskrunner.bench import pause, square

    rounds = int(sys.argv[2])
    ours, pool = [], []
    with ProcessPoolTaskRunner(max_workers=2) as runner, \
            multiprocessing.get_context("spawn").Pool(2) as peer:
        runner.map(pause, {"x": range(8)}).result()     # every worker up
        peer.map(square, range(1000))
        for _ in range(rounds):
            ours.append(measure(lambda: sum(runner.map(square, {"x": range(SIZE)}).result())))
            pool.append(measure(lambda: sum(peer.map(square, range(SIZE)))))
    for name, samples in (("ours", ours), ("Pool.map", pool)):
        wall, parent, workers = (1000 * statistics.median(s[i] for s in samples) for i in range(3))
        print(f"{name}: wall {wall:.0f} ms, parent CPU {parent:.0f} ms, workers' CPU {workers:.0f} ms")


if __name__ == "__main__":
    main()
