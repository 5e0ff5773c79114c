"""Reproducer (issue 14, point 8: the root of the thread runner's flaky
blocking-callback test, tests/test_engine.py::
test_done_callbacks_that_block_do_not_break_the_running_limit).  The fix is
in csrc/taskrunner/_consume.pyx, outside the faults-work brief.
Run: python -m pytest repro/test_callback_added_late_overfills_the_pool.py

work() decides whether a run has done callbacks (`settling`) before it
completes the run and takes the next one; a callback added after that test
and before settle_end() fires it (main thread, during any Python code the
consumer runs in between: engine._spawn() starting a thread, a __del__ in
settle_ended) runs while the consumer still holds the next run, taken and
not started (holding=True, in_callbacks=False).  If it blocks, _secede
gives that run's place up (graph.secede(True)), another consumer fills it,
and on rejoin(True) the consumer takes the place back and starts the run:
max_workers + 1 tasks run at once.  Under load the window opens by itself
(the flake); here _start_worker holds it open.

Fix (_consume.pyx, work()): test for callbacks again right before
settle_end(), and if there are some while a run is held, unstart it first
(as the `settling and run >= 0` branch does), or have settle_end fire the
callbacks with the consumer marked in_callbacks and not holding.
"""

import threading
import time

import pytest

from taskrunner import ThreadPoolTaskRunner


class PeakCounter:
    def __init__(self, seconds):
        self.seconds, self.running, self.peak = seconds, 0, 0
        self.lock = threading.Lock()
        self.started = threading.Condition(self.lock)

    def step(self, x=None):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
            self.started.notify_all()
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        return x


@pytest.mark.timeout(60)
def test_a_callback_added_late_that_blocks_never_overfills_the_pool(monkeypatch):
    window, added, blocked = threading.Event(), threading.Event(), threading.Event()
    armed = [False]
    start_worker = ThreadPoolTaskRunner._start_worker

    def held_open(self):
        if armed[0] and threading.current_thread() is not threading.main_thread():
            armed[0] = False
            window.set()            # the consumer is between its test and the firing
            added.wait(10)
        start_worker(self)

    monkeypatch.setattr(ThreadPoolTaskRunner, "_start_worker", held_open)
    counter = PeakCounter(0.5)
    first_gate, later_gate = threading.Event(), threading.Event()
    with ThreadPoolTaskRunner(3) as runner:
        first = runner.submit(first_gate.wait)
        later = runner.submit(later_gate.wait)
        downstream = [runner.submit(counter.step, wait_for=[first]) for _ in range(6)]
        armed[0] = True
        first_gate.set()            # its completion readies 6 runs: a consumer is wanted
        assert window.wait(10)

        def blocking_callback(f):
            blocked.set()
            later.result()

        first.add_done_callback(blocking_callback)
        added.set()
        assert blocked.wait(10)
        with counter.lock:          # the place given up is filled
            assert counter.started.wait_for(lambda: counter.running >= 2, 10)
        later_gate.set()
        for f in downstream:
            f.result(timeout=30)
    assert counter.peak <= 3, f"{counter.peak} tasks ran at once on 3 workers"
