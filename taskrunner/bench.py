"""The benchmark workloads and the `python -m taskrunner bench` table.

A workload is one job (say, 200,000 no-op submits) done by several
variants: ours (a taskrunner runner) and its peers (concurrent.futures,
dask, ...), all with the same worker count, in the same run.  Each variant
returns the job's answer, which must equal the workload's expected answer,
so a broken run cannot look fast.  Lower figures are better (seconds, bytes),
so a peer's ratio is peer / ours: "x faster" or "x smaller".

Later runners add workloads to WORKLOADS; benchmarks/ runs the same ones
under pytest-benchmark.  SCALING holds the series of --scaling: the cost
of one run, in time and resident memory, from 10^3 to 10^7 runs.
"""

import dataclasses
import functools
import gc
import importlib.metadata
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
from taskrunner import _bench_peers as peers

__all__ = [
    "Variant", "Target", "Workload", "WORKLOADS",
    "SCALING", "default_workers", "measure", "run_workload", "main",
]


# -- the model ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Variant:
    """One way of doing a workload's job.

    `run(data, workers)` returns the answer (for a timed workload) or
    `(figure, answer)` (for a workload that measures itself).  `requires`
    names modules that must be importable; `max_repeat` caps the repeats of
    a slow variant; `measure`, if given, replaces the workload's way of
    taking a sample for this variant.  `size_cap`, if given, is the most
    items a (very slow) variant is given in the default run, so that the
    whole table takes minutes: its figure is scaled up to the workload's
    size, so the ratio is one of throughputs; --full lifts it, except for
    `full_size_cap` (a peer that would take hours at the full size).
    `start_seconds` is about how long such a peer takes to start here (Ray,
    Prefect's server): --quick leaves it out unless --system names it."""
    name: str
    run: Callable
    requires: Tuple[str, ...] = ()
    max_repeat: Optional[int] = None
    measure: Optional[Callable] = None
    size_cap: Optional[int] = None
    full_size_cap: Optional[int] = None
    start_seconds: Optional[float] = None

    def missing(self):
        """The modules of `requires` that cannot be imported here."""
        return [module for module in self.requires if importlib.util.find_spec(module) is None]

    def available(self):
        return not self.missing()


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
    the spec's targets.  `prepare(size)` builds the shared input, untimed,
    of a multiple of `step` items (a DAG's layers); a `per_item` figure (bytes
    a run) is the same on fewer items, so it is not scaled to the size;
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
    step: int = 1
    per_item: bool = False

    @property
    def variants(self):
        return (self.ours,) + self.peers

    def variant(self, name):
        return next(v for v in self.variants if v.name == name)


class WrongAnswer(AssertionError):
    """A variant returned a different answer from the expected one."""


class NotFinished(Exception):
    """A variant could not finish the job (it ran out of its memory cap)."""


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Why a peer has no figures: not installed, or it could not start here."""
    reason: str


def default_workers():
    """The worker count every thread variant uses: ThreadPoolTaskRunner's
    default."""
    return min(32, (os.cpu_count() or 1) + 4)


DEFAULT_PROCESSES = 2   # the spec's process-pool targets are for 2 worker processes


def workers_for(workload, threads, processes):
    return processes if workload.processes else threads


@dataclasses.dataclass(frozen=True)
class Sizes:
    """The sizes of one bench run: each workload's quick or full size, and
    the items each variant is given of it: all of them with `full`, else at
    most the variant's size_cap (shrunk in proportion for a quick run)."""
    quick: bool = False
    full: bool = False

    def of(self, workload):
        return workload.quick_size if self.quick else workload.size

    def items(self, workload, variant):
        size = self.of(workload)
        cap = variant.full_size_cap if self.full else variant.size_cap
        if cap is None:
            return size
        if self.quick:
            cap = cap * workload.quick_size // workload.size
        return min(size, max(workload.step, cap - cap % workload.step))


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
    workload = {**WORKLOADS, **SCALING}[workload_name]
    data = workload.prepare(int(size))
    variant = workload.variant(variant_name)
    for module in variant.requires:     # a peer is timed at its job, not at its import
        importlib.import_module(module)
    if inner is measure_time:           # as warm_up() does for the other variants
        variant.run(workload.prepare(min(int(size), WARM_UP_ITEMS)), int(workers))
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


def dag_graph(edges):
    """The DAG as a dask graph: (the graph dict, the keys of its last layer)."""
    graph = {("n", 0, i): (first_node, i) for i in range(DAG_WIDTH)}
    for depth, layer in enumerate(edges, 1):
        for i, (a, b, c) in enumerate(layer):
            up = depth - 1
            graph[("n", depth, i)] = (node, ("n", up, a), ("n", up, b), ("n", up, c))
    return graph, [("n", len(edges), i) for i in range(DAG_WIDTH)]


def dag_dask(edges, workers):
    import dask.threaded

    graph, last = dag_graph(edges)
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


def map_joblib_threads(n, workers):
    import joblib

    return sum(joblib.Parallel(n_jobs=workers, backend="threading")(
        joblib.delayed(inc)(i) for i in range(n)))


# -- fan-out/fan-in and chain -------------------------------------------------
# How fast a result reaches the runs that take it as a parameter.

FAN_BASE = 7


def first():
    return FAN_BASE


def inc_by(x, base):
    return x + base


def total(xs):
    return sum(xs)


def fan_answer(n):
    """sum(i + FAN_BASE for i in range(n))."""
    return (n - 1) * n // 2 + FAN_BASE * n


def fan_out_in_ours(n, workers):
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        base = runner.submit(first, {})
        futures = [runner.submit(inc_by, {"x": i, "base": base}) for i in range(n)]
        return runner.submit(total, {"xs": futures}).result()


