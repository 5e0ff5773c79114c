"""proc-cpu as ratios taken round by round: on a machine whose spare CPU
comes and goes (other tenants), a ratio of figures measured seconds apart
is steadier than figures from separate runs.

    python benchmarks/proc_cpu_rounds.py ROUNDS

Each round times, in turn, the serial loop, our map and Pool.map over the
bench's 100,000 items of `spin` (pool start included, as in the bench
row), and two processes each running the serial loop over half the items
(started and waiting beforehand: the ceiling of any 2-process pool on this
machine).  Prints each round's ratios to the serial loop and their medians.
"""

import multiprocessing
import statistics
import sys
import time

from taskrunner.bench import cpu_map_ours, cpu_map_pool, cpu_map_serial, spin

ITEMS = 100_000
WORKERS = 2


def _half(lo, hi, go, done):
    go.wait()
    done.put(sum(spin(i) for i in range(lo, hi)))


def two_processes(n):
    """Seconds for two started processes to run the serial loop over half
    of n items each."""
    ctx = multiprocessing.get_context("spawn")
    go, done = ctx.Event(), ctx.Queue()
    halves = [(0, n // 2), (n // 2, n)]
    processes = [ctx.Process(target=_half, args=(lo, hi, go, done)) for lo, hi in halves]
    for p in processes:
        p.start()
    time.sleep(1.0)         # both imported and waiting
    start = time.perf_counter()
    go.set()
    for _ in processes:
        done.get()
    seconds = time.perf_counter() - start
    for p in processes:
        p.join()
    return seconds


def timed(fn, *args):
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main():
    rounds = int(sys.argv[1])
    ratios = {"taskrunner": [], "Pool.map": [], "two processes": []}
    for r in range(rounds):
        serial = timed(cpu_map_serial, ITEMS, WORKERS)
        ours = timed(cpu_map_ours, ITEMS, WORKERS)
        pool = timed(cpu_map_pool, ITEMS, WORKERS)
        ceiling = two_processes(ITEMS)
        for name, seconds in (("taskrunner", ours), ("Pool.map", pool), ("two processes", ceiling)):
            ratios[name].append(serial / seconds)
        print(f"round {r + 1}: serial {serial:.2f} s, taskrunner {ours:.2f} s, "
              f"Pool.map {pool:.2f} s, two processes {ceiling:.2f} s", flush=True)
    for name, values in ratios.items():
        print(f"{name}: median {statistics.median(values):.2f}x the serial loop "
              f"(rounds {', '.join(f'{v:.2f}' for v in values)})")


if __name__ == "__main__":
    main()
