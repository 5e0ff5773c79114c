"""DaskTaskRunner: what is specific to running on a Dask cluster.

The shared semantics are in test_conformance.py, run against an embedded
LocalCluster ("dask") and a real cluster ("dask-cluster").  Here: the
settings, the optional dependency, the cluster's lifetime, results staying
on the cluster, batching, worker loss, and cancelling runs already handed
to Dask.  Real clusters come from the session's pool (conftest.py,
dask_cluster.py); tests that kill workers wait for the nannies to bring
them back, so the next test gets the whole cluster.
"""

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest

from taskrunner import CancelledRun, CrashedRun, TaskRunner, TaskRunnerError, UpstreamTaskError

import runner_tasks as rt
from harness import running
from runner_tasks import read_lines, wait_path

distributed = pytest.importorskip("distributed")

from distributed.diagnostics.plugin import SchedulerPlugin  # noqa: E402

from taskrunner import DaskTaskRunner  # noqa: E402

pytestmark = pytest.mark.timeout(120)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A LocalCluster with its workers in this process: quick to start, for the
# tests about settings and lifetime.
THREADED = {"n_workers": 1, "threads_per_worker": 2, "processes": False,
            "dashboard_address": None}


# ----------------------------------------------------------------- tasks


class Tracked:
    """A value that appends this process's pid to `log` whenever it is
    unpickled: a record of every process it was moved to."""

    def __init__(self, value, log):
        self.value = value
        self.log = log

    def __reduce__(self):
        return _unpickle_tracked, (self.value, self.log)


def _unpickle_tracked(value, log):
    rt.append_line(log, os.getpid())
    return Tracked(value, log)


def make_tracked(value, log):
    return Tracked(value, log)


def value_of(tracked):
    return tracked.value + 1


def pid_of_worker():
    return os.getpid()


def killed_once(i, pids, gate):
    """Item 0 records its pid and blocks on its first attempt (the test
    kills its worker); every other attempt and item returns at once."""
    rt.append_line(pids, f"{i} {os.getpid()}")
    if i == 0 and sum(line.startswith("0 ") for line in read_lines(pids)) == 1:
        wait_path(gate, 60)
    return i * 10


def kill_my_worker():
    os.kill(os.getpid(), signal.SIGKILL)


class Unpicklable(Exception):
    def __init__(self, lock):
        super().__init__("holds a lock")
        self.lock = lock


def raise_unpicklable():
    raise Unpicklable(threading.Lock())


class CountGraphs(SchedulerPlugin):
    """On the scheduler: the number of keys of each graph a client sends."""

    name = "taskrunner-count-graphs"

    def __init__(self):
        self.sizes = []

    def update_graph(self, scheduler, *, keys, **kwargs):
        self.sizes.append(len(keys))


def graph_sizes(dask_scheduler):
    return list(dask_scheduler.plugins[CountGraphs.name].sizes)


@contextlib.contextmanager
def counting_graphs(client):
    """Count the graphs `client` sends meanwhile: yields the list of their
    sizes, filled in at the end."""
    sizes = []
    client.register_plugin(CountGraphs())
    try:
        yield sizes
        sizes.extend(client.run_on_scheduler(graph_sizes))
    finally:
        client.unregister_scheduler_plugin(CountGraphs.name)


# ------------------------------------------------------------- settings


def test_name_and_type():
    runner = DaskTaskRunner(cluster_kwargs=THREADED)
    assert isinstance(runner, TaskRunner)
    assert runner.name == "dask"
    assert runner.client is None


def test_duplicate_keeps_every_setting():
    runner = DaskTaskRunner(cluster_class="distributed.LocalCluster",
                            cluster_kwargs=THREADED, client_kwargs={"timeout": "20s"})
    copy = runner.duplicate()
    assert copy is not runner and type(copy) is DaskTaskRunner
    assert copy == runner
    assert copy.cluster_class is distributed.LocalCluster
    assert copy.cluster_kwargs == THREADED
    assert copy.client_kwargs == {"timeout": "20s"}
    assert copy.address is None
    remote = DaskTaskRunner(address="tcp://127.0.0.1:8786", client_kwargs={"timeout": 5})
    twin = remote.duplicate()
    assert twin == remote and twin.address == "tcp://127.0.0.1:8786"
    assert twin.client_kwargs == {"timeout": 5}
    assert twin != copy