def fan_out_in_executor(n, workers):
    """By hand: the fan-out waits for first()'s value, the fan-in for every
    part's, in the submitting thread."""
    with ThreadPoolExecutor(max_workers=workers) as executor:
        base = executor.submit(first).result()
        futures = [executor.submit(inc_by, i, base) for i in range(n)]
        return executor.submit(total, [f.result() for f in futures]).result()


def fan_out_in_dask(n, workers):
    import dask.threaded

    graph = {"first": (first,)}
    graph.update({("part", i): (inc_by, i, "first") for i in range(n)})
    graph["total"] = (total, [("part", i) for i in range(n)])
    return dask.threaded.get(graph, "total", num_workers=workers)


def chain_ours(n, workers):
    with ThreadPoolTaskRunner(max_workers=workers) as runner:
        link = 0
        for _ in range(n):
            link = runner.submit(inc, {"x": link})
        return link.result()


def chain_executor(n, workers):
    """By hand: each submit waits for the one before."""
    with ThreadPoolExecutor(max_workers=workers) as executor:
        value = 0
        for _ in range(n):
            value = executor.submit(inc, value).result()
        return value


def chain_dask(n, workers):
    import dask.threaded

    graph = {("link", 0): (inc, 0)}
    graph.update({("link", i): (inc, ("link", i - 1)) for i in range(1, n)})
    return dask.threaded.get(graph, ("link", n - 1), num_workers=workers)


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


def distributed_submit(client, n):
    """n no-op client.submit, then client.gather of all: the raw Dask way."""
    return sum(client.gather([client.submit(inc, i, pure=False) for i in range(n)]))


def distributed_map(client, n):
    return sum(client.gather(client.map(inc, range(n), pure=False)))


def _dask_processes(workers):
    """The client of the LocalCluster both Dask variants of a row use: `workers`
    worker processes of one thread each (started by the warm-up run)."""
    return peers.dask_client(processes=True, workers=workers)


def dask_submit_ours(n, workers):
    """(seconds, answer) of n submits to a DaskTaskRunner, then their
    results (a FutureList gathers them in one call, as client.gather does)."""
    from taskrunner import DaskTaskRunner, FutureList

    with DaskTaskRunner(address=_dask_processes(workers).scheduler.address) as runner:
        runner.submit(inc, {"x": 0}).result()
        start = time.perf_counter()
        futures = FutureList([runner.submit(inc, {"x": i}) for i in range(n)])
        total = sum(futures.result())
        return time.perf_counter() - start, total


def dask_submit_client(n, workers):
    client = _dask_processes(workers)
    client.submit(inc, 0).result()
    start = time.perf_counter()
    total = distributed_submit(client, n)
    return time.perf_counter() - start, total


def dask_map_ours(n, workers):
    from taskrunner import DaskTaskRunner

    with DaskTaskRunner(address=_dask_processes(workers).scheduler.address) as runner:
        runner.submit(inc, {"x": 0}).result()
        start = time.perf_counter()
        total = sum(runner.map(inc, {"x": range(n)}).result())
        return time.perf_counter() - start, total


def dask_map_client(n, workers):
    client = _dask_processes(workers)
    client.submit(inc, 0).result()
    start = time.perf_counter()
    total = distributed_map(client, n)
    return time.perf_counter() - start, total


# -- peers started once: a LocalCluster on the thread rows, Ray, Prefect -----
# Their start (a cluster, Ray's processes, Prefect's server) happens in the
# variant's warm-up run and is not timed; see taskrunner._bench_peers.

def _dask_threads(workers):
    """A LocalCluster's client with one in-process worker of `workers`
    threads: dask distributed in the shape of a thread pool."""
    return peers.dask_client(processes=False, workers=workers)


def submit_distributed(n, workers):
    return distributed_submit(_dask_threads(workers), n)


def map_distributed(n, workers):
    return distributed_map(_dask_threads(workers), n)


def dag_distributed(edges, workers):
    graph, last = dag_graph(edges)
    return sum(_dask_threads(workers).get(graph, last))


def ray_calls(function, n, workers):
    """function(i) for i in range(n) as Ray tasks on `workers` CPUs, summed
    after one ray.get of all their references."""
    import ray

    remote = peers.ray_remote(function, workers)
    return sum(ray.get([remote.remote(i) for i in range(n)]))


def ray_timed(function):
    """A process-row variant of Ray's: (seconds, answer) of ray_calls, after
    a warm-up call on every CPU outside the clock (as the pools of the
    other variants are started first)."""
    def run(n, workers):
        ray_calls(function, 4 * workers, workers)
        start = time.perf_counter()
        total = ray_calls(function, n, workers)
        return time.perf_counter() - start, total
    return run


def cpu_map_ray(n, workers):
    return ray_calls(spin, n, workers)


def prefect_submits(prefect_task, n):
    return sum(f.result() for f in [prefect_task.submit(i) for i in range(n)])


def prefect_map(prefect_task, n):
    return sum(prefect_task.map(range(n)).result())


def in_prefect_flow(runner_name, job, function=inc):
    """A Prefect variant: (seconds, answer) of `job(task(function), n)` in the
    body of a @flow on prefect.task_runners.`runner_name` of `workers` workers, after
    a warm-up map that starts every worker.  The flow run's own creation
    and end (its records in the API server: seconds here) are not timed."""
    def run(n, workers):
        peers.prefect_api()     # before Prefect is imported: it sets Prefect's environment
        import prefect.task_runners
        from prefect import flow, task

        prefect_task = task(function)
        runner_class = getattr(prefect.task_runners, runner_name)

        @flow(task_runner=runner_class(max_workers=workers))
        def bench_flow():
            prefect_map(prefect_task, workers)
            start = time.perf_counter()
            total = job(prefect_task, n)
            return time.perf_counter() - start, total

        return bench_flow()
    return run


