"""What one process map of 1,000,000 `square` costs, beyond its wall time:
the parent's CPU by thread, the workers' CPU and every process's page
faults, in a started pool (Linux: read from /proc).

    python benchmarks/proc_map_costs.py ROUNDS MAPS [TREE ...]

Each round runs, for taskrunner from each TREE in turn (a checkout with
its extensions built in place; none: the installed one) and then for
multiprocessing.Pool, a fresh interpreter that starts a 2-worker pool,
warms it up, and times MAPS maps.  Prints, per variant, the medians over
the rounds of: the wall time per map, the parent's CPU per map (all its
threads: getrusage) and by thread (/proc, 10 ms ticks), the workers' CPU
per map, and the minor page faults per map of the parent and of each
worker.  CPU and faults are much steadier than wall time on a machine
shared with others: the A/B of a change that saves work shows there first.
"""

import os
import statistics
import sys

from _ab import run_in_tree

ITEMS = 1_000_000

ROUND = """
import os, resource, statistics, sys, time
sys.path.insert(0, {here!r})
from proc_cpu_parent import thread_cpu
from taskrunner.bench import square
ITEMS, MAPS, KIND = {items}, {maps}, {kind!r}

def proc_stat(pid):
    with open(f"/proc/{{pid}}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return int(fields[7]), (int(fields[11]) + int(fields[12])) / ticks   # minflt, CPU s

def measure(run_map, workers):
    run_map(10_000)
    pids = [os.getpid()] + workers()
    before, usage, threads = [proc_stat(p) for p in pids], resource.getrusage(0), thread_cpu()
    walls = []
    for _ in range(MAPS):
        start = time.perf_counter()
        run_map(ITEMS)
        walls.append(time.perf_counter() - start)
    after, usage2, threads2 = [proc_stat(p) for p in pids], resource.getrusage(0), thread_cpu()
    parent = (usage2.ru_utime + usage2.ru_stime - usage.ru_utime - usage.ru_stime) / MAPS
    workers_cpu = sum(a[1] - b[1] for a, b in zip(after[1:], before[1:])) / MAPS
    faults = [(a[0] - b[0]) // MAPS for a, b in zip(after, before)]
    by_thread = {{name: (cpu - threads.get(name, 0.0)) / MAPS
                  for name, cpu in threads2.items()}}
    print(repr((statistics.median(walls), parent, workers_cpu, faults, by_thread)))

if KIND == "pool":
    import multiprocessing
    with multiprocessing.get_context("spawn").Pool(2) as pool:
        measure(lambda n: sum(pool.map(square, range(n))), lambda: [p.pid for p in pool._pool])
else:
    from taskrunner import ProcessPoolTaskRunner
    with ProcessPoolTaskRunner(max_workers=2) as runner:
        runner.map(square, {{"x": range(8)}}).result()
        measure(lambda n: sum(runner.map(square, {{"x": range(n)}}).result()),
                lambda: [w.process.pid for w in runner._active.workers.workers])
"""


def one_round(tree, kind, maps):
    out = run_in_tree(tree, ROUND.format(items=ITEMS, maps=maps, kind=kind,
                                       here=os.path.dirname(os.path.abspath(__file__))), "costs_round")
    return eval(out.strip().splitlines()[-1])   # noqa: S307 (our own child's repr)


def main():
    rounds, maps = int(sys.argv[1]), int(sys.argv[2])
    trees = [os.path.abspath(t) for t in sys.argv[3:]] or [os.path.dirname(os.path.dirname(
        os.path.abspath(__file__)))]
    variants = [(f"taskrunner {tree}", tree, "ours") for tree in trees]
    variants.append(("multiprocessing.Pool", trees[0], "pool"))
    results = {name: [] for name, _, _ in variants}
    for _ in range(rounds):
        for name, tree, kind in variants:
            results[name].append(one_round(tree, kind, maps))
    for name, samples in results.items():
        wall, parent, workers = (statistics.median(s[i] for s in samples) for i in range(3))
        faults = [statistics.median(s[3][i] for s in samples) for i in range(len(samples[0][3]))]
        threads = {t: statistics.median(s[4].get(t, 0.0) for s in samples) for t in samples[0][4]}
        print(f"{name}: wall {wall * 1000:.0f} ms, parent CPU {parent * 1000:.0f} ms "
              f"({', '.join(f'{t} {cpu * 1000:.0f}' for t, cpu in threads.items())}), "
              f"workers' CPU {workers * 1000:.0f} ms, page faults parent {faults[0]:.0f}, "
              f"workers {', '.join(f'{f:.0f}' for f in faults[1:])} (per map)")


if __name__ == "__main__":
    main()
