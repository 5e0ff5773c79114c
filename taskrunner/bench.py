"""The benchmark workloads and the `python -m taskrunner bench` table.

A workload is one job (say, 200,000 no-op submits) done by several
variants: ours (a taskrunner runner) and its peers (concurrent.futures,
dask, ...), all with the same worker count, in the same run.  Each variant
returns the job's answer, which must equal the workload's expected answer,
so a broken run cannot look fast.  Lower figures are better (seconds, bytes),
so a peer's ratio is peer / ours: "x faster" or "x smaller".

Later runners add workloads to WORKLOADS; benchmarks/ runs the same ones
under pytest-benchmark.
"""

import dataclasses
import gc
import importlib.util
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Tuple

from taskrunner import ThreadPoolTaskRunner

__all__ = [
    "Variant", "Target", "Workload", "WORKLOADS",
    "default_workers", "measure", "run_workload", "main",
]


# -- the model ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of doing a workload's job.

    `run(data, workers)` returns the answer (for a timed workload) or
    `(figure, answer)` (for a workload that measures itself).  `requires`
    names modules that must be importable; `max_repeat` caps the repeats of
    a slow variant; `measure`, if given, replaces the workload's way of
    taking a sample for this variant; `size_cap`, if given, is the most
    items a (very slow) variant is given: its figure is scaled up to the
    workload's size, so the ratio is one of throughputs."""
    name: str
    run: Callable
    requires: Tuple[str, ...] = ()
    max_repeat: Optional[int] = None
    measure: Optional[Callable] = None
    size_cap: Optional[int] = None

    def available(self):
        return all(importlib.util.find_spec(module) for module in self.requires)


@dataclasses.dataclass(frozen=True)
class Target:
    """A goal from the spec: our figure at least `min_ratio` times better
    than `peer`'s, or (with no peer) our figure at most `max_figure`."""
    text: str
    peer: Optional[str] = None
    min_ratio: Optional[float] = None
    max_figure: Optional[float] = None

    def met(self, ours, peer_figures):
        """True or False, or None when the peer was not measured."""
        if self.peer is None:
            return ours <= self.max_figure
        theirs = peer_figures.get(self.peer)
        return None if theirs is None else theirs / ours >= self.min_ratio


@dataclasses.dataclass(frozen=True)
class Workload:
    """A job of `size` items (`quick_size` for smoke runs), its variants and
    the spec's targets.  `prepare(size)` builds the shared input, untimed;
    `expected(data)` is the right answer; `measure` is how one sample is
    taken (measure_time, or in_fresh_process(...)).  A workload of
    `processes` gives its variants the process count (--processes), not
    the thread count."""
    name: str
    description: str
    size: int
    quick_size: int
    prepare: Callable
    expected: Callable
    ours: Variant
    peers: Tuple[Variant, ...]
    targets: Tuple[Target, ...]
    measure: Callable
    unit: str = "s"
    processes: bool = False

    @property
    def variants(self):
        return (self.ours,) + self.peers

    def variant(self, name):
        return next(v for v in self.variants if v.name == name)


class WrongAnswer(AssertionError):
    """A variant returned a different answer from the expected one."""


class NotFinished(Exception):
    """A variant could not finish the job (it ran out of its memory cap)."""


def default_workers():
    """The worker count every thread variant uses: ThreadPoolTaskRunner's
    default."""
    return min(32, (os.cpu_count() or 1) + 4)


DEFAULT_PROCESSES = 2   # the spec's process-pool targets are for 2 worker processes


def workers_for(workload, threads, processes):
    return processes if workload.processes else threads


# -- measuring ----------------------------------------------------------------

def measure_time(workload, variant, data, size, workers):
    """(seconds, answer) of one `variant.run(data, workers)` in this process."""
    gc.collect()
    start = time.perf_counter()
    answer = variant.run(data, workers)
    return time.perf_counter() - start, answer


def measure_self(workload, variant, data, size, workers):
    """(figure, answer) as the variant reports them (a memory figure, say)."""
    return variant.run(data, workers)


MEMORY_CAP = min(16 * 2**30, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.7))


