"""Reproducer (issue 14, point 2; a bug in taskrunner/_process/receiver.py,
outside the faults-work brief).  Run: python -m pytest repro/test_workers_killed_while_starting.py

A worker killed from outside (SIGKILL) before it is ready counts as an
"early death", and three in a row break the pool for good
(Receiver._lost, EARLY_DEATHS): every run from then on ends CRASHED with
"worker processes die before they can run tasks ... is the main module
importable by a new interpreter?".  A death by a signal from outside says
nothing about the main module; the pool should replace the worker and go
on.  Found by tests/test_faults.py's first version, whose random kills hit
replacement workers still starting: 96,731 of 100,000 runs ended CRASHED.
Fix (receiver.py): count as early deaths only workers that exited with a
code (worker.process.exitcode > 0), not those killed by a signal (< 0);
or at least not SIGKILL/SIGTERM.
"""

import multiprocessing
import os
import signal
import sys
import time

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from taskrunner import ProcessPoolTaskRunner  # noqa: E402

import runner_tasks as rt  # noqa: E402


def live_workers():
    return {p.pid for p in multiprocessing.active_children() if p.is_alive()}


@pytest.mark.timeout(120)
def test_workers_killed_while_starting_do_not_break_the_pool():
    with ProcessPoolTaskRunner(max_workers=1) as runner:
        assert runner.submit(rt.inc, {"x": 1}).result(timeout=60) == 2     # ready
        killed = set()

        def fresh_workers():
            return live_workers() - killed

        for _ in range(4):          # the ready one, then three replacements starting
            assert rt.wait_until(lambda: bool(fresh_workers()), timeout=60)
            fresh = fresh_workers()
            for pid in fresh:
                os.kill(pid, signal.SIGKILL)
            killed |= fresh
            time.sleep(0.01)
        # the pool replaces the killed workers and runs on
        assert runner.submit(rt.inc, {"x": 2}).result(timeout=60) == 3
