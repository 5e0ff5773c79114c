"""Where the parent's CPU goes in a CPU-bound process map (proc-cpu's
task), thread by thread, and how long the map takes beside
multiprocessing.Pool.map and the serial loop, all in one process.

    python benchmarks/proc_cpu_parent.py TREE N ROUNDS [BATCH_SECONDS]

TREE is a checkout with its extensions built in place; it is imported
first.  Each round times, in turn: the serial loop over N items of `spin`,
a new 2-worker ProcessPoolTaskRunner mapping them (its start included, as
in the bench's proc-cpu row), and a new spawn Pool(2) doing the same.
BATCH_SECONDS, if given, replaces the feeder's batch target (and its first
guess, a tenth of it) for comparing batch sizes.  Prints medians: wall
times, the time to the runner's first result, the parent's CPU per thread
(from /proc, Linux only) and the workers' CPU.
"""

import multiprocessing
import os
import resource
import statistics
import sys
import threading
import time

TICKS = os.sysconf("SC_CLK_TCK")


def thread_cpu():
    """{thread name: CPU seconds} of this process's threads."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            stat = f.read()
        fields = stat[stat.rindex(")") + 2:].split()
        out[names.get(int(tid), tid)] = (int(fields[11]) + int(fields[12])) / TICKS
    return out


def children_cpu():
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def ours(n, spin):
    from taskrunner import ProcessPoolTaskRunner

    kids, start = children_cpu(), time.perf_counter()
    with ProcessPoolTaskRunner(max_workers=2) as runner:
        before = thread_cpu()
        futures = runner.map(spin, {"x": range(n)})
        futures[0].result()
        first = time.perf_counter() - start
        sum(futures.result())
        done = time.perf_counter() - start
        threads = {name: cpu - before.get(name, 0.0) for name, cpu in thread_cpu().items()}
    return {"wall": done, "first": first, "workers": children_cpu() - kids,
            **{f"parent {name}": cpu for name, cpu in threads.items()}}


def pool(n, spin):
    kids, start = children_cpu(), time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(2) as peer:
        sum(peer.map(spin, range(n)))
        done = time.perf_counter() - start
    return {"wall": done, "workers": children_cpu() - kids}


def serial(n, spin):
    start = time.perf_counter()
    sum(spin(i) for i in range(n))
    return {"wall": time.perf_counter() - start}


def main():
    sys.path.insert(0, os.path.abspath(sys.argv[1]))
    from taskrunner.bench import spin

    n, rounds = int(sys.argv[2]), int(sys.argv[3])
    if len(sys.argv) > 4:
        from taskrunner._process import feeder

        feeder.BATCH_SECONDS = float(sys.argv[4])
        feeder.FIRST_GUESS = feeder.BATCH_SECONDS / 10
    samples = {"serial": [], "ours": [], "Pool.map": []}
    for _ in range(rounds):
        for name, fn in (("serial", serial), ("ours", ours), ("Pool.map", pool)):
            samples[name].append(fn(n, spin))
    serial_wall = statistics.median(s["wall"] for s in samples["serial"])
    for name, runs in samples.items():
        keys = [k for k in runs[0] if all(k in r for r in runs)]
        figures = ", ".join(f"{k} {1000 * statistics.median(r[k] for r in runs):.0f} ms"
                            for k in keys)
        ratio = serial_wall / statistics.median(r["wall"] for r in runs)
        print(f"{name}: {figures}; serial/{name} {ratio:.2f}x")


if __name__ == "__main__":
    main()