def in_fresh_process(inner, memory_cap=None):
    """A way of taking a sample: `inner` (measure_time or measure_self), in a
    new interpreter, so that nothing earlier samples left behind affects it;
    with `memory_cap` bytes of address space at most, past which the
    variant is reported as not finished instead of taking the machine down."""
    def measure_isolated(workload, variant, data, size, workers):
        package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
        limit = None
        if memory_cap:
            limit = lambda: resource.setrlimit(resource.RLIMIT_AS, (memory_cap, memory_cap))
        child = subprocess.run(
            [sys.executable, "-c", "import sys, taskrunner.bench as b; b._child(sys.argv[1:])",
             inner.__name__, workload.name, variant.name, str(size), str(workers)],
            env=env, capture_output=True, text=True, check=False, preexec_fn=limit)
        if child.returncode != 0:
            if memory_cap and ("MemoryError" in child.stderr or child.returncode < 0):
                raise NotFinished(f"did not finish within {memory_cap / 2**30:.0f} GiB")
            raise RuntimeError(
                f"{workload.name}/{variant.name} failed in its subprocess:\n{child.stderr}")
        figure, answer = json.loads(child.stdout.strip().splitlines()[-1])
        return figure, answer
    return measure_isolated


def _child(argv):
    """Entry point of in_fresh_process's subprocess: prints [figure, answer]
    as JSON."""
    inner_name, workload_name, variant_name, size, workers = argv
    inner = {f.__name__: f for f in (measure_time, measure_self)}[inner_name]
    workload = WORKLOADS[workload_name]
    data = workload.prepare(int(size))
    variant = workload.variant(variant_name)
    print(json.dumps(inner(workload, variant, data, int(size), int(workers))))


def measure(workload, variant, data, size, workers, expected):
    """One sample's figure; raises WrongAnswer if the answer is wrong and
    NotFinished if the variant could not finish."""
    take = variant.measure or workload.measure
    figure, answer = take(workload, variant, data, size, workers)
    if answer != expected:
        raise WrongAnswer(
            f"{workload.name}/{variant.name}: answer {answer!r}, expected {expected!r}")
    return figure


def rss_bytes():
    """Resident memory of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- the jobs -----------------------------------------------------------------

def inc(x):
    return x + 1


def first_node(i):
    return i


def node(a, b, c):
    return (a + b + c) % 1_000_003


def wait_on(event):
    event.wait()


def sum_of_incs(n):
    return n * (n + 1) // 2


def submit_ours(n, workers):
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        futures = [runner.submit(inc, {"x": i}) for i in range(n)]
        return sum(f.result() for f in futures)


def submit_executor(n, workers):
    with ThreadPoolExecutor(max_workers=workers) as executor:
        futures = [executor.submit(inc, i) for i in range(n)]
        return sum(f.result() for f in futures)


def map_ours(n, workers):
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        return sum(runner.map(inc, {"x": range(n)}).result())


def map_executor(n, workers):
    with ThreadPoolExecutor(max_workers=workers) as executor:
        return sum(list(executor.map(inc, range(n))))


DAG_WIDTH = 1_000
DAG_SEED = 20261125


def layered_dag(size):
    """The DAG's edges: one list per layer after the first, of (a, b, c)
    indices into the layer before; `size // DAG_WIDTH` layers in all."""
    rng = random.Random(DAG_SEED)
    layers = max(1, size // DAG_WIDTH)
    return [[(rng.randrange(DAG_WIDTH), rng.randrange(DAG_WIDTH), rng.randrange(DAG_WIDTH))
             for _ in range(DAG_WIDTH)]
            for _ in range(layers - 1)]


def dag_answer(edges):
    """The sum of the last layer's values, computed serially."""
    values = list(range(DAG_WIDTH))
    for layer in edges:
        values = [node(values[a], values[b], values[c]) for a, b, c in layer]
    return sum(values)


def dag_ours(edges, workers):
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        futures = [runner.submit(first_node, {"i": i}) for i in range(DAG_WIDTH)]
        for layer in edges:
            futures = [runner.submit(node, {"a": futures[a], "b": futures[b], "c": futures[c]})
                       for a, b, c in layer]
        return sum(f.result() for f in futures)


def dag_dask(edges, workers):
    import dask.threaded
    graph = {("n", 0, i): (first_node, i) for i in range(DAG_WIDTH)}
    for depth, layer in enumerate(edges, 1):
        for i, (a, b, c) in enumerate(layer):
            up = depth - 1
            graph[("n", depth, i)] = (node, ("n", up, a), ("n", up, b), ("n", up, c))
    last = [("n", len(edges), i) for i in range(DAG_WIDTH)]
    return sum(dask.threaded.get(graph, last, num_workers=workers))


