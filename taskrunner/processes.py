"""ProcessPoolTaskRunner: runs tasks in worker processes.

A backend of the remote-runner protocol (taskrunner.remote): the dependency
graph stays in this process, and only ready runs are sent, with their
upstream results in place of the futures.  The parts (taskrunner._process):

    dispatcher (remote.py) ── room / place / send ──> Feeder ──> a sender thread
        per worker ──> worker pipes ──> worker processes (_worker.serve)
    worker processes ──> result pipes ──> Receiver thread ──> Outbox.finish
    WorkerSet: spawn, replace a dead worker, stop; each worker's control
        block (shared memory) says which run it started and finished last,
        whether it is loading a batch, and which runs it must skip

The feeder sizes batches from the task durations the workers report, so
that no worker waits while runs are ready; the receiver moves runs waiting
behind a long one to an idle worker (rebalance), and when a worker dies,
ends the run that killed it CRASHED and runs its others again.  cancel()
and cancel_all() take back runs sent but not started through the control
blocks' stop windows (take_back).
"""

import multiprocessing
import os
import threading
from multiprocessing.context import BaseContext
from typing import Any, Callable, Iterable, Mapping, Optional, Union

from taskrunner._mapped import join_runs
from taskrunner._pickling import dumps_checked
from taskrunner._process.feeder import Feeder
from taskrunner._process.receiver import Receiver
from taskrunner._process.workers import WorkerSet
from taskrunner.base import checked_limits, checked_max_workers, checked_trace
from taskrunner.remote import Backend, RemoteTaskRunner

__all__ = ["ProcessPoolTaskRunner"]


class ProcessPoolTaskRunner(RemoteTaskRunner):
    """Runs tasks in up to `max_workers` worker processes (default: the
    number of CPUs).

    `initializer(*initargs)` runs once in each worker before its first task;
    `mp_context` is a start method name or a multiprocessing context
    ("spawn" by default).  Tasks, their parameters and results travel with
    cloudpickle, so lambdas and closures work; each task function is
    serialised once per runner.  `limits={tag: n}` lets at most n runs of
    tasks with that tag run at once.

    `trace` (a file path): when the runner exits, a Chrome trace-event file
    of the runs is written there, a track per worker process (see the
    README, "Run trace").
    """

    def __init__(self, max_workers: Optional[int] = None,
                 initializer: Optional[Callable[..., object]] = None, initargs: Iterable[Any] = (),
                 mp_context: Union[str, BaseContext, None] = None, *,
                 limits: Optional[Mapping[str, int]] = None,
                 trace: Union[str, "os.PathLike[str]", None] = None) -> None:
        max_workers = checked_max_workers(max_workers, os.cpu_count() or 1)
        self._limits = checked_limits(limits)
        self._trace_path = checked_trace(trace)
        if initializer is not None and not callable(initializer):
            raise TypeError(f"initializer must be callable, not {type(initializer).__name__}")
        try:
            initargs = tuple(initargs)
        except TypeError:
            raise TypeError(
                f"initargs must be a tuple of arguments, not {type(initargs).__name__}") from None
        self._max_workers = max_workers
        self._initializer = initializer
        self._initargs = initargs
        self._mp_context = mp_context
        self._context = _context_of(mp_context)
        self._setup = dumps_checked((initializer, initargs), "initializer and initargs")

    @property
    def name(self):
        return "processpool"

    @property
    def max_workers(self):
        return self._max_workers

    def duplicate(self):
        return type(self)(max_workers=self._max_workers, initializer=self._initializer,
                          initargs=self._initargs, mp_context=self._mp_context,
                          limits=self._limits, trace=self._trace_path)

    def _backend(self):
        return ProcessBackend(self._context, self._max_workers, self._setup,
                              traced=self._trace_path is not None)

    def __repr__(self):
        trace = f", trace={self._trace_path!r}" if self._trace_path is not None else ""
        return f"ProcessPoolTaskRunner(max_workers={self._max_workers}{trace})"