def _same(size):
    return size


THREAD_POOL = "ThreadPoolExecutor"
PROCESS_POOL = "ProcessPoolExecutor"
MP_POOL = "multiprocessing.Pool"
JOBLIB = "joblib (loky)"
JOBLIB_THREADS = "joblib (threading)"
DASK_THREADED = "dask threaded"
SERIAL = "serial loop"
DASK_CLIENT = "distributed.Client"
DISTRIBUTED = "dask LocalCluster"
PREFECT_THREADS = "Prefect ThreadPoolTaskRunner"
PREFECT_PROCESSES = "Prefect ProcessPoolTaskRunner"
RAY = "Ray"
STREAM_MAP = "taskrunner map()"
THREADPOOL_IMAP = "multiprocessing ThreadPool.imap"
POOL_IMAP = "multiprocessing.Pool.imap"

# The items of a very slow peer in the default run (--full: all of them),
# chosen from its cost a run on the 2-core machine so that a sample takes
# seconds; each of these peers is 50x or more slower than taskrunner there,
# except where a comment says otherwise.  Prefect costs 5-10 ms a task run
# in threads and far more in processes (each a run recorded by its API
# server): at full size it would take hours, so it is capped under --full too.
DASK_MAP_ITEMS = 10_000         # taskrunner's DaskTaskRunner.map: some 0.2 ms an item
DASK_CLIENT_ITEMS = 500         # the raw client's submit or map: some 3 ms an item
DISTRIBUTED_ITEMS = 500         # about 3 ms a task here, threads or processes
RAY_ITEMS = 2_000               # about 1-2 ms a task
PREFECT_ITEMS, PREFECT_FULL_ITEMS = 100, 2_000
PREFECT_PROCESS_ITEMS, PREFECT_PROCESS_FULL_ITEMS = 50, 500


def dask_threaded(run, max_repeat=2, size_cap=None):
    """`run` as the dask-threaded peer: each sample in a fresh process within
    MEMORY_CAP (its graph can outgrow the machine)."""
    return Variant(DASK_THREADED, run, requires=("dask",), max_repeat=max_repeat,
                   measure=in_fresh_process(measure_time, MEMORY_CAP), size_cap=size_cap)


def distributed_peer(run, size_cap=DISTRIBUTED_ITEMS):
    """`run` as the peer dask distributed, on a LocalCluster of one worker with
    the row's threads."""
    return Variant(DISTRIBUTED, run, requires=("distributed",), size_cap=size_cap)


def prefect_peer(runner_name, job, function=inc):
    """Prefect 3's `runner_name` (ThreadPoolTaskRunner or ProcessPoolTaskRunner)
    in a @flow, on a few items (see PREFECT_ITEMS), once: a flow run takes
    some 10 s here whatever its size (its records in the API server)."""
    caps = ((PREFECT_PROCESS_ITEMS, PREFECT_PROCESS_FULL_ITEMS) if "Process" in runner_name
            else (PREFECT_ITEMS, PREFECT_FULL_ITEMS))
    return Variant(f"Prefect {runner_name}", in_prefect_flow(runner_name, job, function),
                   requires=("prefect",), measure=measure_self, max_repeat=1,
                   size_cap=caps[0], full_size_cap=caps[1], start_seconds=30)


def ray_peer(run):
    """`run` as the peer Ray: local, with as many CPUs as the row's workers."""
    return Variant(RAY, run, requires=("ray",), size_cap=RAY_ITEMS, start_seconds=10)