def pending_memory_ours(n, workers):
    """(bytes of RSS per pending run, answer) with `n` runs waiting on a
    gate run that blocks until they are all submitted."""
    gate = threading.Event()
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        blocker = runner.submit(wait_on, {"event": gate})
        gc.collect()
        before = rss_bytes()
        futures = [runner.submit(inc, {"x": i}, wait_for=[blocker]) for i in range(n)]
        gc.collect()
        after = rss_bytes()
        gate.set()
        return (after - before) / n, sum(f.result() for f in futures)


def pending_memory_executor(n, workers):
    """As pending_memory_ours, for a ThreadPoolExecutor whose every worker
    is blocked on the gate."""
    gate = threading.Event()
    with ThreadPoolExecutor(max_workers=workers) as executor:
        for _ in range(workers):
            executor.submit(wait_on, gate)
        gc.collect()
        before = rss_bytes()
        futures = [executor.submit(inc, i) for i in range(n)]
        gc.collect()
        after = rss_bytes()
        gate.set()
        return (after - before) / n, sum(f.result() for f in futures)


# -- streaming (imap) ---------------------------------------------------------

def numbers(n):
    """The streamed input: a generator, never a list."""
    yield from range(n)


def peak_rss_growth(job):
    """(MiB by which resident memory rose at its peak while `job()` ran,
    job's answer), sampled every few milliseconds by a thread."""
    gc.collect()
    base = rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_bytes())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        answer = job()
    finally:
        done.set()
        sampler.join()
    return (max(peak[0], rss_bytes()) - base) / 2**20, answer


def stream_ours(n, workers):
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        return sum(runner.imap(inc, {"x": numbers(n)}))


def stream_map_ours(n, workers):
    """The throughput imap is to match: map() over a range, then result()."""
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        return sum(runner.map(inc, {"x": range(n)}).result())


def stream_executor(n, workers):
    with ThreadPoolExecutor(max_workers=workers) as executor:
        return sum(executor.map(inc, numbers(n)))


def stream_thread_pool(n, workers):
    from multiprocessing.pool import ThreadPool

    with ThreadPool(workers) as pool:
        return sum(pool.imap(inc, numbers(n)))


def stream_memory_ours(n, workers):
    return peak_rss_growth(lambda: stream_ours(n, workers))


def stream_memory_executor(n, workers):
    return peak_rss_growth(lambda: stream_executor(n, workers))


def stream_memory_thread_pool(n, workers):
    return peak_rss_growth(lambda: stream_thread_pool(n, workers))


# -- process-pool jobs (workers import these from this module) ----------------

def square(x):
    return x * x


SPIN_ROUNDS = 1350      # about 50 us of CPU here on 2026-12-01 (800 took 45 us on 2026-11-25, 30 us now)


def spin(x):
    """CPU-bound busywork: about 50 microseconds, no allocation."""
    s = x
    for i in range(SPIN_ROUNDS):
        s = (s * 31 + i) % 1_000_003
    return s


def sum_of_squares(n):
    return (n - 1) * n * (2 * n - 1) // 6


def sum_of_spins(n):
    return sum(spin(i) for i in range(n))


def _spawn():
    import multiprocessing

    return multiprocessing.get_context("spawn")


def _warm(n, workers):
    return range(min(n, 4 * workers))


def pause(x):
    time.sleep(0.05)
    return x


def proc_map_ours(n, workers):
    """(seconds, answer) of one map over range(n) in a started runner: every
    worker up (the runner starts all but the first with the second run, and
    a pool's steady state is what this measures)."""
    from taskrunner import ProcessPoolTaskRunner

    with ProcessPoolTaskRunner(max_workers=workers) as runner:
        runner.map(pause, {"x": range(4 * workers)}).result()
        start = time.perf_counter()
        total = sum(runner.map(square, {"x": range(n)}).result())
        return time.perf_counter() - start, total


def proc_map_pool(n, workers):
    with _spawn().Pool(workers) as pool:
        pool.map(square, _warm(n, workers))
        start = time.perf_counter()
        total = sum(pool.map(square, range(n)))
        return time.perf_counter() - start, total


def proc_map_executor(n, workers):
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=_spawn()) as executor:
        list(executor.map(square, _warm(n, workers)))
        start = time.perf_counter()
        total = sum(executor.map(square, range(n)))
        return time.perf_counter() - start, total