def test_settings_are_copied_not_shared():
    kwargs = dict(THREADED)
    runner = DaskTaskRunner(cluster_kwargs=kwargs)
    kwargs["n_workers"] = 5
    runner.cluster_kwargs["n_workers"] = 7
    assert runner.cluster_kwargs == THREADED


@pytest.mark.parametrize("kwargs, word", [
    ({"address": 8786}, "address"),
    ({"cluster_kwargs": [("n_workers", 1)]}, "cluster_kwargs"),
    ({"client_kwargs": "timeout=5"}, "client_kwargs"),
    ({"cluster_class": 42}, "cluster_class"),
    ({"cluster_kwargs": {1: 2}}, "cluster_kwargs"),
])
def test_bad_settings_raise_type_error_naming_the_argument(kwargs, word):
    with pytest.raises(TypeError, match=word):
        DaskTaskRunner(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {"address": "tcp://127.0.0.1:8786", "cluster_class": "distributed.LocalCluster"},
    {"address": "tcp://127.0.0.1:8786", "cluster_kwargs": {"n_workers": 1}},
    {"address": ""},
    {"cluster_class": "LocalCluster"},
    {"cluster_class": "distributed.NoSuchCluster"},
    {"client_kwargs": {"asynchronous": True}},
])
def test_contradictory_settings_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        DaskTaskRunner(**kwargs)


def test_missing_distributed_raises_import_error_naming_the_extra():
    code = (
        "import sys\n"
        "sys.modules['distributed'] = None\n"       # import distributed fails
        "import taskrunner\n"
        "from taskrunner import DaskTaskRunner, ThreadPoolTaskRunner\n"
        "with ThreadPoolTaskRunner(1) as r:\n"
        "    assert r.submit(abs, {'x': -1}).result() == 1\n"
        "try:\n"
        "    DaskTaskRunner()\n"
        "except ImportError as error:\n"
        "    print('ImportError:', error)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr
    assert "ImportError:" in proc.stdout
    assert "pip install 'taskrunner[dask]'" in proc.stdout


# ------------------------------------------------------ the cluster's lifetime


def test_embedded_cluster_starts_on_enter_and_closes_on_exit():
    runner = DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=THREADED)
    with runner:
        client = runner.client
        cluster = client.cluster
        assert isinstance(cluster, distributed.LocalCluster)
        assert sum(client.nthreads().values()) == 2
        assert runner.submit(rt.inc, {"x": 1}).result(timeout=20) == 2
    assert runner.client is None
    assert client.status == "closed"
    assert cluster.status.name == "closed"


def test_cluster_class_may_be_any_callable_returning_a_cluster():
    made = []

    def make_cluster(**kwargs):
        made.append(kwargs)
        return distributed.LocalCluster(**kwargs)

    with DaskTaskRunner(cluster_class=make_cluster, cluster_kwargs=THREADED) as runner:
        assert runner.submit(rt.add, {"x": 1, "y": 2}).result(timeout=20) == 3
    assert made == [THREADED]


def test_exiting_an_address_runner_leaves_the_cluster_running(dask_clusters):
    cluster = dask_clusters.get()
    with DaskTaskRunner(address=cluster.address) as runner:
        assert runner.submit(rt.inc, {"x": 1}).result(timeout=20) == 2
        client = runner.client
    assert client.status == "closed"
    with distributed.Client(cluster.address, set_as_default=False) as other:
        assert sorted(other.nthreads().values()) == sorted(cluster.threads)
        assert other.submit(rt.inc, 41).result(timeout=20) == 42
    # and a runner can connect again
    with DaskTaskRunner(address=cluster.address) as runner:
        assert runner.submit(rt.inc, {"x": 2}).result(timeout=20) == 3


# ----------------------------------------------- results stay on the cluster


def test_upstream_results_go_worker_to_worker_and_are_fetched_on_result(
        dask_clusters, make_path):
    log = make_path()
    cluster = dask_clusters.get()
    here = str(os.getpid())
    with DaskTaskRunner(address=cluster.address) as runner:
        workers = {str(pid) for pid in runner.client.run(pid_of_worker).values()}
        ups = runner.map(make_tracked, {"value": range(8), "log": log})
        downs = runner.map(value_of, {"tracked": ups})
        total = runner.submit(rt.total, {"xs": downs})
        assert total.result(timeout=30) == sum(range(1, 9))
        # The downstream runs received the upstream values on the workers;
        # this process never unpickled one.
        assert here not in read_lines(log)
        assert set(read_lines(log)) <= workers
        held = {key for keys in runner.client.who_has().values() for key in keys}
        assert held, "the results are on the workers"
        assert ups[3].result(timeout=20).value == 3
        assert read_lines(log).count(here) == 1       # fetched once, on result()