WORKLOADS = {w.name: w for w in [
    Workload(
        "submit", "no-op tasks, submit each then result each",
        200_000, 10_000, _same, sum_of_incs,
        Variant("taskrunner", submit_ours),
        # ThreadPoolExecutor is some 20x slower here: capped for the time it takes.
        (Variant(THREAD_POOL, submit_executor, size_cap=20_000),
         distributed_peer(submit_distributed),
         prefect_peer("ThreadPoolTaskRunner", prefect_submits)),
        (Target(">= 10x ThreadPoolExecutor", THREAD_POOL, min_ratio=10),),
        measure_time),
    Workload(
        "map", "map(inc) over range(n), results in order",
        1_000_000, 50_000, _same, sum_of_incs,
        Variant("taskrunner", map_ours),
        (Variant(THREAD_POOL, map_executor, size_cap=100_000),
         # about 110 us an item here
         Variant(JOBLIB_THREADS, map_joblib_threads, requires=("joblib",), max_repeat=3,
                 size_cap=20_000),
         distributed_peer(map_distributed)),
        (Target(">= 10x ThreadPoolExecutor", THREAD_POOL, min_ratio=10),),
        measure_time),
    # Dask's threaded scheduler needs memory quadratic in this graph's size
    # here (0.9 GiB at 20,000 nodes, 3.7 GiB at 50,000): at 200,000 (--full)
    # it runs into MEMORY_CAP; the default run gives it 10,000 nodes, its
    # time scaled (kind to dask: its cost a node grows with the graph).
    Workload(
        "dag", f"layered DAG, {DAG_WIDTH} nodes a layer, 3 random upstreams each",
        200_000, 10_000, layered_dag, dag_answer,
        Variant("taskrunner", dag_ours),
        (dask_threaded(dag_dask, max_repeat=1, size_cap=10_000),
         distributed_peer(dag_distributed, size_cap=2 * DAG_WIDTH)),
        (Target(">= 50x dask threaded", DASK_THREADED, min_ratio=50),),
        measure_time, step=DAG_WIDTH),
    Workload(
        "dag-50k", "the same kind of DAG, smaller, so that dask finishes (with --full)",
        50_000, 5_000, layered_dag, dag_answer,
        Variant("taskrunner", dag_ours),
        (dask_threaded(dag_dask, max_repeat=1, size_cap=10_000),),
        (Target(">= 50x dask threaded", DASK_THREADED, min_ratio=50),),
        measure_time, step=DAG_WIDTH),
    # Dask's threaded scheduler takes about 25 us a node on either graph
    # here: 10,000 parts (some 1.5 s a run) give its throughput.
    Workload(
        "fan-out-in", "first(), n runs each taking its result, then one summing them all",
        100_000, 5_000, _same, fan_answer,
        Variant("taskrunner", fan_out_in_ours),
        # ThreadPoolExecutor is some 25x slower here: capped for the time it takes.
        (Variant(THREAD_POOL, fan_out_in_executor, size_cap=50_000),
         dask_threaded(fan_out_in_dask, size_cap=10_000)),
        (), measure_time),
    Workload(
        "chain", "n runs, each taking the one before as its parameter",
        20_000, 1_000, _same, _same,
        Variant("taskrunner", chain_ours),
        (Variant(THREAD_POOL, chain_executor),
         dask_threaded(chain_dask)),
        (), measure_time),
    Workload(
        "memory", "resident bytes per pending run, all pending at once",
        1_000_000, 50_000, _same, sum_of_incs,
        # One run each: the figure is the same to a few bytes from run to run.
        Variant("taskrunner", pending_memory_ours, max_repeat=1),
        (Variant(THREAD_POOL, pending_memory_executor, max_repeat=1, size_cap=200_000),),
        (Target("<= 300 B/run", max_figure=300),),
        in_fresh_process(measure_self), unit="B/run", per_item=True),
    # Streaming: imap over a generator, summed as results come.  The list
    # and future of each item of the peers' maps do not fit at 10,000,000
    # items everywhere: they get fewer, their figures scaled; so does ours
    # in the default run, for time (the memory rows give ours every item:
    # its memory does not grow with them).
    Workload(
        "stream", "ThreadPoolTaskRunner.imap(inc) over a generator, summed as results come",
        10_000_000, 500_000, _same, sum_of_incs,
        Variant("taskrunner", stream_ours, size_cap=2_000_000),
        (Variant(STREAM_MAP, stream_map_ours, size_cap=1_000_000),
         Variant(THREAD_POOL, stream_executor, max_repeat=1, size_cap=100_000),
         Variant(THREADPOOL_IMAP, stream_thread_pool, max_repeat=1, size_cap=200_000)),
        (Target(">= 1x the throughput of taskrunner map(range).result()", STREAM_MAP,
                min_ratio=1),),
        measure_time),
    Workload(
        "stream-memory", "peak resident growth (MiB) over the stream workload",
        10_000_000, 500_000, _same, sum_of_incs,
        Variant("taskrunner", stream_memory_ours, max_repeat=1),
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
         # joblib is some 15x slower here: capped for the time it takes.
         Variant(JOBLIB, proc_map_joblib, requires=("joblib",), max_repeat=3, size_cap=100_000),
         ray_peer(ray_timed(square)),
         prefect_peer("ProcessPoolTaskRunner", prefect_map, square)),
        (Target(">= 0.8x multiprocessing.Pool.map", MP_POOL, min_ratio=0.8),
         Target(">= 1x (streaming issue)", MP_POOL, min_ratio=1),
         Target(">= 50x ProcessPoolExecutor.map", PROCESS_POOL, min_ratio=50)),
        measure_self, processes=True),
    Workload(
        "proc-stream", "ProcessPoolTaskRunner.imap(square) over a generator, summed",
        10_000_000, 500_000, _same, sum_of_squares,
        Variant("taskrunner", proc_stream_ours, max_repeat=3, size_cap=2_000_000),
        (Variant(POOL_IMAP, proc_stream_pool, max_repeat=3, size_cap=2_000_000),),
        (Target(">= 1x Pool.imap (best chunksize)", POOL_IMAP, min_ratio=1),),
        measure_self, processes=True),
    Workload(
        "proc-stream-memory", "peak resident growth (MiB) of the parent over proc-stream",
        10_000_000, 500_000, _same, sum_of_squares,
        Variant("taskrunner", proc_stream_memory_ours, max_repeat=1),
        (Variant(POOL_IMAP, proc_stream_memory_pool, max_repeat=1, size_cap=2_000_000),),
        (Target("<= 64 MiB", max_figure=64),),
        in_fresh_process(measure_self), unit="MiB", processes=True),
    # Every variant but Ray is timed with its pool's start, on the full
    # 100,000 items: a figure scaled up from fewer would count the start
    # (some 0.3 s) as if it grew with the items.  Ours two runs and the
    # peers one, for time.
    Workload(
        "proc-cpu", "map of a CPU-bound task (about 50 us), pool start included",
        100_000, 5_000, _same, sum_of_spins,
        Variant("taskrunner", cpu_map_ours, max_repeat=2),
        (Variant(SERIAL, cpu_map_serial, max_repeat=1),
         Variant(MP_POOL, cpu_map_pool, max_repeat=1),
         Variant(JOBLIB, cpu_map_joblib, requires=("joblib",), max_repeat=1),
         ray_peer(cpu_map_ray)),
        (Target(">= 1.7x the serial loop", SERIAL, min_ratio=1.7),
         Target(">= 1.8x (streaming issue)", SERIAL, min_ratio=1.8)),
        measure_time, processes=True),
    Workload(
        "proc-submit", "no-op tasks in worker processes, submit each then result each",
        20_000, 2_000, _same, sum_of_incs,
        Variant("taskrunner", proc_submit_ours),
        (Variant(PROCESS_POOL, proc_submit_executor, size_cap=5_000),),
        (Target(">= 5x ProcessPoolExecutor", PROCESS_POOL, min_ratio=5),),
        measure_self, processes=True),
    Workload(
        "proc-first", "from entering a new pool to the first result",
        1, 1, _same, _same,
        Variant("taskrunner", first_result_ours),
        (Variant(PROCESS_POOL, first_result_executor),),
        (Target("<= 1.5x ProcessPoolExecutor's", PROCESS_POOL, min_ratio=1 / 1.5),),
        measure_self, processes=True),
    # The Dask runner against the client it drives, on the same LocalCluster
    # (2 worker processes, one thread each), started untimed.  Dask costs
    # milliseconds a task on a small machine: the raw client gets a few
    # thousand items, its time scaled to the workload's size.
    Workload(
        "dask-submit", "DaskTaskRunner: no-op submits, then their results",
        10_000, 1_000, _same, sum_of_incs,
        Variant("taskrunner", dask_submit_ours, requires=("distributed",), max_repeat=3),
        (Variant(DASK_CLIENT, dask_submit_client, requires=("distributed",), max_repeat=3,
                 size_cap=DASK_CLIENT_ITEMS),),
        (Target("<= 1.2x client.submit + gather", DASK_CLIENT, min_ratio=1 / 1.2),),
        measure_self, processes=True),
    Workload(
        "dask-map", "DaskTaskRunner.map(inc) over range(n), results in order",
        100_000, 5_000, _same, sum_of_incs,
        Variant("taskrunner", dask_map_ours, requires=("distributed",), max_repeat=3,
                size_cap=DASK_MAP_ITEMS),
        (Variant(DASK_CLIENT, dask_map_client, requires=("distributed",), max_repeat=3,
                 size_cap=DASK_CLIENT_ITEMS),),
        (Target(">= 1x client.map + gather", DASK_CLIENT, min_ratio=1),),
        measure_self, processes=True),
]}


