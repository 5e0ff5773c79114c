"""Shared fixtures for the conformance suite.

``runner_factory`` is parametrised over every runner class the suite applies
to.  To run the suite against another runner, add ONE line to ``RUNNERS``
below (the factory functions for the later runners are already here).

``inprocess_runner_factory`` is the same but restricted to runners that run
tasks inside the test process (closures over threading objects, tasks that
capture the runner itself and submit to it, identity of passed objects).
"""

import os
import threading
import uuid

import pytest
from hypothesis import HealthCheck
from hypothesis import settings as hypothesis_settings


class RunnerSpec:
    """How to build one kind of runner for the suite.

    Calling the spec returns a new, unentered runner.  ``max_workers`` is the
    number of tasks that may run at once (translated for runners that spell it
    differently).  ``name`` is the expected ``TaskRunner.name``.
    """

    def __init__(self, id, make, name, in_process, requires=None):
        self.id = id
        self._make = make
        self.name = name
        self.in_process = in_process
        self.requires = requires  # a module to import, else the spec is skipped

    def __call__(self, max_workers=None):
        return self._make(max_workers)

    def __repr__(self):
        return f"RunnerSpec({self.id})"


def _threadpool(max_workers):
    from taskrunner import ThreadPoolTaskRunner

    return ThreadPoolTaskRunner(max_workers=max_workers)


def _processpool(max_workers):  # issue 3
    from taskrunner import ProcessPoolTaskRunner

    return ProcessPoolTaskRunner(max_workers=max_workers or 2)


def _dask_local(max_workers, processes=False):  # issue 4 (embedded LocalCluster)
    from taskrunner import DaskTaskRunner

    # The runner starts a cluster of its own.  Its worker runs in this
    # process (threads): starting a worker process would cost each of the
    # ~150 tests using this runner 1.5 s more, and "dask-cluster" runs the
    # same tests on worker processes started apart.  Tests about results
    # that cannot leave a worker process use DASK_LOCAL_PROCESSES.
    return DaskTaskRunner(
        cluster_kwargs={
            "n_workers": 1,
            "threads_per_worker": max_workers or 4,
            "processes": processes,
            "dashboard_address": None,
        }
    )


def _dask_cluster(max_workers):  # issue 4 (a real cluster, started by dask_cluster.py)
    from taskrunner import DaskTaskRunner

    # A cluster of its own for each max_workers, so that exactly that many
    # tasks can run at once; started on first use, shared by the session.
    return DaskTaskRunner(address=_cluster_pool().get(max_workers).address)


RUNNERS = [
    RunnerSpec("threadpool", _threadpool, "threadpool", in_process=True),
    RunnerSpec("processpool", _processpool, "processpool", in_process=False),
    RunnerSpec("dask", _dask_local, "dask", in_process=False, requires="distributed"),
    RunnerSpec("dask-cluster", _dask_cluster, "dask", in_process=False, requires="distributed"),
]

# The embedded cluster with a worker process, for what only a process shows.
DASK_LOCAL_PROCESSES = RunnerSpec(
    "dask-processes", lambda max_workers: _dask_local(max_workers, processes=True), "dask",
    in_process=False, requires="distributed")


@pytest.fixture(params=RUNNERS, ids=lambda spec: spec.id)
def runner_factory(request):
    """A callable ``(max_workers=None) -> new unentered runner``."""
    if request.param.requires:
        pytest.importorskip(request.param.requires)
    return request.param


# ------------------------------------------------------------- dask clusters

_dask_clusters = None  # the session's ClusterPool, made on first use


@pytest.fixture(scope="session", autouse=True)
def _stop_dask_clusters():
    """Stop the real Dask clusters the session started, at its end."""
    yield
    if _dask_clusters is not None:
        _dask_clusters.stop_all()


@pytest.fixture(scope="session")
def dask_clusters():
    """The session's real Dask clusters (``dask_cluster.ClusterPool``)."""
    return _cluster_pool()


def _cluster_pool():
    global _dask_clusters
    if _dask_clusters is None:
        from dask_cluster import ClusterPool

        _dask_clusters = ClusterPool()
    return _dask_clusters


@pytest.fixture(
    params=[spec for spec in RUNNERS if spec.in_process], ids=lambda spec: spec.id
)
def inprocess_runner_factory(request):
    """Like runner_factory, only for runners whose tasks run in this process."""
    return request.param


@pytest.fixture(
    params=[spec for spec in RUNNERS if not spec.in_process], ids=lambda spec: spec.id
)
def remote_runner_factory(request):
    """Like runner_factory, only for runners that run tasks in other
    processes (what travels must be pickled)."""
    if request.param.requires:
        pytest.importorskip(request.param.requires)
    return request.param


# ---------------------------------------------------------------- file gates


class Gate:
    """A one-shot gate that tasks in any process can wait on (a file).

    Usable as a context manager whose exit opens the gate, so that
    ``with runner_factory() as r, make_gate() as g:`` opens the gate before the
    runner's exit waits for the runs (exit runs right to left).
    """

    def __init__(self, path):
        self.path = str(path)

    def open(self):
        with open(self.path, "a"):
            pass

    def open_after(self, seconds):
        timer = threading.Timer(seconds, self.open)
        timer.daemon = True
        timer.start()
        return timer

    def is_open(self):
        return os.path.exists(self.path)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.open()
        return False


@pytest.fixture
def make_gate(tmp_path):
    gates = []

    def factory():
        gate = Gate(tmp_path / f"gate-{uuid.uuid4().hex}")
        gates.append(gate)
        return gate

    yield factory
    for gate in gates:  # never leave a task waiting after the test
        gate.open()


@pytest.fixture
def make_path(tmp_path):
    """Fresh, not yet existing file paths (markers, logs)."""

    def factory(stem="f"):
        return str(tmp_path / f"{stem}-{uuid.uuid4().hex}")

    return factory


# ------------------------------------------------------------- one kind only


@pytest.fixture
def runner_specs():
    """Every RunnerSpec by id, for tests written for one kind of runner
    (the stress tests pick the thread, process and Dask runners by id)."""
    return {spec.id: spec for spec in RUNNERS}


# ------------------------------------------------------- hypothesis profiles
#
# "ci" (the default): the state machines of test_graph_model.py try 200
# examples.  "long", by hand: `python -m pytest tests/test_graph_model.py
# --hypothesis-profile=long` tries 20,000 (see the README's Reliability
# section for what a long run takes and found).

_profile_defaults = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
hypothesis_settings.register_profile("ci", max_examples=200, **_profile_defaults)
hypothesis_settings.register_profile("long", max_examples=20_000, **_profile_defaults)


def pytest_configure(config):
    # hypothesis's own plugin loads a profile named by --hypothesis-profile;
    # without one, the suite's default is "ci".
    if not config.getoption("--hypothesis-profile", None):
        hypothesis_settings.load_profile("ci")
