"""ThreadPoolTaskRunner-specific behaviour (spec: ThreadPoolTaskRunner(max_workers=None),
default min(32, os.cpu_count() + 4); semantics 8 for threads)."""

import asyncio
import os
import threading
import time

import pytest

from taskrunner import TaskRunner, ThreadPoolTaskRunner
from taskrunner import unmapped as rt_unmapped

import runner_tasks as rt
from runner_tasks import wait_until

pytestmark = pytest.mark.timeout(60)


class ConcurrencyProbe:
    """Tasks that block on an Event and count how many run at once."""

    def __init__(self):
        self.lock = threading.Lock()
        self.running = 0
        self.started = 0
        self.peak = 0
        self.release = threading.Event()

    def work(self, i):
        with self.lock:
            self.running += 1
            self.started += 1
            self.peak = max(self.peak, self.running)
        try:
            if not self.release.wait(30):
                raise TimeoutError("probe never released")
        finally:
            with self.lock:
                self.running -= 1
        return i


def observe_parallelism(runner, n_tasks, expected):
    """Submit n_tasks blocking tasks; return how many had started once
    ``expected`` started and a little time passed, and the peak."""
    probe = ConcurrencyProbe()
    with runner:
        try:
            futures = [runner.submit(probe.work, {"i": i}) for i in range(n_tasks)]
            assert wait_until(lambda: probe.started >= expected, timeout=10), probe.started
            time.sleep(0.3)
            observed = probe.started
        finally:
            probe.release.set()
        assert [f.result(timeout=10) for f in futures] == list(range(n_tasks))
    return observed, probe.peak


def test_name_and_base_class():
    runner = ThreadPoolTaskRunner()
    assert runner.name == "threadpool"
    assert isinstance(runner, TaskRunner)


def test_default_max_workers_is_min_32_cpu_count_plus_4():
    expected = min(32, os.cpu_count() + 4)
    observed, peak = observe_parallelism(ThreadPoolTaskRunner(), expected + 3, expected)
    assert observed == expected
    assert peak == expected


@pytest.mark.parametrize("max_workers", [1, 3])
def test_explicit_max_workers_limits_parallelism(max_workers):
    observed, peak = observe_parallelism(
        ThreadPoolTaskRunner(max_workers=max_workers), max_workers + 3, max_workers
    )
    assert observed == max_workers
    assert peak == max_workers


def test_duplicate_keeps_max_workers():
    original = ThreadPoolTaskRunner(max_workers=2)
    copy = original.duplicate()
    assert copy is not original and isinstance(copy, ThreadPoolTaskRunner)
    observed, peak = observe_parallelism(copy, 6, 2)
    assert observed == 2 and peak == 2


def test_tasks_run_in_worker_threads():
    main = threading.get_ident()
    with ThreadPoolTaskRunner(max_workers=2) as r:
        idents = [r.submit(lambda i: threading.get_ident(), {"i": i}) for i in range(10)]
        got = {f.result(timeout=10) for f in idents}
    assert main not in got
    assert 1 <= len(got) <= 2


def test_a_run_waiting_for_upstreams_does_not_occupy_a_worker():
    release = threading.Event()
    started = threading.Event()

    def blocker():
        started.set()
        if not release.wait(30):
            raise TimeoutError("never released")
        return 1

    with ThreadPoolTaskRunner(max_workers=2) as r:
        try:
            b = r.submit(blocker)
            assert started.wait(10)
            waiting = [r.submit(rt.inc, {"x": b}) for _ in range(20)]
            waiting += [r.submit(rt.inc, {"x": 1}, wait_for=[b]) for _ in range(5)]
            waiting += list(r.map(rt.add, {"x": range(5), "y": rt_unmapped(b)}))
            # the one free worker still serves independent runs
            free = [r.submit(rt.inc, {"x": i}) for i in range(10)]
            assert [f.result(timeout=10) for f in free] == list(range(1, 11))
            assert not any(w.done() for w in waiting)
        finally:
            release.set()
        assert [w.result(timeout=10) for w in waiting] == [2] * 25 + [1, 2, 3, 4, 5]