def proc_map_joblib(n, workers):
    import joblib

    with joblib.Parallel(n_jobs=workers, backend="loky") as parallel:
        parallel(joblib.delayed(square)(i) for i in _warm(n, workers))
        start = time.perf_counter()
        total = sum(parallel(joblib.delayed(square)(i) for i in range(n)))
        return time.perf_counter() - start, total


def proc_stream_ours(n, workers):
    """(seconds, answer) of imap(square) over a generator, in a started runner."""
    from taskrunner import ProcessPoolTaskRunner

    with ProcessPoolTaskRunner(max_workers=workers) as runner:
        runner.map(pause, {"x": range(4 * workers)}).result()
        start = time.perf_counter()
        total = sum(runner.imap(square, {"x": numbers(n)}))
        return time.perf_counter() - start, total


POOL_IMAP_CHUNKSIZES = (100, 1_000, 10_000)


def proc_stream_pool(n, workers):
    """(seconds, answer): Pool.imap over the same generator, the best of
    POOL_IMAP_CHUNKSIZES (its default, 1, is far slower)."""
    with _spawn().Pool(workers) as pool:
        pool.map(square, _warm(n, workers))
        best, total = math.inf, None
        for chunksize in POOL_IMAP_CHUNKSIZES:
            start = time.perf_counter()
            total = sum(pool.imap(square, numbers(n), chunksize=chunksize))
            best = min(best, time.perf_counter() - start)
        return best, total


def proc_stream_memory_ours(n, workers):
    from taskrunner import ProcessPoolTaskRunner

    with ProcessPoolTaskRunner(max_workers=workers) as runner:
        runner.map(pause, {"x": range(4 * workers)}).result()
        return peak_rss_growth(lambda: sum(runner.imap(square, {"x": numbers(n)})))


def proc_stream_memory_pool(n, workers):
    with _spawn().Pool(workers) as pool:
        pool.map(square, _warm(n, workers))
        return peak_rss_growth(lambda: sum(pool.imap(square, numbers(n), chunksize=10_000)))


def cpu_map_ours(n, workers):
    from taskrunner import ProcessPoolTaskRunner

    with ProcessPoolTaskRunner(max_workers=workers) as runner:
        return sum(runner.map(spin, {"x": range(n)}).result())


def cpu_map_serial(n, workers):
    return sum(spin(i) for i in range(n))


def cpu_map_pool(n, workers):
    with _spawn().Pool(workers) as pool:
        return sum(pool.map(spin, range(n)))


def cpu_map_joblib(n, workers):
    import joblib

    return sum(joblib.Parallel(n_jobs=workers, backend="loky")(
        joblib.delayed(spin)(i) for i in range(n)))


def proc_submit_ours(n, workers):
    """(seconds, answer) of n submits, then a result each, in a started runner."""
    from taskrunner import ProcessPoolTaskRunner

    with ProcessPoolTaskRunner(max_workers=workers) as runner:
        runner.submit(inc, {"x": 0}).result()
        start = time.perf_counter()
        futures = [runner.submit(inc, {"x": i}) for i in range(n)]
        total = sum(f.result() for f in futures)
        return time.perf_counter() - start, total


def proc_submit_executor(n, workers):
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers, mp_context=_spawn()) as executor:
        executor.submit(inc, 0).result()
        start = time.perf_counter()
        futures = [executor.submit(inc, i) for i in range(n)]
        total = sum(f.result() for f in futures)
        return time.perf_counter() - start, total


def first_result_ours(n, workers):
    """(seconds from entering a new runner to its first result, answer)."""
    from taskrunner import ProcessPoolTaskRunner

    start = time.perf_counter()
    with ProcessPoolTaskRunner(max_workers=workers) as runner:
        answer = runner.submit(inc, {"x": n - 1}).result()
        elapsed = time.perf_counter() - start
    return elapsed, answer


def first_result_executor(n, workers):
    from concurrent.futures import ProcessPoolExecutor

    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=_spawn()) as executor:
        answer = executor.submit(inc, n - 1).result()
        elapsed = time.perf_counter() - start
    return elapsed, answer


def _dask_cluster(workers):
    """A LocalCluster of `workers` worker processes, one thread each, as
    both Dask variants get it (started before the clock)."""
    from distributed import LocalCluster

    return LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                        dashboard_address=None)


