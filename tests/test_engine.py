"""Engine behaviour below the public semantics: memory, the GC, threads,
signals, and futures that cross runners."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import weakref

import pytest

from taskrunner import ThreadPoolTaskRunner, UpstreamTaskError, allow_failure

pytestmark = pytest.mark.timeout(120)


def inc(x):
    return x + 1


def boom():
    raise ValueError("boom")


def identity(x):
    return x


class Box:
    """A weak-referenceable result, to see when a cycle is collected."""


def make_box():
    return Box()


def worker_threads():
    return [t for t in threading.enumerate() if t.name.startswith("taskrunner-worker")]


def test_run_slots_are_reused_by_a_long_lived_runner():
    with ThreadPoolTaskRunner(2) as runner:
        graph = runner._engine.graph
        peak = 0
        for _ in range(20):
            futures = [runner.submit(inc, {"x": i}) for i in range(5000)]
            assert sum(f.result() for f in futures) == sum(range(1, 5001))
            del futures
            peak = max(peak, graph.n_live)
        assert graph.n_live == 0
        assert peak <= 5000
        assert graph.n_unfinished == 0


def test_pending_futures_are_not_visited_by_the_gc():
    gate = threading.Event()
    with ThreadPoolTaskRunner(2) as runner:
        blocker = runner.submit(gate.wait)
        waiting = runner.submit(identity, {"x": [1, 2]}, wait_for=[blocker])
        assert not gc.is_tracked(waiting)
        gate.set()
        assert waiting.result() == [1, 2]
    # Its result is a list, which could refer back to it: tracked again.
    assert gc.is_tracked(waiting)


def test_a_cycle_through_a_result_is_collected():
    with ThreadPoolTaskRunner(2) as runner:
        future = runner.submit(make_box)
        box = future.result()
        box.future = future           # future -> box -> future
        ref = weakref.ref(box)
    del future, box
    gc.collect()
    assert ref() is None


def test_a_cycle_through_a_closure_over_its_own_future_is_collected():
    box = Box()
    ref = weakref.ref(box)

    def run():
        holder = {}
        with ThreadPoolTaskRunner(2) as runner:
            def task():
                return holder["box"]
            holder["box"] = box  # noqa: F821 (the closure's; deleted below once run)
            future = runner.submit(task)
            holder["future"] = future     # future -> spec -> task -> holder -> future
            assert future.result() is box  # noqa: F821

    run()
    del box
    gc.collect()
    assert ref() is None


def test_worker_threads_are_gone_after_exit():
    before = len(worker_threads())
    with ThreadPoolTaskRunner(3) as runner:
        runner.map(inc, {"x": range(1000)}).result()
        assert 1 <= len(worker_threads()) - before <= 3
    assert len(worker_threads()) == before


def test_threads_never_exceed_max_workers_without_nested_waits():
    seen = set()
    lock = threading.Lock()

    def record(x):
        with lock:
            seen.add(threading.get_ident())
        time.sleep(0.001)
        return x

    with ThreadPoolTaskRunner(2) as runner:
        runner.map(record, {"x": range(200)}).result()
    assert 1 <= len(seen) <= 2


class PeakCounter:
    """Counts the tasks running at once; `step` is such a task."""

    def __init__(self, seconds):
        self.seconds = seconds
        self.running = 0
        self.peak = 0
        self.lock = threading.Lock()

    def step(self, x):
        with self.lock:
            self.running += 1
            self.peak = max(self.peak, self.running)
        time.sleep(self.seconds)
        with self.lock:
            self.running -= 1
        return x


def test_running_tasks_never_exceed_max_workers():
    counter = PeakCounter(0.002)
    with ThreadPoolTaskRunner(3) as runner:
        runner.map(counter.step, {"x": range(150)}).result()
    assert counter.peak == 3


def test_done_callbacks_that_block_do_not_break_the_running_limit():
    """A consumer runs done callbacks after giving its place back; a
    callback blocking on a future must not free a place twice."""
    counter = PeakCounter(0.003)
    with ThreadPoolTaskRunner(2) as runner:
        later = runner.submit(counter.step, {"x": -1})
        first = runner.submit(counter.step, {"x": 0})
        first.add_done_callback(lambda f: later.result())
        runner.map(counter.step, {"x": range(60)}).result()
    assert counter.peak <= 2


def test_a_future_of_another_runner_is_an_upstream():
    with ThreadPoolTaskRunner(2) as a, ThreadPoolTaskRunner(2) as b:
        gate = threading.Event()
        slow = a.submit(lambda: gate.wait() and 41)
        after = b.submit(inc, {"x": slow})
        time.sleep(0.05)
        assert not after.done()
        gate.set()
        assert after.result(timeout=10) == 42


def test_a_failed_future_of_another_runner_makes_the_run_not_ready():
    with ThreadPoolTaskRunner(2) as a, ThreadPoolTaskRunner(2) as b:
        failed = a.submit(boom)
        after = b.submit(inc, {"x": failed})
        tolerant = b.submit(identity, {"x": allow_failure(failed)})
        with pytest.raises(UpstreamTaskError, match="boom"):
            after.result(timeout=10)
        assert after.state.name == "NotReady"
        assert isinstance(tolerant.result(timeout=10), ValueError)


def test_a_future_of_an_exited_runner_is_an_upstream():
    with ThreadPoolTaskRunner(2) as a:
        done = a.submit(inc, {"x": 1})
    with ThreadPoolTaskRunner(2) as b:
        assert b.submit(inc, {"x": done}).result(timeout=10) == 3


def _run_script(source, timeout=60):
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(source)],
        capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        # A shell that starts the tests in the background (`cmd &` in a
        # script) leaves SIGINT ignored, and children inherit that: Python
        # then installs no KeyboardInterrupt handler.  Give the script the
        # terminal's default, as a user at a terminal has it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def test_ctrl_c_interrupts_a_blocked_result():
    proc = _run_script("""
        import os, signal, threading, time
        from taskrunner import ThreadPoolTaskRunner
        gate = threading.Event()
        with ThreadPoolTaskRunner(1) as runner:
            future = runner.submit(gate.wait)
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT)).start()
            start = time.monotonic()
            try:
                future.result()
            except KeyboardInterrupt:
                print("interrupted after", round(time.monotonic() - start, 2))
            gate.set()
    """)
    assert proc.returncode == 0, proc.stderr
    assert "interrupted after" in proc.stdout
    assert float(proc.stdout.split()[-1]) < 2.0


def test_ctrl_c_in_exit_cancels_what_has_not_started():
    proc = _run_script("""
        import os, signal, threading, time
        from taskrunner import ThreadPoolTaskRunner
        gate = threading.Event()
        started = threading.Event()
        def blocker():
            started.set()
            gate.wait()
            return "finished"
        try:
            with ThreadPoolTaskRunner(1) as runner:
                running = runner.submit(blocker)
                queued = [runner.submit(abs, {"x": -1}) for _ in range(10)]
                started.wait()
                threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT)).start()
                threading.Timer(0.6, gate.set).start()
        except KeyboardInterrupt:
            print(running.state.name, {q.state.name for q in queued})
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split()[0] == "Completed"
    assert "Cancelled" in proc.stdout


