"""A/B of the proc-map row between checkouts, on one noisy machine.

    python benchmarks/ab_proc_map.py ROUNDS TREE [TREE ...]

Each round runs, for each TREE in turn (a checkout with its extensions
built in place), a fresh interpreter that imports taskrunner from TREE and
times our map and multiprocessing.Pool.map of 1,000,000 items twice each,
alternating.  Per round it keeps the ratio Pool/ours of the medians: a
ratio measured in one process, seconds apart, is much steadier here than
either time.  Prints, per tree, the median of our times and of the ratios.
"""

import statistics
import sys

from _ab import alternate, run_in_tree

SIZE = 1_000_000
ROUND = """
import statistics, sys
import taskrunner, taskrunner.bench as b
assert taskrunner.__file__.startswith(sys.argv[1]), taskrunner.__file__
ours, pool = [], []
for _ in range(2):
    ours.append(b.proc_map_ours({size}, 2)[0])
    pool.append(b.proc_map_pool({size}, 2)[0])
print(statistics.median(ours), statistics.median(pool))
"""


def one_round(tree):
    out = run_in_tree(tree, ROUND.format(size=SIZE), "ab_round")
    ours, pool = map(float, out.split()[-2:])
    return ours, pool


def main():
    results = alternate(int(sys.argv[1]), sys.argv[2:], one_round)
    for tree, samples in results.items():
        ours = statistics.median(o for o, _ in samples)
        ratios = [round(p / o, 2) for o, p in samples]
        print(f"{tree}: ours {ours * 1000:.0f} ms, Pool/ours {statistics.median(ratios)} "
              f"(rounds: {ratios})")


if __name__ == "__main__":
    main()