def dask_submit_ours(n, workers):
    """(seconds, answer) of n submits to a DaskTaskRunner, then their
    results (a FutureList gathers them in one call, as client.gather does)."""
    from taskrunner import DaskTaskRunner, FutureList

    with _dask_cluster(workers) as cluster:
        with DaskTaskRunner(address=cluster.scheduler_address) as runner:
            runner.submit(inc, {"x": 0}).result()
            start = time.perf_counter()
            futures = FutureList([runner.submit(inc, {"x": i}) for i in range(n)])
            total = sum(futures.result())
            return time.perf_counter() - start, total


def dask_submit_client(n, workers):
    from distributed import Client

    with _dask_cluster(workers) as cluster, Client(cluster) as client:
        client.submit(inc, 0).result()
        start = time.perf_counter()
        futures = [client.submit(inc, i, pure=False) for i in range(n)]
        total = sum(client.gather(futures))
        return time.perf_counter() - start, total


def dask_map_ours(n, workers):
    from taskrunner import DaskTaskRunner

    with _dask_cluster(workers) as cluster:
        with DaskTaskRunner(address=cluster.scheduler_address) as runner:
            runner.submit(inc, {"x": 0}).result()
            start = time.perf_counter()
            total = sum(runner.map(inc, {"x": range(n)}).result())
            return time.perf_counter() - start, total


def dask_map_client(n, workers):
    from distributed import Client

    with _dask_cluster(workers) as cluster, Client(cluster) as client:
        client.submit(inc, 0).result()
        start = time.perf_counter()
        total = sum(client.gather(client.map(inc, range(n), pure=False)))
        return time.perf_counter() - start, total


def _same(size):
    return size


THREAD_POOL = "ThreadPoolExecutor"
PROCESS_POOL = "ProcessPoolExecutor"
MP_POOL = "multiprocessing.Pool"
JOBLIB = "joblib (loky)"
SERIAL = "serial loop"
DASK_CLIENT = "distributed.Client"
STREAM_MAP = "taskrunner map()"
THREADPOOL_IMAP = "multiprocessing ThreadPool.imap"
POOL_IMAP = "multiprocessing.Pool.imap"
DASK_MAP_ITEMS = 20_000