# -- running and reporting ----------------------------------------------------

WARM_UP_ITEMS = 100


def warm_up(workload, variant, items, workers):
    """One untimed run of `variant` on a few items before its samples: its
    imports, and the start of a peer that runs as a service (a LocalCluster,
    Ray, Prefect's server), which its samples then reuse.  A variant sampled
    in a fresh process warms up there instead (_child)."""
    if (variant.measure or workload.measure) in (measure_time, measure_self):
        variant.run(workload.prepare(min(items, WARM_UP_ITEMS)), workers)


def initial_samples(variant, quick, named):
    """A variant's list of samples to come, or why it will have none."""
    if not variant.available():
        return Skipped(not_installed(variant))
    if quick and variant.start_seconds and not named:
        return Skipped(f"with --quick (it starts in about {variant.start_seconds:.0f} s); "
                       f"name it with --system")
    return []


def run_workload(workload, sizes, workers, repeat, log=None, systems=None):
    """Measure every available variant of `workload` (ours and, if `systems`
    is given, only the peers it names), after a warm-up each, `repeat`
    times each (interleaved, capped by each variant's max_repeat), each on
    sizes.items(workload, variant) items, its figure scaled to the
    workload's size.  Returns a dict: variant name -> list of figures, the
    Skipped reason of a variant not run, or the NotFinished error of one
    that could not do the job; a peer left out by `systems` is not in it."""
    log = log or (lambda message: None)
    size = sizes.of(workload)
    chosen = [v for v in workload.variants
              if v is workload.ours or systems is None or v.name.lower() in systems]
    inputs = {}         # items -> (data, expected)
    samples = {v.name: initial_samples(v, quick=sizes.quick, named=systems is not None)
               for v in chosen}
    try:
        for round_ in range(repeat):
            for variant in chosen:
                figures = samples[variant.name]
                runs = min(repeat, variant.max_repeat or repeat)
                if not isinstance(figures, list) or round_ >= runs:
                    continue
                items = sizes.items(workload, variant)
                if round_ == 0:
                    log(f"{workload.name}: {variant.name} warm-up")
                    try:
                        warm_up(workload, variant, items, workers)
                    except Exception as error:
                        if variant is workload.ours:
                            raise
                        # A peer that cannot start here (say, Ray without the
                        # shared memory it needs) is reported, not fatal.
                        samples[variant.name] = Skipped(f"failed to start: {error!r:.200}")
                        log(f"{workload.name}: {variant.name}: {samples[variant.name].reason}")
                        continue
                if items not in inputs:
                    data = workload.prepare(items)
                    inputs[items] = (data, workload.expected(data))
                data, expected = inputs[items]
                log(f"{workload.name}: {variant.name} run {round_ + 1} of {runs}, "
                    f"{items:,} items ...")
                scale = 1 if workload.per_item else size / items
                try:
                    figures.append(measure(workload, variant, data, items, workers, expected)
                                   * scale)
                except NotFinished as error:
                    samples[variant.name] = error
                    log(f"{workload.name}: {variant.name} run {round_ + 1}: {error}")
                    continue
                log(f"{workload.name}: {variant.name} run {round_ + 1}: "
                    f"{format_figure(figures[-1], workload.unit)}")
    finally:
        # A cluster's, Ray's or Prefect's processes would hold memory and CPU
        # (their idle loops) that the next rows need.
        peers.close_all()
    return samples


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


def machine_line(info):
    return (f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, "
            f"Python {info['python']}, {info['os']}")


PEER_PACKAGES = ("dask", "distributed", "joblib", "prefect", "ray", "matplotlib")
INSTALL_PEERS = "pip install 'taskrunner[peers]'"