def test_a_runner_keeping_results_elsewhere_hands_out_handles_and_fetches():
    # The engine interface a cluster runner uses: finish() with handles,
    # downstream runs of the same engine get the handles, result() fetches.
    from taskrunner._engine import Engine
    from taskrunner._graph import STATES
    from taskrunner._remote import Outbox

    store = {"h1": 41}
    fetches = []

    def fetch(handle, timeout):
        fetches.append(handle)
        return store[handle]

    engine = Engine(4, None, None, fetch)
    box = Outbox(engine)
    try:
        up = engine.submit(lambda: None)
        down = engine.submit(lambda x: x, {"x": up})
        taken = box.take(10, 0)
        assert list(taken) == [up]
        box.finish(taken, ["h1"], [STATES["COMPLETED"]])
        taken = box.take(10, 0)
        [(spec, args_list, kwargs_list, single)] = box.calls(taken)
        assert args_list == [("h1",)]            # the handle, not the value
        assert fetches == []
        assert up.result() == 41 and fetches == ["h1"]
        box.finish(taken, [ValueError("no")], [STATES["FAILED"]])
        assert isinstance(down.exception(), ValueError)
    finally:
        engine.shutdown(True)
        engine.close()


def test_a_future_list_fetches_the_results_kept_elsewhere_at_once():
    from taskrunner._engine import Engine
    from taskrunner._graph import STATES
    from taskrunner._remote import Outbox

    calls = []

    def fetch_many(handles, timeout):
        calls.append(list(handles))
        return [h.upper() for h in handles]

    engine = Engine(8, None, None, lambda handle, timeout: handle.upper(), fetch_many)
    box = Outbox(engine)
    try:
        futures = engine.map(lambda x: x, {"x": range(3)})
        taken = box.take(10, 0)
        box.finish(taken, ["a", "b", "c"], [STATES["COMPLETED"]] * 3)
        assert futures.result(timeout=5) == ["A", "B", "C"]
        assert calls == [["a", "b", "c"]]              # one call for all
        assert futures[1].result() == "B" and len(calls) == 1    # one alone: fetch
    finally:
        engine.shutdown(True)
        engine.close()