def test_a_dask_future_upstream_of_another_runner_gives_its_value(dask_clusters):
    # The handle of a result kept on the cluster goes only to runs of the
    # same runner; a thread or process runner's task gets the value.
    from taskrunner import ProcessPoolTaskRunner, ThreadPoolTaskRunner

    cluster = dask_clusters.get()
    with DaskTaskRunner(address=cluster.address) as runner:
        up = runner.submit(rt.inc, {"x": 41})
        with ThreadPoolTaskRunner(2) as threads:
            assert threads.submit(rt.identity, {"x": up}).result(timeout=30) == 42
            assert threads.map(rt.inc, {"x": [up, up]}).result(timeout=30) == [43, 43]
        with ProcessPoolTaskRunner(1) as processes:
            assert processes.submit(rt.identity, {"x": [up]}).result(timeout=30) == [42]


def test_the_results_of_a_future_list_are_fetched_in_one_gather(dask_clusters):
    cluster = dask_clusters.get()
    with DaskTaskRunner(address=cluster.address) as runner:
        futures = runner.map(rt.inc, {"x": range(300)})
        futures.wait(timeout=60)
        gathers = []
        gather = runner.client.gather
        runner.client.gather = lambda *args, **kwargs: gathers.append(1) or gather(*args, **kwargs)
        try:
            assert futures.result(timeout=60) == list(range(1, 301))
            assert futures.result() == list(range(1, 301))
        finally:
            del runner.client.gather
        assert len(gathers) == 2          # one per result() call, not one per item


def test_results_held_at_exit_are_fetched_once_and_kept(dask_clusters, make_path):
    log = make_path()
    cluster = dask_clusters.get()
    with DaskTaskRunner(address=cluster.address) as runner:
        kept = runner.submit(make_tracked, {"value": 5, "log": log})
        dropped = runner.submit(make_tracked, {"value": 6, "log": log})
        kept.wait(timeout=20)
        dropped.wait(timeout=20)
        del dropped
        assert read_lines(log) == []
    here = str(os.getpid())
    assert read_lines(log) == [here]                  # only the one still held
    assert kept.result().value == 5 and kept.result().value == 5
    assert read_lines(log) == [here]


# ----------------------------------------------------------------- batches


def test_a_big_map_is_sent_in_batches_of_packs(dask_clusters):
    # Few messages to the scheduler, each of many runs, packed several to a
    # Dask task: the scheduler's cost is per task.
    cluster = dask_clusters.get()
    n = 3000
    with DaskTaskRunner(address=cluster.address) as runner:
        with counting_graphs(runner.client) as sizes:
            futures = runner.map(rt.inc, {"x": range(n)})
            futures.wait(timeout=90)
        assert all(f.state.is_completed() for f in futures)
        assert futures.result() == list(range(1, n + 1))
    assert len(sizes) <= 10, sizes
    assert sum(sizes) <= n // 20, sizes


# ------------------------------------------------------------------ packs


def test_a_failing_run_of_a_pack_fails_alone(dask_clusters):
    cluster = dask_clusters.get()
    n = 400
    with DaskTaskRunner(address=cluster.address) as runner:
        with counting_graphs(runner.client) as sizes:
            futures = runner.map(rt.fail_if_multiple, {"x": range(n), "of": 37})
            got = futures.result(timeout=60, raise_on_failure=False)
        assert sum(sizes) < n // 4, sizes           # packed
        for i, (future, value) in enumerate(zip(futures, got)):
            if i % 37 == 0:
                assert future.state.is_failed()
                assert isinstance(value, ValueError) and f"item {i} " in str(value)
            else:
                assert future.state.is_completed() and value == i