def test_a_nested_waiting_chain_leaves_a_worker_free():
    """Runs several layers deep behind a blocked run occupy no thread."""
    release = threading.Event()

    def blocker():
        if not release.wait(30):
            raise TimeoutError("never released")
        return 0

    with ThreadPoolTaskRunner(max_workers=2) as r:
        try:
            f = r.submit(blocker)
            for _ in range(50):
                f = r.submit(rt.inc, {"x": f})
            assert r.submit(rt.inc, {"x": 1}).result(timeout=10) == 2
            assert not f.done()
        finally:
            release.set()
        assert f.result(timeout=10) == 50


def _loop_probe_factory():
    async def where(i):
        await asyncio.sleep(0.002)
        return threading.get_ident(), asyncio.get_running_loop()

    return where


def test_async_tasks_run_on_at_most_one_kept_loop_per_worker():
    where = _loop_probe_factory()
    with ThreadPoolTaskRunner(max_workers=2) as r:
        results = [r.submit(where, {"i": i}).result(timeout=10) for i in range(10)]
        results += r.map(where, {"i": range(30)}).result(timeout=20)
        # every loop object is kept alive by the results, so ids are distinct
        loops = {id(loop): loop for _, loop in results}
        assert len(loops) <= 2
        per_thread = {}
        for ident, loop in results:
            per_thread.setdefault(ident, set()).add(id(loop))
        assert all(len(v) == 1 for v in per_thread.values()), per_thread
        # the runner keeps its loops: not closed after a task (asyncio.run would)
        assert not any(loop.is_closed() for loop in loops.values())


def test_sequential_async_tasks_on_one_worker_share_one_loop():
    where = _loop_probe_factory()
    with ThreadPoolTaskRunner(max_workers=1) as r:
        loops = [r.submit(where, {"i": i}).result(timeout=10)[1] for i in range(5)]
        assert all(loop is loops[0] for loop in loops)
        assert not loops[0].is_closed()


def test_async_task_does_not_run_on_the_callers_loop():
    where = _loop_probe_factory()

    async def main():
        mine = asyncio.get_running_loop()
        with ThreadPoolTaskRunner(max_workers=1) as r:
            _, theirs = r.submit(where, {"i": 0}).result(timeout=10)
        return mine, theirs

    mine, theirs = asyncio.run(main())
    assert mine is not theirs


def test_sleeping_tasks_on_as_many_workers_overlap():
    n, seconds = 8, 0.5
    with ThreadPoolTaskRunner(max_workers=n) as r:
        t0 = time.monotonic()
        futures = r.map(rt.sleep_then, {"x": range(n), "seconds": seconds})
        assert futures.result(timeout=20) == list(range(n))
        elapsed = time.monotonic() - t0
    assert seconds * 0.9 <= elapsed < seconds * 2.5, elapsed


def test_async_sleeping_tasks_on_as_many_workers_overlap():
    n, seconds = 8, 0.5

    async def nap(x):
        await asyncio.sleep(seconds)
        return x

    with ThreadPoolTaskRunner(max_workers=n) as r:
        t0 = time.monotonic()
        futures = [r.submit(nap, {"x": i}) for i in range(n)]
        assert [f.result(timeout=20) for f in futures] == list(range(n))
        elapsed = time.monotonic() - t0
    assert seconds * 0.9 <= elapsed < seconds * 2.5, elapsed


def test_many_tasks_with_the_default_runner():
    with ThreadPoolTaskRunner() as r:
        futures = [r.submit(rt.inc, {"x": i}) for i in range(5000)]
        assert [f.result(timeout=30) for f in futures] == list(range(1, 5001))
        assert r.map(rt.inc, {"x": range(5000)}).result(timeout=30) == list(range(1, 5001))
