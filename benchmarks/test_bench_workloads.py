"""The workloads of taskrunner.bench (ours and every peer, thread and
process pools) under pytest-benchmark, for tracking regressions:

    python -m pytest benchmarks/ --benchmark-only --benchmark-autosave
    python -m pytest benchmarks/ --benchmark-only --benchmark-compare

The command `python -m taskrunner bench` itself is tested in
tests/test_bench_cli.py."""

import gc
import statistics

import pytest

from taskrunner import bench

CASES = [pytest.param(workload, variant, id=f"{workload.name}-{variant.name}")
         for workload in bench.WORKLOADS.values() for variant in workload.variants]
ROUNDS = 3


@pytest.mark.parametrize("workload, variant", CASES)
def test_workload(benchmark, workload, variant, workers, processes, full_size):
    """Each round does the whole job and must give the expected answer.
    Timed workloads are timed by pytest-benchmark; the others (memory, and
    the variants that time themselves after starting their pool) record
    their own figure, median of the rounds, in extra_info."""
    if not variant.available():
        pytest.skip(f"{variant.name} needs {', '.join(variant.requires)}")
    size = bench.Sizes(quick=not full_size).items(workload, variant)
    workers = bench.workers_for(workload, workers, processes)
    # Imports, and a peer's service (a LocalCluster, Ray, Prefect's server)
    # started, before the first timed round, as in the table.
    bench.warm_up(workload, variant, size, workers)
    data = workload.prepare(size)
    expected = workload.expected(data)
    benchmark.group = workload.name
    benchmark.extra_info.update(size=size, workers=workers)
    figures = []

    def timed_round():
        assert variant.run(data, workers) == expected

    def measured_round():
        try:
            figures.append(bench.measure(workload, variant, data, size, workers, expected))
        except bench.NotFinished as error:
            benchmark.extra_info["not_finished"] = str(error)

    def setup():
        gc.collect()

    timed = (variant.measure or workload.measure) is bench.measure_time
    benchmark.pedantic(timed_round if timed else measured_round, setup=setup,
                       rounds=min(ROUNDS, variant.max_repeat or ROUNDS), iterations=1)
    if figures:
        benchmark.extra_info[workload.unit] = statistics.median(figures)


@pytest.fixture(autouse=True)
def close_peers():
    """Stop the peers' services (clusters, Ray, Prefect's server) after each
    test, as the table does after each row: their idle processes would take
    CPU from the tests after them."""
    yield
    bench.peers.close_all()