def test_results_of_packs_feed_later_runs_and_outlive_the_runner(dask_clusters):
    cluster = dask_clusters.get()
    n = 600
    with DaskTaskRunner(address=cluster.address) as runner:
        first = runner.map(rt.inc, {"x": range(n)})
        second = runner.map(rt.inc, {"x": first})
        total = runner.submit(rt.total, {"xs": first})
        assert second.result(timeout=60) == list(range(2, n + 2))
        assert total.result(timeout=60) == sum(range(1, n + 1))
        assert [first[i].result(timeout=60) for i in (0, 7, n - 1)] == [1, 8, n]
    assert [f.result() for f in first] == list(range(1, n + 1))


def test_cancel_all_holds_back_the_runs_of_a_pack_not_yet_started(
        dask_clusters, make_gate, make_path):
    # Four worker threads, each blocked in the first run of its pack: the
    # runs behind those in their packs, and the packs not started, must
    # never call the task.
    cluster = dask_clusters.get()
    log = make_path()
    n = 256
    with DaskTaskRunner(address=cluster.address) as runner, make_gate() as gate:
        futures = runner.map(rt.logged_then_gated, {"x": range(n), "log": log,
                                                    "gate": gate.path})
        assert rt.wait_until(lambda: len(read_lines(log)) >= cluster.nthreads, timeout=30)
        runner.cancel_all()
        gate.open()
        futures.wait(timeout=60)
        started = {int(line) for line in read_lines(log)}
        assert len(started) == cluster.nthreads, started
        for i, future in enumerate(futures):
            if i in started:
                assert future.result() == i
            else:
                assert future.state.is_cancelled(), (i, future.state)
    assert {int(line) for line in read_lines(log)} == started


def test_runs_recalled_while_being_sent_go_alone_and_are_recalled_right(
        dask_clusters, make_path, monkeypatch):
    # cancel_all() asks the workers about runs named but not yet packed;
    # by the time it reaches them, some have started.  Those must be known
    # as started (they go alone, in Dask tasks named after them), never
    # cancelled after calling their task.
    from taskrunner._dask import backend as dask_backend

    cluster = dask_clusters.get()
    log = make_path()
    asked = threading.Event()
    cancellers = []
    dump, hold_back, mark = (dask_backend.CallDumper.dump, dask_backend.DaskBackend._hold_back,
                             dask_backend.DaskBackend._mark)

    def dump_after_a_recall_began(self, call):
        if not cancellers:          # the first call of the first batch
            canceller = threading.Thread(target=runner.cancel_all)
            cancellers.append(canceller)
            canceller.start()
            assert asked.wait(30), "the recall never asked the workers"
        return dump(self, call)

    def hold_back_noted(self, entries):
        asked.set()
        return hold_back(self, entries)

    def mark_once_a_run_started(self, entries):
        assert rt.wait_until(lambda: read_lines(log), timeout=30), "no run started"
        return mark(self, entries)

    monkeypatch.setattr(dask_backend.CallDumper, "dump", dump_after_a_recall_began)
    monkeypatch.setattr(dask_backend.DaskBackend, "_hold_back", hold_back_noted)
    monkeypatch.setattr(dask_backend.DaskBackend, "_mark", mark_once_a_run_started)
    with DaskTaskRunner(address=cluster.address) as runner:
        futures = runner.map(rt.record, {"path": log, "x": range(64)})
        futures.wait(timeout=60)
        cancellers[0].join(30)
        ran = {int(line) for line in read_lines(log)}
        assert ran
        for i, future in enumerate(futures):
            if i in ran:
                assert future.state.is_completed(), (i, future.state)
            else:
                assert future.state.is_cancelled(), (i, future.state)


def test_on_workers_in_this_process_a_run_may_wait_for_the_next_item_of_its_map():
    # One worker thread, in this process, where a task can reach the
    # runner's futures: item 0 waits for item 1, so they must not share a
    # pack (whose runs end together).
    runner = DaskTaskRunner(cluster_kwargs={
        "n_workers": 1, "threads_per_worker": 1, "processes": False,
        "dashboard_address": None})
    try:
        with running(runner, exit_timeout=60):
            futures = runner.map(rt.waits_for_the_next_item, {"x": range(40)})
            rt.OWN_RUNNER["futures"] = futures
            assert futures.result(timeout=60) == list(range(40))
    finally:
        rt.OWN_RUNNER.clear()


# ------------------------------------------------------------- worker loss


