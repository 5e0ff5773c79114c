"""A/B of the proc-stream row between checkouts, on one noisy machine.

    python benchmarks/ab_proc_stream.py ROUNDS TREE [TREE ...]

As ab_proc_map.py, for the process runner's imap(square) over a generator
of 2,000,000 ints against Pool.imap at its best chunksize (the bench row's
variants): per round, a fresh interpreter per TREE times ours and Pool's
once each, and the ratio Pool/ours is kept.  Prints, per tree, the median
of our times and of the ratios.
"""

import sys

from _ab import alternate, report, timed_pair

SIZE = 2_000_000
ROUND = """
import sys
import taskrunner, taskrunner.bench as b
assert taskrunner.__file__.startswith(sys.argv[1]), taskrunner.__file__
ours = b.proc_stream_ours({size}, 2)[0]
pool = b.proc_stream_pool({size}, 2)[0]
print(ours, pool)
"""


def main():
    one_round = timed_pair(ROUND.format(size=SIZE), "ab_stream_round")
    report(alternate(int(sys.argv[1]), sys.argv[2:], one_round), "Pool.imap")


if __name__ == "__main__":
    main()
