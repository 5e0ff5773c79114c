"""The root of the thread runner's flaky blocking-callback test
(test_engine.py::test_done_callbacks_that_block_do_not_break_the_running_limit),
held open deterministically.

work() decided whether a run had done callbacks before it completed the run
and took the next one; a callback added after that test and before
settle_end() fired it (by the main thread, while the consumer ran Python
code in between: engine._spawn() starting a thread) ran while the consumer
still held the next run, taken and not started.  If it blocked, the
consumer seceded and gave that run's place up, another consumer filled it,
and on rejoining the consumer took the place back and started the run:
max_workers + 1 tasks at once.  work() now tests again right before
settle_end() and gives a held run back first.  Here _start_worker holds
the window open.
"""

import threading
import time

import pytest

from taskrunner import ThreadPoolTaskRunner


def _until(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


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
        try:
            # One at a time, each running before the next is submitted: so
            # exactly one consumer is started for each (two ready runs at
            # once may ask for two consumers at once, and an idle third one
            # would take the released runs without the spawn held open here).
            first = runner.submit(first_gate.wait)
            assert _until(lambda: first.state.is_running())
            later = runner.submit(later_gate.wait)
            assert _until(lambda: later.state.is_running())
            assert runner._engine.graph.n_idle == 0
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
        finally:
            # A failure above must not leave the exit waiting on the gates.
            first_gate.set()
            later_gate.set()
            added.set()
    assert counter.peak <= 3, f"{counter.peak} tasks ran at once on 3 workers"