WORKLOADS = {w.name: w for w in [
    Workload(
        "submit", "no-op tasks, submit each then result each",
        200_000, 10_000, _same, sum_of_incs,
        Variant("taskrunner", submit_ours), (Variant(THREAD_POOL, submit_executor),),
        (Target(">= 10x ThreadPoolExecutor", THREAD_POOL, min_ratio=10),),
        measure_time),
    Workload(
        "map", "map(inc) over range(n), results in order",
        1_000_000, 50_000, _same, sum_of_incs,
        Variant("taskrunner", map_ours), (Variant(THREAD_POOL, map_executor),),
        (Target(">= 10x ThreadPoolExecutor", THREAD_POOL, min_ratio=10),),
        measure_time),
    # Dask's threaded scheduler needs memory quadratic in this graph's size
    # here (0.9 GiB at 20,000 nodes, 3.7 GiB at 50,000): at 200,000 it runs
    # into MEMORY_CAP, so the smaller graph gives a measured ratio too.
    Workload(
        "dag", f"layered DAG, {DAG_WIDTH} nodes a layer, 3 random upstreams each",
        200_000, 10_000, layered_dag, dag_answer,
        Variant("taskrunner", dag_ours),
        (Variant("dask threaded", dag_dask, requires=("dask",), max_repeat=1,
                 measure=in_fresh_process(measure_time, MEMORY_CAP)),),
        (Target(">= 50x dask threaded", "dask threaded", min_ratio=50),),
        measure_time),
    Workload(
        "dag-50k", "the same kind of DAG, smaller, so that dask finishes",
        50_000, 5_000, layered_dag, dag_answer,
        Variant("taskrunner", dag_ours),
        (Variant("dask threaded", dag_dask, requires=("dask",), max_repeat=3,
                 measure=in_fresh_process(measure_time, MEMORY_CAP)),),
        (Target(">= 50x dask threaded", "dask threaded", min_ratio=50),),
        measure_time),
    Workload(
        "memory", "resident bytes per pending run, all pending at once",
        1_000_000, 50_000, _same, sum_of_incs,
        Variant("taskrunner", pending_memory_ours),
        (Variant(THREAD_POOL, pending_memory_executor),),
        (Target("<= 300 B/run", max_figure=300),),
        in_fresh_process(measure_self), unit="B/run"),
    # Streaming: imap over a generator, summed as results come.  The list
    # and future of each item of the peers' maps do not fit at 10,000,000
    # items everywhere: they get fewer, their figures scaled.
    Workload(
        "stream", "ThreadPoolTaskRunner.imap(inc) over a generator, summed as results come",
        10_000_000, 500_000, _same, sum_of_incs,
        Variant("taskrunner", stream_ours),
        (Variant(STREAM_MAP, stream_map_ours, size_cap=1_000_000),
         Variant(THREAD_POOL, stream_executor, max_repeat=1, size_cap=100_000),
         Variant(THREADPOOL_IMAP, stream_thread_pool, max_repeat=1, size_cap=200_000)),
        (Target(">= 1x the throughput of taskrunner map(range).result()", STREAM_MAP,
                min_ratio=1),),
        measure_time),
    Workload(
        "stream-memory", "peak resident growth (MiB) over the stream workload",
        10_000_000, 500_000, _same, sum_of_incs,
        Variant("taskrunner", stream_memory_ours),
        (Variant(THREAD_POOL, stream_memory_executor, max_repeat=1, size_cap=100_000),
         Variant(THREADPOOL_IMAP, stream_memory_thread_pool, max_repeat=1, size_cap=200_000)),
        (Target("<= 64 MiB", max_figure=64),),
        in_fresh_process(measure_self), unit="MiB"),
    # Process pools, 2 worker processes (spawn) each.  Pools are started
    # before the clock starts, except where the start is the point.
    Workload(
        "proc-map", "ProcessPoolTaskRunner.map(square) over range(n), results in order",
        1_000_000, 50_000, _same, sum_of_squares,
        Variant("taskrunner", proc_map_ours),
        (Variant(MP_POOL, proc_map_pool),
         Variant(PROCESS_POOL, proc_map_executor, max_repeat=1, size_cap=20_000),
         Variant(JOBLIB, proc_map_joblib, requires=("joblib",), max_repeat=3)),
        (Target(">= 0.8x multiprocessing.Pool.map", MP_POOL, min_ratio=0.8),
         Target(">= 1x (streaming issue)", MP_POOL, min_ratio=1),
         Target(">= 50x ProcessPoolExecutor.map", PROCESS_POOL, min_ratio=50)),
        measure_self, processes=True),
    Workload(
        "proc-stream", "ProcessPoolTaskRunner.imap(square) over a generator, summed",
        10_000_000, 500_000, _same, sum_of_squares,
        Variant("taskrunner", proc_stream_ours, max_repeat=3),
        (Variant(POOL_IMAP, proc_stream_pool, max_repeat=3),),
        (Target(">= 1x Pool.imap (best chunksize)", POOL_IMAP, min_ratio=1),),
        measure_self, processes=True),
    Workload(
        "proc-stream-memory", "peak resident growth (MiB) of the parent over proc-stream",
        10_000_000, 500_000, _same, sum_of_squares,
        Variant("taskrunner", proc_stream_memory_ours, max_repeat=1),
        (Variant(POOL_IMAP, proc_stream_memory_pool, max_repeat=1, size_cap=2_000_000),),
        (Target("<= 64 MiB", max_figure=64),),
        in_fresh_process(measure_self), unit="MiB", processes=True),
    Workload(
        "proc-cpu", "map of a CPU-bound task (about 50 us), pool start included",
        100_000, 5_000, _same, sum_of_spins,
        Variant("taskrunner", cpu_map_ours),
        (Variant(SERIAL, cpu_map_serial, max_repeat=3),
         Variant(MP_POOL, cpu_map_pool, max_repeat=3),
         Variant(JOBLIB, cpu_map_joblib, requires=("joblib",), max_repeat=3)),
        (Target(">= 1.7x the serial loop", SERIAL, min_ratio=1.7),
         Target(">= 1.8x (streaming issue)", SERIAL, min_ratio=1.8)),
        measure_time, processes=True),
    Workload(
        "proc-submit", "no-op tasks in worker processes, submit each then result each",
        20_000, 2_000, _same, sum_of_incs,
        Variant("taskrunner", proc_submit_ours),
        (Variant(PROCESS_POOL, proc_submit_executor),),
        (Target(">= 5x ProcessPoolExecutor", PROCESS_POOL, min_ratio=5),),
        measure_self, processes=True),
    Workload(
        "proc-first", "from entering a new pool to the first result",
        1, 1, _same, _same,
        Variant("taskrunner", first_result_ours),
        (Variant(PROCESS_POOL, first_result_executor),),
        (Target("<= 1.5x ProcessPoolExecutor's", PROCESS_POOL, min_ratio=1 / 1.5),),
        measure_self, processes=True),
    # The Dask runner against the client it drives, on the same kind of
    # LocalCluster (2 worker processes, one thread each), started untimed.
    # Dask costs milliseconds a task on a small machine: both map variants
    # get DASK_MAP_ITEMS items, their times scaled to the workload's size.
    Workload(
        "dask-submit", "DaskTaskRunner: no-op submits, then their results",
        10_000, 1_000, _same, sum_of_incs,
        Variant("taskrunner", dask_submit_ours, requires=("distributed",), max_repeat=3),
        (Variant(DASK_CLIENT, dask_submit_client, requires=("distributed",), max_repeat=3),),
        (Target("<= 1.2x client.submit + gather", DASK_CLIENT, min_ratio=1 / 1.2),),
        measure_self, processes=True),
    Workload(
        "dask-map", "DaskTaskRunner.map(inc) over range(n), results in order",
        100_000, 5_000, _same, sum_of_incs,
        Variant("taskrunner", dask_map_ours, requires=("distributed",), max_repeat=3,
                size_cap=DASK_MAP_ITEMS),
        (Variant(DASK_CLIENT, dask_map_client, requires=("distributed",), max_repeat=3,
                 size_cap=DASK_MAP_ITEMS),),
        (Target(">= 1x client.map + gather", DASK_CLIENT, min_ratio=1),),
        measure_self, processes=True),
]}


