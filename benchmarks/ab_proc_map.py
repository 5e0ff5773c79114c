"""A/B of the proc-map row between checkouts, on one noisy machine.

    python benchmarks/ab_proc_map.py ROUNDS TREE [TREE ...]

Each round runs, for each TREE in turn (a checkout with its extensions
built in place), a fresh interpreter that imports taskrunner from TREE and
times our map and multiprocessing.Pool.map of 1,000,000 items twice each,
alternating.  Per round it keeps the ratio Pool/ours of the medians: a
ratio measured in one process, seconds apart, is much steadier here than
either time.  Prints, per tree, the median of our times and of the ratios.
"""

import sys

from _ab import alternate, report, timed_pair

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


def main():
    one_round = timed_pair(ROUND.format(size=SIZE), "ab_round")
    report(alternate(int(sys.argv[1]), sys.argv[2:], one_round), "Pool")


if __name__ == "__main__":
    main()