def not_installed(variant):
    """Why `variant` is skipped when it is missing: which modules, and the extra."""
    return f"not installed ({', '.join(variant.missing())}): {INSTALL_PEERS}"


def peer_versions():
    """The installed version of each peer's package (and of matplotlib, which
    --plot needs), or "not installed": figures depend on them."""
    versions = {}
    for package in PEER_PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def versions_line(versions, python):
    return f"peers: {', '.join(f'{p} {v}' for p, v in versions.items())}; Python {python}"


def summarize(workload, sizes, samples):
    """A JSON-ready dict of a workload: each measured variant's samples,
    median, min, max, throughput (items a second, for a timed workload) and
    the items it was given, or why it has none; the peers' ratios and the
    targets.  A peer that could not finish counts as infinitely slower."""
    size = sizes.of(workload)
    variants = {}
    for name, figures in samples.items():
        items = sizes.items(workload, workload.variant(name))
        if isinstance(figures, list):
            median = statistics.median(figures)
            variants[name] = {
                "samples": figures, "median": median, "min": min(figures), "max": max(figures),
                "throughput": size / median if workload.unit == "s" else None, "items": items}
        elif isinstance(figures, Skipped):
            variants[name] = {"samples": [], "skipped": figures.reason}
        else:
            variants[name] = {"samples": [], "not_finished": str(figures), "items": items}
    ours = variants[workload.ours.name].get("median")
    peers = {name: math.inf if "not_finished" in entry else entry["median"]
             for name, entry in variants.items()
             if name != workload.ours.name and "skipped" not in entry}
    return {
        "workload": workload.name,
        "description": workload.description,
        "unit": workload.unit,
        "size": size,
        "variants": variants,
        "ratios": {name: theirs / ours for name, theirs in peers.items()} if ours else {},
        "targets": [{"target": t.text, "met": t.met(ours, peers) if ours else None}
                    for t in workload.targets],
    }


def format_rate(per_second):
    """Items a second, to about two significant digits: "2.5M/s"."""
    scale, suffix = next(((s, x) for s, x in ((1e9, "G"), (1e6, "M"), (1e3, "k"))
                          if per_second >= s), (1, ""))
    value = per_second / scale
    return f"{value:.{1 if value < 10 else 0}f}{suffix}/s"


def format_spread(low, high, unit):
    """"8.1–9.4 ms": the unit once when both ends have the same."""
    low, high = format_figure(low, unit), format_figure(high, unit)
    number, _, low_unit = low.partition(" ")
    return f"{number if low_unit == high.partition(' ')[2] else low}–{high}"


def figure_cells(workload, entry, size, repeat):
    """The median (with notes), min–max and throughput cells of a variant."""
    if "skipped" in entry:
        return [f"skipped: {entry['skipped']}", "-", "-"]
    if "not_finished" in entry:
        return [entry["not_finished"], "-", "-"]
    notes = []
    if len(entry["samples"]) != repeat:
        notes.append(f"{len(entry['samples'])} run{'s' * (len(entry['samples']) > 1)}")
    items = entry["items"]
    if items != size:
        notes.append(f"on {items:,} items" if workload.per_item else f"scaled from {items:,} items")
    median = format_figure(entry["median"], workload.unit)
    return [
        f"{median} [{'; '.join(notes)}]" if notes else median,
        format_spread(entry["min"], entry["max"], workload.unit),
        "-" if entry["throughput"] is None else format_rate(entry["throughput"]),
    ]


def table_rows(workload, summary, repeat):
    """The table's rows for one workload, ours first, then one per peer; a
    peer's targets sit on its row, absolute ones on ours."""
    size = summary["size"]
    targets = list(zip(workload.targets, summary["targets"]))
    rows = []
    measured = [v for v in workload.variants if v.name in summary["variants"]]
    for index, variant in enumerate(measured):
        peer = None if variant is workload.ours else variant.name
        mine = [(t, m["met"]) for t, m in targets if t.peer == peer]
        ratio = summary["ratios"].get(peer)
        rows.append([
            workload.name if index == 0 else "",
            f"{size:,}" if index == 0 else "",
            variant.name,
            *figure_cells(workload, summary["variants"][variant.name], size, repeat),
            "-" if ratio is None else "did not finish" if ratio == math.inf else f"{ratio:.1f}x",
            "; ".join(t.text for t, _ in mine) or "-",
            ", ".join({True: "yes", False: "NO", None: "n/a"}[met] for _, met in mine) or "-",
        ])
    return rows


HEADER = ["workload", "size", "system", "median", "min–max", "throughput", "peer/ours",
          "target", "met"]


def format_table(header, rows):
    widths = [max(len(row[i]) for row in [header] + rows) for i in range(len(header))]
    line = lambda row: "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(header), rule] + [line(row) for row in rows])