# -- running and reporting ----------------------------------------------------

def run_workload(workload, size, workers, repeat, log=None):
    """Measure every available variant of `workload`, `repeat` times each
    (interleaved, capped by each variant's max_repeat).  Returns a dict:
    variant name -> list of figures, None if the variant is missing, or
    the NotFinished error of a variant that could not do the job."""
    inputs = {}         # items -> (data, expected)
    samples = {v.name: ([] if v.available() else None) for v in workload.variants}
    for round_ in range(repeat):
        for variant in workload.variants:
            figures = samples[variant.name]
            if not isinstance(figures, list) or round_ >= (variant.max_repeat or repeat):
                continue
            items = variant_size(variant, size)
            if items not in inputs:
                data = workload.prepare(items)
                inputs[items] = (data, workload.expected(data))
            data, expected = inputs[items]
            try:
                figures.append(measure(workload, variant, data, items, workers, expected)
                               * size / items)
            except NotFinished as error:
                samples[variant.name] = error
                if log:
                    log(f"{workload.name}: {variant.name} run {round_ + 1}: {error}")
                continue
            if log:
                log(f"{workload.name}: {variant.name} run {round_ + 1}: "
                    f"{format_figure(figures[-1], workload.unit)}")
    return samples


def variant_size(variant, size):
    """The items `variant` is given of a workload of `size`."""
    return min(size, variant.size_cap) if variant.size_cap else size


def format_figure(value, unit):
    """`value` in `unit`, to about three significant digits."""
    if unit != "s":
        return f"{value:.0f} {unit}"
    if value < 1:
        return f"{value * 1000:.{1 if value < 0.1 else 0}f} ms"
    return f"{value:.{2 if value < 10 else 1}f} s"


