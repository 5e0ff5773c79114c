"""ThreadPoolTaskRunner: runs tasks on a pool of threads in this process.

Each worker thread runs the engine's consumer loop (_consume.work): the
graph asks for a thread when a run is ready and none is idle, up to
max_workers running at once, and one more while a worker is blocked on a
future.
"""

import os
import threading
from typing import Mapping, Optional, Union

from taskrunner._calls import TaskLoop
from taskrunner._consume import abandon_running, work
from taskrunner._engine import Engine
from taskrunner.base import EngineTaskRunner, checked_limits, checked_max_workers, checked_trace

__all__ = ["ThreadPoolTaskRunner"]


class ThreadPoolTaskRunner(EngineTaskRunner):
    """Runs tasks on up to `max_workers` threads at once; `limits={tag: n}`
    lets at most n runs of tasks with that tag run at once.

    Threads start as work arrives.  A run waiting for its upstreams holds
    no thread, and a task that blocks on another future gives its thread's
    place up until it resumes, so nested submits cannot deadlock the pool.

    `trace` (a file path): when the runner exits, a Chrome trace-event file
    of the runs is written there (see the README, "Run trace").
    """

    def __init__(self, max_workers: Optional[int] = None, *,
                 limits: Optional[Mapping[str, int]] = None,
                 trace: Union[str, "os.PathLike[str]", None] = None) -> None:
        max_workers = checked_max_workers(max_workers, min(32, (os.cpu_count() or 1) + 4))
        self._max_workers = max_workers
        self._limits = checked_limits(limits)
        self._trace_path = checked_trace(trace)
        self._threads: list = []
        self._threads_lock = threading.Lock()
        self._left_behind: set = set()

    @property
    def name(self):
        return "threadpool"

    @property
    def max_workers(self):
        return self._max_workers

    def duplicate(self):
        return type(self)(max_workers=self._max_workers, limits=self._limits,
                          trace=self._trace_path)

    def _start(self):
        engine = Engine(self._max_workers, self._start_worker, limits=self._limits)
        self._left_behind = engine.left_behind
        return engine

    def _start_worker(self):
        engine = self._engine
        thread = threading.Thread(
            target=self._work, args=(engine,), daemon=True,
            name=f"taskrunner-worker-{len(self._threads)}")
        thread.start()
        with self._threads_lock:
            self._threads.append(thread)

    @staticmethod
    def _work(engine):
        loop = TaskLoop()
        try:
            work(engine, loop)
        finally:
            loop.close()

    def _abandon(self):
        """A second Ctrl-C stopped the exit's wait: the running runs end
        CRASHED now; their threads finish the tasks in the background."""
        if self._engine is not None:
            abandon_running(self._engine)

    def _stop(self):
        with self._threads_lock:
            threads, self._threads = self._threads, []
        if self._abandoned:
            # A second Ctrl-C stopped the exit's wait: the threads still
            # running a task finish it in the background (they are daemon
            # threads: they do not keep the interpreter alive), then leave.
            return
        # A thread left behind on a timed-out run (timeout_seconds) is still
        # in the task, which no thread can be stopped in: its run has ended
        # without it, and the exit does not wait for it either.
        left_behind = self._left_behind
        for thread in threads:
            if thread is not threading.current_thread() and thread.ident not in left_behind:
                thread.join()

    def __repr__(self):
        trace = f", trace={self._trace_path!r}" if self._trace_path is not None else ""
        return f"ThreadPoolTaskRunner(max_workers={self._max_workers}{trace})"