class ProcessBackend(Backend):
    """The worker processes of one entered runner, behind the Backend
    protocol: the lock guards the workers' flights and the pool's state."""

    singles = True

    def __init__(self, context, size, setup, traced=False):
        self.lock = threading.Lock()
        self.room_changed = threading.Condition(self.lock)     # a worker has room, or closing
        self.workers = WorkerSet(context, size, setup, traced)
        self.trace = None                   # the runner's run trace, once started, if traced
        self.feeder = Feeder(self)
        self.receiver = Receiver(self)
        self.closing = False
        self.broken = None                  # why no worker can run tasks, if none can
        self.runs_submitted = 0
        self.runner = self.outbox = None
        self.threads = []

    def start(self, runner):
        """Start one worker now, the others with the second run submitted:
        a lone first task need not wait while every worker starts."""
        self.runner, self.outbox = runner, runner.outbox
        self.trace = runner._trace
        with self.lock:
            self.workers.start_first()
        thread = threading.Thread(target=self.receiver.run, name="taskrunner-receiver",
                                  daemon=True)
        thread.start()
        self.threads.append(thread)

    def submitted(self, count):
        self.runs_submitted += count
        if self.workers.unstarted and self.runs_submitted > 1:
            with self.lock:
                if self.closing or self.broken is not None:
                    return
                started = self.workers.start_the_rest()
            if started:
                self.receiver.wake()        # it watches the new ones too

    # -- the dispatcher's side --------------------------------------------------

    def room(self):
        with self.lock:
            while not self.closing and self.broken is None and self.feeder.free_room() == 0:
                self.room_changed.wait()
            if self.closing:
                return 0
            return self.feeder.free_room() if self.broken is None else 1 << 16

    def place(self, runs):
        if self.closing:
            self.outbox.give_back(runs, True)
            return None
        placed = self.feeder.place(runs)
        if any(w.ready and w.count == 0 for w in self.workers.workers):
            self.receiver.ask_rebalance()
        return placed

    def send(self, placed):
        self.feeder.send(placed)

    # -- taking runs back -------------------------------------------------------

    def take_back(self, runs):
        """Take back runs sent but not started, those of `runs`, or with
        None every such run, and return those (a RunList) for the engine to
        cancel."""
        targets = None if runs is None else set(runs.run_ids())
        cancelled, requeued = [], []
        with self.lock:
            for worker in self.workers.workers:
                first = worker.block.started + 1 if targets is None else worker.first_of(targets)
                if first is not None:
                    these, back = worker.take_back(first, targets)
                    cancelled += these
                    requeued += back
            self.room_changed.notify_all()
        self.give_back([], requeued)
        return join_runs(cancelled)

    def give_back(self, cancelled, requeued):
        """Give back runs (lists of RunLists)."""
        if requeued:
            self.outbox.give_back(join_runs(requeued), False)
        if cancelled:
            self.outbox.give_back(join_runs(cancelled), True)

    def break_down(self, error):
        """No worker can run tasks (the initializer raises, say): every run
        ends CRASHED with `error`, now and from now on."""
        with self.lock:
            if self.broken is None:
                self.broken = error
            self.room_changed.notify_all()

    def abandon(self):
        """A second Ctrl-C stopped the exit's wait for the running runs:
        kill every worker process now, and return once the receiver has
        ended their runs (the running ones CRASHED, the others cancelled:
        closing, it neither replaces the workers nor runs the runs again)."""
        with self.lock:
            self.closing = True
            self.room_changed.notify_all()
            workers = list(self.workers.workers)
        for worker in workers:
            try:
                worker.process.kill()
            except (OSError, AttributeError, ValueError):
                pass        # gone already, or never started
        self.receiver.wake()
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join(timeout=30)

    def stop(self):
        """Stop the workers and the threads; no worker process outlives this."""
        with self.lock:
            self.closing = True
            self.room_changed.notify_all()
            workers = list(self.workers.workers)
        self.receiver.wake()
        for worker in workers:
            worker.outbox.put(None)
        for thread in self.threads:
            if thread is not threading.current_thread():
                thread.join()
        self.workers.stop(workers)
        self.receiver.close()


def _context_of(mp_context):
    if mp_context is None:
        return multiprocessing.get_context("spawn")
    if isinstance(mp_context, str):
        try:
            return multiprocessing.get_context(mp_context)
        except ValueError:
            raise ValueError(
                f"mp_context {mp_context!r} is not a start method here; use one of "
                f"{multiprocessing.get_all_start_methods()}") from None
    if not hasattr(mp_context, "Process"):
        raise TypeError(
            f"mp_context must be a start method name or a multiprocessing context, "
            f"not {type(mp_context).__name__}")
    return mp_context
