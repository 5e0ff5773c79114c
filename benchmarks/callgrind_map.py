"""A started runner doing ROUNDS maps of N items, for instruction counts:
steady on a noisy machine, where times are not.

    valgrind --tool=callgrind python benchmarks/callgrind_map.py process N ROUNDS
    valgrind --tool=callgrind python benchmarks/callgrind_map.py thread N ROUNDS

`process`: ProcessPoolTaskRunner(2).map(square) (callgrind follows the
parent only: the workers are spawned interpreters); `thread`:
ThreadPoolTaskRunner(2).map(inc).  Each map's results are summed, as in the
bench's rows.  The counts include the interpreter's start and imports:
compare two trees on the same N and ROUNDS.
"""

import sys

from taskrunner import ProcessPoolTaskRunner, ThreadPoolTaskRunner
from taskrunner.bench import inc, square

if __name__ == "__main__":
    kind, n, rounds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    runner, task = {"process": (ProcessPoolTaskRunner, square),
                    "thread": (ThreadPoolTaskRunner, inc)}[kind]
    with runner(max_workers=2) as r:
        sum(r.map(task, {"x": range(1000)}).result())
        for _ in range(rounds):
            sum(r.map(task, {"x": range(n)}).result())