def test_a_worker_killed_mid_task_loses_no_run(dask_clusters, make_path, make_gate):
    cluster = dask_clusters.get()
    pids = make_path()
    gate = make_gate()
    try:
        with DaskTaskRunner(address=cluster.address) as runner:
            workers = set(runner.client.run(pid_of_worker).values())
            assert len(workers) == 2
            futures = runner.map(killed_once, {"i": range(12), "pids": pids, "gate": gate.path})
            deadline = time.monotonic() + 30
            while not any(line.startswith("0 ") for line in read_lines(pids)):
                assert time.monotonic() < deadline, "item 0 never started"
                time.sleep(0.01)
            first = next(line for line in read_lines(pids) if line.startswith("0 "))
            victim = int(first.split()[1])
            assert victim in workers
            os.kill(victim, signal.SIGKILL)
            assert futures.result(timeout=60) == [i * 10 for i in range(12)]
            assert all(f.state.is_completed() for f in futures)
            attempts = [line for line in read_lines(pids) if line.startswith("0 ")]
            assert len(attempts) == 2 and str(victim) not in attempts[1]
    finally:
        cluster.wait_for_workers()


def test_a_task_that_keeps_killing_workers_ends_crashed(dask_clusters):
    cluster = dask_clusters.get()
    try:
        with DaskTaskRunner(address=cluster.address) as runner:
            killer = runner.submit(kill_my_worker)
            down = runner.submit(rt.inc, {"x": killer})
            killer.wait(timeout=90)
            assert killer.state.is_crashed(), killer.state
            with pytest.raises(CrashedRun) as info:
                killer.result()
            message = str(info.value)
            assert "KilledWorker" in message and "kill_my_worker" in message
            down.wait(timeout=20)
            assert down.state.name == "NotReady"
            with pytest.raises(UpstreamTaskError):
                down.result()
            assert runner.submit(rt.inc, {"x": 1}).result(timeout=60) == 2
    finally:
        cluster.wait_for_workers()


# ------------------------------------------ cancelling runs handed to Dask


def test_cancel_all_takes_back_runs_queued_on_the_cluster(dask_clusters, make_gate, make_path):
    # One worker thread, so the runs behind the gated one wait on the
    # cluster: handed to Dask, not started.
    cluster = dask_clusters.get(1)
    started, log = make_path(), make_path()
    with DaskTaskRunner(address=cluster.address) as runner, make_gate() as gate:
        blocker = runner.submit(rt.gated, {"value": 1, "gate": gate.path, "started": started})
        wait_path(started, 20)
        queued = runner.map(rt.record, {"path": log, "x": range(20)})
        time.sleep(0.3)         # let them reach the scheduler and the worker
        assert all(f.state.is_running() for f in queued)     # handed to Dask
        runner.cancel_all()
        for f in queued:
            assert f.state.is_cancelled(), f.state
            with pytest.raises(CancelledRun):
                f.result()
        gate.open()
        assert blocker.result(timeout=20) == 1
        # the runner and the cluster are still fine
        assert runner.map(rt.inc, {"x": range(5)}).result(timeout=20) == [1, 2, 3, 4, 5]
    time.sleep(0.2)
    assert not os.path.exists(log)


def test_cancel_of_a_run_already_running_on_the_cluster_is_refused(
        dask_clusters, make_gate, make_path):
    cluster = dask_clusters.get(1)
    started = make_path()
    with DaskTaskRunner(address=cluster.address) as runner, make_gate() as gate:
        running = runner.submit(rt.gated, {"value": 7, "gate": gate.path, "started": started})
        wait_path(started, 20)
        assert running.cancel() is False
        gate.open()
        assert running.result(timeout=20) == 7


# ------------------------------------------------------- bad input, failures


def test_unpicklable_parameters_fail_at_the_call_naming_the_parameter(dask_clusters, make_path):
    cluster = dask_clusters.get()
    ran = make_path()
    with DaskTaskRunner(address=cluster.address) as runner:
        with pytest.raises(TypeError, match="'x'"):
            runner.submit(rt.record, {"path": ran, "x": threading.Lock()})
        with pytest.raises(TypeError, match="item 1 of parameter 'x'"):
            runner.map(rt.record, {"path": ran, "x": [1, threading.Lock()]})
        lock = threading.Lock()
        with pytest.raises(TypeError, match="task"):
            runner.submit(lambda: lock.locked())
        assert runner.submit(rt.inc, {"x": 1}).result(timeout=20) == 2
    assert not os.path.exists(ran)


