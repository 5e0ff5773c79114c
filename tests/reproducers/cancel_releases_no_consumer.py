"""REPRODUCER, left out of the suite on purpose (the file name does not
match test_*.py; run it by path: `python -m pytest
tests/reproducers/cancel_releases_no_consumer.py`).  It fails today: the
bug is in the core (csrc/taskrunner/_graph.pyx / _engine.pyx), which this
branch may not edit.  Found by test_graph_model.py's RunnerMachine.

cancel() of a run that waits for an upstream releases its downstream runs
that allow the failure (they become READY), but no consumer is asked for
them: Graph.cancel_locked -> _cancel -> _fire_edges pushes them onto the
ready ring and nothing calls _demand() (complete_locked and
release_locked do), and Engine._cancel spawns no worker.  So

* on the same runner, the released run waits until some other run ends,
  although the runner has free places;
* on a runner that has no idle worker at all (the upstream that kept the
  cancelled run waiting is another runner's), the released run never
  starts and the runner's exit waits for it forever.
"""

import threading

import pytest

from taskrunner import ThreadPoolTaskRunner, allow_failure

import runner_tasks as rt
from harness import running

pytestmark = pytest.mark.timeout(60)


def test_a_run_released_by_a_cancel_starts_while_the_runner_has_room():
    gate = threading.Event()
    started = threading.Event()

    def blocker():
        started.set()
        return gate.wait(30)

    try:
        with running(ThreadPoolTaskRunner(max_workers=4)) as runner:
            a = runner.submit(blocker)
            assert started.wait(10)
            b = runner.submit(rt.noop, wait_for=[a])
            c = runner.submit(rt.identity, {"x": "ran"}, wait_for=[allow_failure(b)])
            assert b.cancel()
            # Three of four places are free: c must not wait for a.
            assert c.result(timeout=5) == "ran"
    finally:
        gate.set()


def test_a_run_released_by_a_cancel_on_a_runner_with_no_idle_worker_runs():
    gate = threading.Event()
    other = ThreadPoolTaskRunner(max_workers=2)
    try:
        with running(other):
            a = other.submit(gate.wait, {"timeout": 30})
            with running(ThreadPoolTaskRunner(max_workers=4), exit_timeout=10) as runner:
                b = runner.submit(rt.noop, wait_for=[a])           # held by another runner's run
                c = runner.submit(rt.identity, {"x": "ran"}, wait_for=[allow_failure(b)])
                assert b.cancel()
                gate.set()
                assert a.result(timeout=10) is True
                # Today c stays PENDING for ever and the exit never returns.
                assert c.result(timeout=5) == "ran"
    finally:
        gate.set()