def plot_throughput(results, path):
    """A PNG bar chart of throughput (items a second, log scale): a group
    per timed workload, a bar per system, one colour per system throughout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in results if r["unit"] == "s"]
    bars = [[(name, v["throughput"]) for name, v in r["variants"].items() if v.get("throughput")]
            for r in timed]
    systems = list(dict.fromkeys(name for group in bars for name, _ in group))
    colours = {name: plt.cm.tab20(i % 20) for i, name in enumerate(systems)}
    figure, axes = plt.subplots(figsize=(max(8, 1.5 * len(timed)), 6))
    labelled = set()
    for place, group in enumerate(bars):
        width = 0.8 / max(1, len(group))
        for slot, (name, rate) in enumerate(group):
            axes.bar(place - 0.4 + width * (slot + 0.5), rate, width, color=colours[name],
                     label="_" if name in labelled else name)
            labelled.add(name)
    axes.set_xticks(range(len(timed)), [r["workload"] for r in timed], rotation=30, ha="right")
    axes.set_yscale("log")
    axes.set_ylabel("items per second (higher is better)")
    axes.set_title("taskrunner bench: throughput per workload and system")
    axes.grid(axis="y", which="major", alpha=0.3)
    # Beside the axes, not on them: a legend inside covers the last groups' bars.
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.005, 1))
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- scaling: the cost of a run from 10^3 to 10^7 runs -----------------------

SCALING_SIZES = tuple(10**k for k in range(3, 8))


def cost_per_run(job, n, workers):
    """([microseconds, resident bytes] per run, answer) of `job(n, workers)`:
    its time, and the peak RSS growth while it ran (every run alive at the
    peak), each divided by its n runs."""
    def timed():
        start = time.perf_counter()
        answer = job(n, workers)
        return time.perf_counter() - start, answer

    mib, (seconds, answer) = peak_rss_growth(timed)
    return [seconds / n * 1e6, mib * 2**20 / n], answer


def per_run(job):
    """The table's `job` as a scaling variant, returning cost_per_run's figures."""
    return functools.partial(cost_per_run, job)


# The table's submit and map jobs (pool start and shutdown included, so the
# smallest sizes carry them) at each of SCALING_SIZES up to the series' size
# (its quick_size with --quick), each sample in a fresh process.  Here a
# variant's size_cap is the most runs it is given, not a size it is scaled
# from.
SCALING = {w.name: w for w in [
    Workload(
        "scaling-submit", "no-op tasks, submit each then result each",
        SCALING_SIZES[-1], 100_000, _same, sum_of_incs,
        Variant("taskrunner", per_run(submit_ours)),
        (Variant(THREAD_POOL, per_run(submit_executor), size_cap=100_000),),
        (), in_fresh_process(measure_self, MEMORY_CAP), unit="us/run, B/run"),
    Workload(
        "scaling-map", "map(inc) over range(n), then result()",
        SCALING_SIZES[-1], 100_000, _same, sum_of_incs,
        Variant("taskrunner", per_run(map_ours)),
        (Variant(THREAD_POOL, per_run(map_executor), size_cap=100_000),),
        (), in_fresh_process(measure_self, MEMORY_CAP), unit="us/run, B/run"),
]}


@dataclasses.dataclass(frozen=True)
class ScalingPoint:
    """One system at one size of a scaling series: its samples, each
    (microseconds, resident bytes) per run, or why it has none."""
    series: str
    runs: int
    system: str
    samples: Tuple[Tuple[float, float], ...] = ()
    skipped: Optional[str] = None

    def median(self, index):
        return statistics.median(s[index] for s in self.samples) if self.samples else None

    def as_dict(self):
        return dict(dataclasses.asdict(self),
                    us_per_run=self.median(0), bytes_per_run=self.median(1))


def run_scaling(series, quick, workers, repeat, log):
    """A ScalingPoint per size and system of each series, `repeat` samples each."""
    points = []
    for workload in series:
        most = workload.quick_size if quick else workload.size
        for runs in (n for n in SCALING_SIZES if n <= most):
            for variant in workload.variants:
                if runs > (variant.size_cap or runs):
                    continue
                samples, skipped = [], None if variant.available() else not_installed(variant)
                try:
                    while not skipped and len(samples) < repeat:
                        samples.append(tuple(measure(workload, variant, runs, runs, workers,
                                                     workload.expected(runs))))
                except NotFinished as error:
                    skipped = str(error)
                point = ScalingPoint(workload.name, runs, variant.name, tuple(samples), skipped)
                log(f"{workload.name}: {variant.name} {runs:,} runs: "
                    f"{skipped or scaling_cells(point)}")
                points.append(point)
    return points


def scaling_cells(point):
    """The microseconds (median and min–max) and resident bytes of a point."""
    if point.skipped:
        return [f"skipped: {point.skipped}", "-", "-"]
    us = [s[0] for s in point.samples]
    return [f"{point.median(0):.3g} µs", f"{min(us):.3g}–{max(us):.3g} µs",
            f"{point.median(1):.0f} B"]


SCALING_HEADER = ["series", "runs", "system", "per run", "min–max", "resident per run"]


def scaling_rows(points):
    return [[p.series, f"{p.runs:,}", p.system, *scaling_cells(p)] for p in points]


def plot_scaling(points, path):
    """A PNG of microseconds and resident bytes per run against the number
    of runs (log x), a line per series and system."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (time_axes, memory_axes) = plt.subplots(1, 2, figsize=(13, 5.5))
    lines = {}
    for point in points:
        if not point.skipped:
            lines.setdefault((point.series, point.system), []).append(point)
    for (series, system), line in lines.items():
        label = f"{series.removeprefix('scaling-')}: {system}"
        runs = [p.runs for p in line]
        time_axes.plot(runs, [p.median(0) for p in line], marker="o", label=label)
        memory_axes.plot(runs, [p.median(1) for p in line], marker="o", label=label)
    for axes, what in ((time_axes, "microseconds per run"),
                       (memory_axes, "peak resident bytes per run")):
        axes.set_xscale("log")
        axes.set_xlabel("runs")
        axes.set_ylabel(f"{what} (lower is better)")
        axes.grid(which="major", alpha=0.3)
        axes.legend(fontsize="small")
    time_axes.set_yscale("log")
    figure.suptitle("taskrunner bench --scaling: cost per run")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# -- the command -------------------------------------------------------------