def test_an_exception_that_cannot_leave_the_worker_is_described(dask_clusters):
    cluster = dask_clusters.get()
    with DaskTaskRunner(address=cluster.address) as runner:
        f = runner.submit(raise_unpicklable)
        f.wait(timeout=20)
        assert f.state.is_failed()
        with pytest.raises(TaskRunnerError, match="Unpicklable"):
            f.result()


def test_task_exceptions_keep_their_type_and_the_remote_traceback(dask_clusters):
    cluster = dask_clusters.get()
    with DaskTaskRunner(address=cluster.address) as runner:
        f = runner.submit(rt.fail_custom, {"message": "remote"})
        error = f.exception(timeout=20)
        assert type(error) is rt.TaskError and str(error) == "remote"
        assert "fail_custom" in str(error.__cause__)


def test_cancel_all_right_after_submit_takes_the_run_back(dask_clusters, make_gate, make_path):
    # The run may still be in the dispatcher's hands, between the engine
    # and the scheduler, when cancel_all() comes: it must not escape.
    cluster = dask_clusters.get(1)
    started = make_path()
    paths = []
    with DaskTaskRunner(address=cluster.address) as runner, make_gate() as gate:
        blocker = runner.submit(rt.gated, {"value": 1, "gate": gate.path, "started": started})
        wait_path(started, 20)
        for i in range(60):
            paths.append(make_path())
            queued = runner.submit(rt.record, {"path": paths[-1], "x": i})
            if i % 3 == 1:
                time.sleep(0.0005 * (i % 5))
            runner.cancel_all()
            assert queued.state.is_cancelled(), (i, queued.state)
        gate.open()
        assert blocker.result(timeout=20) == 1
        # Nothing handed to Dask can start any more: then look.
        client = runner.client
        rt.wait_until(lambda: _cluster_is_idle(client), timeout=60)
    assert not any(os.path.exists(p) for p in paths)


def _cluster_is_idle(client):
    """No task left on the scheduler, none executing on a worker: nothing
    handed to Dask can still start."""
    on_scheduler = client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
    executing = client.run(lambda dask_worker: len(dask_worker.state.executing))
    return on_scheduler == 0 and not any(executing.values())


@pytest.mark.timeout(300)
def test_a_thousand_rounds_of_submit_then_cancel_all_never_run_a_cancelled_run(
        dask_clusters, make_path):  # issue 9, point 5
    # One worker; each round submits one run and cancels it at once, so
    # that cancel_all() meets the run at every step of its way: in the
    # engine, taken, placed, named, on the scheduler, on the worker.  A
    # run that ends CANCELLED must not have called its task (its file).
    cluster = dask_clusters.get(1)
    rounds = []
    with DaskTaskRunner(address=cluster.address) as runner:
        for i in range(1000):
            path = make_path()
            future = runner.submit(rt.record, {"path": path, "x": i})
            runner.cancel_all()
            rounds.append((path, future))
        client = runner.client
        for _, future in rounds:
            future.wait(timeout=60)
            assert future.state.is_final(), future.state
        rt.wait_until(lambda: _cluster_is_idle(client), timeout=60)
    cancelled = [path for path, future in rounds if future.state.is_cancelled()]
    completed = [path for path, future in rounds if future.state.is_completed()]
    assert len(cancelled) + len(completed) == len(rounds)
    assert cancelled, "no round was cancelled: the test proves nothing"
    assert not [path for path in cancelled if os.path.exists(path)]
    assert all(os.path.exists(path) for path in completed)


def test_a_run_recalled_while_a_worker_joins_never_calls_its_task(make_path, monkeypatch):
    # issue 9, point 5: the worker joins after the recall has marked the
    # workers there were (none) and before the cancellation reaches the
    # scheduler (here it never does): the joining worker must know the mark.
    sent_to_cancel = []
    monkeypatch.setattr(distributed.Client, "cancel",
                        lambda self, futures, *args, **kwargs: sent_to_cancel.extend(futures))
    path = make_path()
    kwargs = dict(THREADED, n_workers=0)
    with DaskTaskRunner(cluster_kwargs=kwargs) as runner:
        future = runner.submit(rt.record, {"path": path, "x": 1})
        rt.wait_until(lambda: runner.client.run_on_scheduler(
            lambda dask_scheduler: len(dask_scheduler.tasks)) == 1, timeout=30)
        runner.cancel_all()
        assert future.state.is_cancelled()
        assert len(sent_to_cancel) == 1
        runner.cluster.scale(1)
        runner.client.wait_for_workers(1, timeout=30)
        refusal = sent_to_cancel[0].exception(timeout=30)
        assert type(refusal).__name__ == "Recalled", refusal    # refused on the worker
        assert runner.submit(rt.inc, {"x": 1}).result(timeout=30) == 2
    assert not os.path.exists(path)


