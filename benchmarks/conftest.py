"""pytest-benchmark runs of the workloads in taskrunner.bench.

Sizes are the bench's quick sizes unless TASKRUNNER_BENCH_SIZE=full; the
table of `python -m taskrunner bench` is the figure of record.
"""

import os

import pytest

from taskrunner import bench


def pytest_addoption(parser):
    parser.addoption("--bench-workers", type=int, default=bench.default_workers(),
                     help="worker threads for every thread variant (default: the runner's default)")
    parser.addoption("--bench-processes", type=int, default=bench.DEFAULT_PROCESSES,
                     help="worker processes for every process variant (default: %(default)s)")


@pytest.fixture(scope="session")
def workers(request):
    return request.config.getoption("--bench-workers")


@pytest.fixture(scope="session")
def processes(request):
    return request.config.getoption("--bench-processes")


@pytest.fixture(scope="session")
def full_size():
    return os.environ.get("TASKRUNNER_BENCH_SIZE", "quick") == "full"
