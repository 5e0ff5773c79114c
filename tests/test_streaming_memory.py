"""imap() in bounded memory: resident memory measured while a map over a
generator far larger than its window runs (the streaming-map issue asks for
at most 64 MiB of growth over 10,000,000 items; the bench measures that
run, these tests a shorter one on each runner of this process)."""

import os
import threading

import pytest

from taskrunner import ProcessPoolTaskRunner, ThreadPoolTaskRunner

import runner_tasks as rt
from harness import running

pytestmark = pytest.mark.timeout(300)

MiB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def resident():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakResident:
    """The highest resident memory of this process while the block runs,
    sampled every few milliseconds (a sampler thread)."""

    def __enter__(self):
        self.base = resident()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, resident())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, resident())

    @property
    def growth(self):
        return self.peak - self.base


def inputs(n):
    for i in range(n):
        yield i


@pytest.mark.parametrize("ordered", [True, False])
def test_thread_imap_over_a_large_generator_stays_in_bounded_memory(ordered):
    n = 3_000_000
    with running(ThreadPoolTaskRunner(), exit_timeout=60) as r:
        sum(r.imap(rt.inc, {"x": inputs(200_000)}))         # warm: pools, caches
        with PeakResident() as memory:
            total = sum(r.imap(rt.inc, {"x": inputs(n)}, ordered=ordered))
    assert total == n * (n + 1) // 2
    assert memory.growth <= 64 * MiB, memory.growth / MiB
    # and a map() of the same items holds them all: the test can tell
    with running(ThreadPoolTaskRunner(), exit_timeout=60) as r:
        with PeakResident() as whole:
            futures = r.map(rt.inc, {"x": list(inputs(n))})
            futures.wait()
        del futures
    assert whole.growth > 2 * memory.growth, (whole.growth / MiB, memory.growth / MiB)


def test_process_imap_over_a_large_generator_stays_in_bounded_memory():
    n = 2_000_000
    with running(ProcessPoolTaskRunner(max_workers=2), exit_timeout=60) as r:
        sum(r.imap(rt.square, {"x": inputs(200_000)}))
        with PeakResident() as memory:
            total = sum(r.imap(rt.square, {"x": inputs(n)}))
    assert total == sum(i * i for i in range(n))
    assert memory.growth <= 64 * MiB, memory.growth / MiB