def test_a_worker_refuses_the_runs_of_a_runner_that_has_exited():
    # Found as a flake of test_streaming's imap-failure test on Dask: a
    # recall's Client.cancel reaches the scheduler some milliseconds late,
    # and the runner's exit had dropped the run's mark meanwhile, so the
    # worker it was handed to ran it.  Once a runner has exited (its exit
    # says so, after its engine closed) no run of its session starts on a
    # worker, alone or in a pack; a session whose marks plugin was only
    # torn down (a worker closing, the plugin registered again) runs on.
    import uuid

    from taskrunner._dask import worker as on_worker
    from taskrunner._dask.worker import RECALLED, PackEnded, Recalled

    ended, closing = uuid.uuid4().hex, uuid.uuid4().hex
    on_worker.end_session(ended)            # the runner's exit, its engine closed
    on_worker.forget_marks(closing)         # a plugin torn down mid-session (a worker closing)
    called = []

    def task(x):
        called.append(x)
        return x

    blob = pickle.dumps(((1,), None))
    with pytest.raises(Recalled):
        on_worker.run(task, False, on_worker.run_key("task", ended, 1), blob, ())
    with pytest.raises(PackEnded) as pack:
        on_worker.run_pack(task, False, on_worker.run_key("task", ended, "pack2"),
                           [on_worker.run_key("task", ended, 3)], [blob])
    assert pack.value.outcomes == [(RECALLED, None)]
    assert called == []
    assert on_worker.run(task, False, on_worker.run_key("task", closing, 4), blob, ()) == 1
    assert called == [1]


# One worker process with one thread: packs form (worker.py), and the
# test can reach into the worker's process.
ONE_WORKER_PROCESS = {"n_workers": 1, "threads_per_worker": 1, "processes": True,
                      "dashboard_address": None}


def _executing(client):
    return [key for keys in client.run(
        lambda dask_worker: [str(k) for k in dask_worker.state.executing]).values()
        for key in keys]


@pytest.mark.parametrize("how", ["alone", "pack"])
def test_a_run_recalled_as_its_dask_task_starts_is_cancelled_and_never_called(
        how, make_gate, make_path):
    # issue 9, point 5; found by a full-suite run (test_streaming's
    # test_an_iterator_let_go_without_close_cancels_its_runs[dask-cluster]).
    # The run's Dask task is executing but has not looked at the marks yet:
    # the recall cannot know whether it started, so the runner keeps it;
    # but it is marked, and once it turns out not to have started it ends
    # CANCELLED instead of running after the cancel_all() that asked.
    gate = make_gate()
    entered = make_path("entered")
    with DaskTaskRunner(cluster_kwargs=ONE_WORKER_PROCESS) as runner:
        runner.client.run(rt.hold_dask_starts, gate.path, entered)
        if how == "alone":
            paths = [make_path()]
            futures = [runner.submit(rt.record, {"path": paths[0], "x": 0})]
        else:
            paths = [make_path() for _ in range(40)]
            futures = list(runner.map(rt.record, {"path": paths, "x": range(40)}))
        rt.wait_path(entered, timeout=60)
        executing = _executing(runner.client)
        assert len(executing) == 1 and ("pack" in executing[0]) == (how == "pack"), executing
        runner.cancel_all()
        gate.open()
        for future in futures:
            future.wait(timeout=60)
        assert all(f.state.is_cancelled() for f in futures), [f.state for f in futures]
    assert not [path for path in paths if os.path.exists(path)]


def test_the_cluster_helper_leaves_no_process_behind():
    from dask_cluster import DaskCluster, _running

    cluster = DaskCluster((1,)).start()
    try:
        pids = cluster.process_ids()
        assert len(pids) >= 3       # the scheduler, the nanny and its worker
    finally:
        cluster.stop()
    assert [pid for pid in pids if _running(pid)] == []
