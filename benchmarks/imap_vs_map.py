"""imap over a generator against map over a range, on the thread runner,
interleaved ROUNDS times in one runner: the medians and map/imap (above 1:
imap gives more results a second).

    python benchmarks/imap_vs_map.py [ITEMS] [ROUNDS]
"""

import statistics
import sys
import time

from taskrunner import ThreadPoolTaskRunner


def inc(x):
    return x + 1


def main(items=1_000_000, rounds=7):
    streamed, mapped = [], []
    with ThreadPoolTaskRunner() as runner:
        for _ in range(rounds):
            start = time.perf_counter()
            sum(runner.imap(inc, {"x": (i for i in range(items))}))
            streamed.append(time.perf_counter() - start)
            start = time.perf_counter()
            sum(runner.map(inc, {"x": range(items)}).result())
            mapped.append(time.perf_counter() - start)
    a, b = statistics.median(streamed), statistics.median(mapped)
    print(f"imap {a * 1000:.0f} ms, map {b * 1000:.0f} ms, map/imap {b / a:.2f}")


if __name__ == "__main__":
    main(*(int(arg) for arg in sys.argv[1:3]))