def add_arguments(parser):
    parser.add_argument("--quick", action="store_true",
                        help="about 1/20 of the sizes, for smoke runs (same code path), "
                             "one run each unless --repeat is given")
    parser.add_argument("--full", action="store_true",
                        help="every peer on the workload's full size (the default run gives "
                             "very slow peers fewer items and scales their figures, marked; "
                             "this can take hours)")
    parser.add_argument("--repeat", type=int, metavar="N",
                        help=f"runs of each variant after its warm-up; the table shows "
                             f"medians (default {DEFAULT_REPEAT}, 1 with --quick; slow peers "
                             f"may run fewer times, marked in the table)")
    parser.add_argument("--workload", "--only", dest="workload", metavar="NAME[,NAME]",
                        help=f"run only these workloads, of: {', '.join(WORKLOADS)}")
    parser.add_argument("--system", metavar="NAME[,NAME]",
                        help="measure only these peers (taskrunner always runs: the ratios "
                             "are to it), of: " + ", ".join(system_names()))
    parser.add_argument("--workers", type=int, default=default_workers(), metavar="N",
                        help="worker threads for every thread variant (default %(default)s, "
                             "ThreadPoolTaskRunner's default)")
    parser.add_argument("--processes", type=int, default=DEFAULT_PROCESSES, metavar="N",
                        help="worker processes for every process variant (default "
                             "%(default)s, as in the spec's targets)")
    parser.add_argument("--json", metavar="PATH", help="also write the raw figures here")
    parser.add_argument("--plot", metavar="PATH",
                        help="also chart the figures in a PNG here (needs matplotlib)")
    parser.add_argument("--scaling", action="store_true",
                        help="instead of the table, the cost per run of submit and map from "
                             f"{SCALING_SIZES[0]:,} to {SCALING_SIZES[-1]:,} runs "
                             "(--quick: to 100,000); --workload and --system do not apply")


DEFAULT_REPEAT = 3


def system_names():
    """Every peer's name, in the order of first appearance."""
    return list(dict.fromkeys(p.name for w in WORKLOADS.values() for p in w.peers))


def parse_names(text, known, what):
    """The names of a comma-separated option, in `known`'s spelling (matched
    without regard to case); raises ValueError naming any unknown."""
    by_lower = {name.lower(): name for name in known}
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name.lower() not in by_lower]
    if unknown:
        raise ValueError(f"unknown {what}(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [by_lower[name.lower()] for name in names]


def progress_log():
    """The progress line: what is running, with the time since the start, on stderr."""
    start = time.monotonic()

    def log(message):
        minutes, seconds = divmod(int(time.monotonic() - start), 60)
        print(f"  [{minutes}:{seconds:02d}] {message}", file=sys.stderr, flush=True)
    return log


def main(args):
    """Run the selected workloads (or the scaling series) and print the
    table; returns the exit code."""
    try:
        names = parse_names(args.workload, list(WORKLOADS), "workload") if args.workload \
            else list(WORKLOADS)
        systems = ({name.lower() for name in parse_names(args.system, system_names(), "system")}
                   if args.system else None)
    except ValueError as error:
        print(error, file=sys.stderr)
        return 2
    repeat = args.repeat or (1 if args.quick else DEFAULT_REPEAT)
    if repeat < 1 or args.workers < 1 or args.processes < 1:
        print("--repeat, --workers and --processes must be at least 1", file=sys.stderr)
        return 2
    if args.plot and importlib.util.find_spec("matplotlib") is None:
        print("--plot needs matplotlib: pip install 'taskrunner[bench]'", file=sys.stderr)
        return 2
    sizes = Sizes(quick=args.quick, full=args.full)
    info, versions = machine(), peer_versions()
    print(machine_line(info))
    print(versions_line(versions, info["python"]))
    mode = ("QUICK sizes (targets are for the full sizes)" if args.quick
            else "FULL: every peer on every item" if args.full
            else "very slow peers on fewer items, scaled (marked); --full for all")
    print(f"workers: {args.workers} threads or {args.processes} processes for every variant; "
          f"repeat: {repeat}; {mode}", flush=True)
    log = progress_log()
    try:
        if args.scaling:
            points = run_scaling(SCALING.values(), args.quick, args.workers, repeat, log)
            table = format_table(SCALING_HEADER, scaling_rows(points))
            footer = (f"Figures are medians of {repeat} runs: time and peak resident growth "
                      f"per run, pool start and shutdown included; lower is better.")
            figures = {"scaling": [p.as_dict() for p in points]}
            plot = lambda path: plot_scaling(points, path)
        else:
            rows, results = [], []
            for name in names:
                workload = WORKLOADS[name]
                workers = workers_for(workload, args.workers, args.processes)
                samples = run_workload(workload, sizes, workers, repeat, log, systems)
                summary = summarize(workload, sizes, samples)
                results.append(summary)
                rows += table_rows(workload, summary, repeat)
            table = format_table(HEADER, rows)
            footer = (f"Figures are medians of {repeat} runs unless marked, each after a "
                      f"warm-up run; lower is better; peer/ours is how many times faster (or "
                      f"smaller) taskrunner is. The start of a peer that runs as a service "
                      f"(a dask LocalCluster, Ray, Prefect's API server) is in its warm-up, "
                      f"not timed; Prefect is timed inside its flow's body.")
            figures = {"workloads": results}
            plot = lambda path: plot_throughput(results, path)
    finally:
        peers.close_all()
    print()
    print(table)
    print(f"\n{footer}")
    if args.plot:
        plot(args.plot)
        print(f"chart: {args.plot}")
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"machine": info, "machine_line": machine_line(info),
                       "peer_versions": versions, "workers": args.workers,
                       "processes": args.processes, "repeat": repeat, "quick": args.quick,
                       "full": args.full, **figures}, out, indent=2)
    return 0
