"""A/B of what logging costs a run that succeeds, between checkouts.

    python benchmarks/ab_logging_cost.py ROUNDS TREE [TREE ...]

The runs that end well pass a state check where runs end (record_end,
end_items); a process worker's task that logs nothing pays nothing (the
forwarding handler acts only when a record is logged).  Each round runs,
for each TREE in turn (a checkout with its extensions built in place), a
fresh interpreter that imports taskrunner from TREE and times, twice each:
the thread runner's map of 1,000,000 items and 200,000 submits, and the
process runner's map of 1,000,000 items (2 workers), all with logging not
set up (the default) and tasks that log nothing; and, for what a failure
costs, a thread runner's map of 100,000 items that all raise (10 of them
logged at WARNING, to stderr, the others only counted: DEBUG is off).  Prints, per tree and
workload, the median over the rounds of each round's best time.
"""

import statistics
import sys

from _ab import alternate, run_in_tree

ROUND = """
import sys, time
import taskrunner, taskrunner.bench as b
assert taskrunner.__file__.startswith(sys.argv[1]), taskrunner.__file__

def fail_always(x):
    raise ValueError(x)

def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start

def failing(n, workers):
    with taskrunner.ThreadPoolTaskRunner(max_workers=workers) as runner:
        runner.map(fail_always, {"x": range(n)}).result(raise_on_failure=False)

best = {"thread-map": [], "thread-submit": [], "proc-map": [], "thread-map-failing": []}
for _ in range(2):
    best["thread-map"].append(timed(b.map_ours, 1_000_000, 6))
    best["thread-submit"].append(timed(b.submit_ours, 200_000, 6))
    best["proc-map"].append(b.proc_map_ours(1_000_000, 2)[0])
    best["thread-map-failing"].append(timed(failing, 100_000, 6))
print(" ".join(f"{name}={min(times)}" for name, times in best.items()))
"""


def one_round(tree):
    out = run_in_tree(tree, ROUND, "ab_logging_round")
    return {name: float(value) for name, value in
            (item.split("=") for item in out.split()[-4:])}


def main():
    results = alternate(int(sys.argv[1]), sys.argv[2:], one_round)
    for tree, samples in results.items():
        figures = ", ".join(
            f"{name} {statistics.median(s[name] for s in samples) * 1000:.0f} ms"
            for name in samples[0])
        print(f"{tree}: {figures}")


if __name__ == "__main__":
    main()
