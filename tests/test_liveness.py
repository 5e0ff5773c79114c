"""Liveness (issue 9, point 5): no ready run waits while a worker that could
take it is idle, on every runner.

The case that was a hole: every worker up is busy with a run that blocks,
runs are queued behind those (handed to those workers already), and one
more worker comes up late.  The queued runs must all run on it while the
blocking runs still block.  Each runner gets its late worker its own way:
a process worker whose initializer waits for a gate, a Dask worker the
cluster scales up to, a thread that is simply free.
"""

import os

import pytest

from taskrunner import ProcessPoolTaskRunner, ThreadPoolTaskRunner

import runner_tasks as rt
from runner_tasks import wait_path

pytestmark = pytest.mark.timeout(180)

# Run it this many times in a row (50 for the record in the closing note).
REPEAT = int(os.environ.get("TASKRUNNER_LIVENESS_REPEAT", "3"))
QUEUED = 24


def _queued_runs_finish_beside_blocked_workers(runner, make_gate, make_path, late_worker):
    """Two runs block two workers; QUEUED runs go behind them; then
    `late_worker()` brings one more worker: every queued run must end
    while both blockers still block."""
    with make_gate() as gate:
        started = [make_path(), make_path()]
        blockers = [runner.submit(rt.gated, {"value": i, "gate": gate.path, "started": path})
                    for i, path in enumerate(started)]
        for path in started:
            wait_path(path, 60)
        queued = runner.map(rt.inc, {"x": range(QUEUED)})
        late_worker()
        assert queued.result(timeout=60) == list(range(1, QUEUED + 1))
        assert not any(b.state.is_final() for b in blockers)
    assert [b.result(timeout=60) for b in blockers] == [0, 1]


@pytest.mark.parametrize("attempt", range(REPEAT))
def test_a_late_process_worker_takes_the_runs_queued_behind_blocked_ones(
        attempt, tmp_path, make_gate, make_path):
    tickets = tmp_path / "tickets"
    tickets.mkdir()
    with make_gate() as late:
        runner = ProcessPoolTaskRunner(max_workers=3, initializer=rt.late_after,
                                       initargs=(str(tickets), 2, late.path))
        with runner:
            _queued_runs_finish_beside_blocked_workers(runner, make_gate, make_path, late.open)


@pytest.mark.parametrize("attempt", range(REPEAT))
def test_late_process_workers_take_queued_runs_though_a_ready_run_is_waiting(
        attempt, tmp_path, make_gate, make_path):
    # Two workers come up late together while one more blocking run is
    # ready in the engine (no worker had room for it): one late worker
    # takes that run and blocks, the other must still take the runs queued
    # behind the first two blockers.
    tickets = tmp_path / "tickets"
    tickets.mkdir()
    with make_gate() as late, make_gate() as gate:
        runner = ProcessPoolTaskRunner(max_workers=4, initializer=rt.late_after,
                                       initargs=(str(tickets), 2, late.path))
        with runner:
            started = [make_path() for _ in range(3)]
            blockers = [runner.submit(rt.gated, {"value": i, "gate": gate.path,
                                                 "started": started[i]}) for i in range(2)]
            for path in started[:2]:
                wait_path(path, 60)
            queued = runner.map(rt.inc, {"x": range(QUEUED)})
            blockers.append(runner.submit(rt.gated, {"value": 2, "gate": gate.path,
                                                     "started": started[2]}))
            late.open()
            assert queued.result(timeout=60) == list(range(1, QUEUED + 1))
            wait_path(started[2], 60)
            assert not any(b.state.is_final() for b in blockers)
            gate.open()
            assert [b.result(timeout=60) for b in blockers] == [0, 1, 2]


@pytest.mark.parametrize("attempt", range(REPEAT))
def test_a_free_thread_takes_the_runs_queued_behind_blocked_ones(attempt, make_gate, make_path):
    with ThreadPoolTaskRunner(max_workers=3) as runner:
        _queued_runs_finish_beside_blocked_workers(runner, make_gate, make_path, lambda: None)


@pytest.mark.parametrize("attempt", range(REPEAT))
def test_a_dask_worker_that_joins_takes_the_runs_queued_behind_blocked_ones(
        attempt, make_gate, make_path):
    pytest.importorskip("distributed")
    from taskrunner import DaskTaskRunner

    cluster_kwargs = {"n_workers": 2, "threads_per_worker": 1, "processes": False,
                      "dashboard_address": None}
    with DaskTaskRunner(cluster_kwargs=cluster_kwargs) as runner:
        def late_worker():
            runner.cluster.scale(3)
            runner.client.wait_for_workers(3, timeout=60)

        _queued_runs_finish_beside_blocked_workers(runner, make_gate, make_path, late_worker)