def machine():
    """CPU model, cores, memory, Python and OS of this machine."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    ram = None
    try:
        with open("/proc/meminfo") as meminfo:
            ram = int(meminfo.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(ram / 2**30, 1) if ram else None,
        "python": platform.python_version(),
        "os": platform.platform(),
    }


def summarize(workload, samples):
    """A JSON-ready dict: medians, runs, ratios and targets of a workload.
    A peer that could not finish counts as infinitely slower."""
    def median(figures):
        if isinstance(figures, NotFinished):
            return math.inf
        return statistics.median(figures) if figures else None

    medians = {name: median(figures) for name, figures in samples.items()}
    ours = medians[workload.ours.name]
    peers = {p.name: medians[p.name] for p in workload.peers if medians[p.name] is not None}
    return {
        "workload": workload.name,
        "description": workload.description,
        "unit": workload.unit,
        "variants": {name: {"median": None if medians[name] == math.inf else medians[name],
                            "samples": str(figures) if isinstance(figures, NotFinished)
                            else figures}
                     for name, figures in samples.items()},
        "ratios": {name: figure / ours for name, figure in peers.items()},
        "targets": [{"target": t.text, "met": t.met(ours, peers)} for t in workload.targets],
    }


def table_rows(workload, size, summary, repeat):
    """The table's rows for one workload: one per peer (or one, if it has
    none); targets sit on their peer's row, absolute ones on the first."""
    def cell(name):
        figures = summary["variants"][name]["samples"]
        if figures is None:
            return "not installed"
        if isinstance(figures, str):
            return figures
        text = format_figure(statistics.median(figures), workload.unit)
        notes = []
        if len(figures) != repeat:
            notes.append(f"{len(figures)} run{'s' * (len(figures) > 1)}")
        items = variant_size(workload.variant(name), size)
        if items != size:
            notes.append(f"scaled from {items:,} items")
        return f"{text} [{'; '.join(notes)}]" if notes else text

    targets = list(zip(workload.targets, summary["targets"]))
    rows = []
    for index, peer in enumerate(workload.peers or (None,)):
        peer_name = peer.name if peer else None
        mine = [t for t, _ in targets if t.peer == peer_name or (index == 0 and t.peer is None)]
        met = [m["met"] for t, m in targets if t in mine]
        ratio = summary["ratios"].get(peer_name)
        rows.append([
            workload.name if index == 0 else "",
            f"{size:,}" if index == 0 else "",
            cell(workload.ours.name) if index == 0 else "",
            peer_name or "-",
            cell(peer_name) if peer else "-",
            "-" if ratio is None else "did not finish" if ratio == math.inf else f"{ratio:.1f}x",
            "; ".join(t.text for t in mine) or "-",
            ", ".join({True: "yes", False: "NO", None: "n/a"}[m] for m in met) or "-",
        ])
    return rows


HEADER = ["workload", "size", "taskrunner", "peer", "peer's", "peer/ours", "target", "met"]


def format_table(rows):
    widths = [max(len(row[i]) for row in [HEADER] + rows) for i in range(len(HEADER))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(HEADER), rule] + [line(row) for row in rows])


def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="about 1/20 of the sizes, for smoke runs (same code path)")
    parser.add_argument("--repeat", type=int, default=5, metavar="N",
                        help="runs of each variant; the table shows medians (default 5; "
                             "slow peers may run fewer times, marked in the table)")
    parser.add_argument("--only", metavar="NAME[,NAME]",
                        help=f"run only these workloads, of: {', '.join(WORKLOADS)}")
    parser.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                        help="worker threads for every thread variant (default %(default)s, "
                             "ThreadPoolTaskRunner's default)")
    parser.add_argument("--processes", type=int, default=DEFAULT_PROCESSES, metavar="N",
                        help="worker processes for every process variant (default "
                             "%(default)s, as in the spec's targets)")
    parser.add_argument("--json", metavar="PATH", help="also write the raw figures here")


def main(args):
    """Run the selected workloads and print the table; returns the exit code."""
    names = args.only.split(",") if args.only else list(WORKLOADS)
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        print(f"unknown workload(s): {', '.join(unknown)}; known: {', '.join(WORKLOADS)}",
              file=sys.stderr)
        return 2
    if args.repeat < 1 or args.workers < 1 or args.processes < 1:
        print("--repeat, --workers and --processes must be at least 1", file=sys.stderr)
        return 2
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, "
          f"Python {info['python']}, {info['os']}")
    print(f"workers: {args.workers} threads or {args.processes} processes for every variant; "
          f"repeat: {args.repeat}"
          f"{'; QUICK sizes (targets are for the full sizes)' if args.quick else ''}", flush=True)
    log = lambda message: print(f"  {message}", file=sys.stderr, flush=True)
    rows, results = [], []
    for name in names:
        workload = WORKLOADS[name]
        size = workload.quick_size if args.quick else workload.size
        workers = workers_for(workload, args.workers, args.processes)
        samples = run_workload(workload, size, workers, args.repeat, log)
        summary = dict(summarize(workload, samples), size=size)
        results.append(summary)
        rows += table_rows(workload, size, summary, args.repeat)
    print()
    print(format_table(rows))
    print(f"\nFigures are medians of {args.repeat} runs unless marked; lower is better; "
          f"peer/ours is how many times faster (or smaller) taskrunner is.")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": info, "workers": args.workers, "processes": args.processes,
                       "repeat": args.repeat,
                       "quick": args.quick, "workloads": results}, out, indent=2)
    return 0
