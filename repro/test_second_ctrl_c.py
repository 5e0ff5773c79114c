"""Reproducers (issue 14, point 7) for what only files outside the
faults-work brief can fix.  Run: python -m pytest repro/test_second_ctrl_c.py
(from the repository root; they use tests/ for their helpers).

1. (Fixed: ProcessBackend.abandon(), tested in tests/test_ctrl_c.py.)
   Process runner: a second Ctrl-C did not stop the exit's wait.  base.py
   calls `_abandon()` on it; RemoteTaskRunner/ProcessPoolTaskRunner have no
   override, and ProcessBackend.stop() then waits for the workers' running
   tasks (here 40 s).  Fix (processes.py): a ProcessBackend.abandon()
   (EngineTaskRunner._abandon() calls the backend's `abandon()` if it has
   one, with the engine still open) that, under `lock`, sets `closing`
   and kills every worker process (so the receiver ends each one's runs
   CRASHED and, closing, neither replaces the workers nor runs the runs
   again), then returns once the receiver has ended them.

2. Thread runner: after the second Ctrl-C the exit returns (the threads go
   on in the background), but the futures of the runs still running stay
   RUNNING until their tasks return: the brief asks for every future final
   (CRASHED) at once.  Only the engine can end a run a consumer thread
   holds (_engine.pyx/_graph.pyx/_consume.pyx): an Engine.abandon_running()
   that ends every RUNNING run CRASHED ("abandoned by a second Ctrl-C")
   under the graph's lock and marks its slot so that the consumer's later
   complete_and_take() of it only drops the value.
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))

from test_ctrl_c import _TWO_CTRL_C, _child, _facts  # noqa: E402


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["threadpool"])
def test_a_second_ctrl_c_ends_the_wait_and_every_future(kind, tmp_path):
    proc = _child(_TWO_CTRL_C % True, kind, tmp_path, timeout=150)
    assert proc.returncode == 0, proc.stderr
    facts = _facts(proc)
    assert float(facts["exited"]) < 10, proc.stdout         # processpool: 40 s
    states = facts["states"].split()
    started = {int(x) for x in facts["started"].split()}
    assert [states[i] for i in sorted(started)] == ["Crashed", "Crashed"], facts   # threadpool: Running
