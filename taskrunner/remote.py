"""Runners that execute runs elsewhere: the one protocol every backend follows.

The dependency graph stays in this process, in the engine; a backend (a
pool of worker processes, a Dask cluster) only runs ready runs and reports
how they ended.  Data flow for one entered runner:

    submit()/map() ─── checks (picklable task and parameters) ──> Engine
                                                                    │ ready runs
    dispatcher thread (here):                                       ▼
        room = backend.room()  ─────────────────────────────>  Outbox.take(room)
        with backend.lock:                                          │ runs, out
            runs = Outbox.mark_sent(runs)     (the ledger: see _remote.pyx)
            placed = backend.place(runs)      (where each goes, recorded)
        backend.send(placed)   ──> workers / cluster ──> the backend's own
                                                         receiving thread(s)
                                                                    │
        Outbox.finish(runs, values, states) <── completed, failed, crashed
        Outbox.give_back(runs, cancel)      <── never started (run again / cancel)

    cancel()/cancel_all() ──> Engine: runs not sent on are cancelled there;
        for runs sent, Engine calls recall(runs or None) ──> backend.take_back,
        which returns the runs it took back and that surely never started.

Because a backend records where runs go (place) under its lock in the same
critical section as the engine's ledger marks them sent, and takes that lock
in take_back, a run is always known to the engine or to the backend, never
to neither: no epochs, no retries, no polling.

A backend implements Backend (below): room, place, send, take_back,
start, stop; and, if results stay where runs ran (a cluster), the fetch
hooks.  It reports ends through `runner.outbox`.  Everything else, the
checks at submit, the task registry (each task's function pickled once per
runner, kept on the engine's call plan), the dispatch loop, recall, is
here, once.  A third backend (a Ray cluster, a pool of subinterpreters)
needs only a Backend.
"""

from __future__ import annotations

import abc
import itertools
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, NamedTuple, Optional

from taskrunner._engine import Engine
from taskrunner._graph import STATES
from taskrunner._pickling import check_picklable, checked_map_value, dumps_checked
from taskrunner._remote import Outbox
from taskrunner.base import EngineTaskRunner, Parameters, R

if TYPE_CHECKING:
    from taskrunner.futures import FutureList, TaskFuture

__all__ = ["Backend", "RemoteTaskRunner", "TaskWire"]

_log = logging.getLogger("taskrunner.runner")

COMPLETED, FAILED, CRASHED = STATES["COMPLETED"], STATES["FAILED"], STATES["CRASHED"]


class TaskWire(NamedTuple):
    """What a backend sends of a task: its function, pickled once per runner."""
    id: int                 # unique per runner: a worker keeps functions by it
    name: str
    blob: bytes             # cloudpickle of the function
    fn: object
    is_async: bool


class Backend(abc.ABC):
    """The transport of a RemoteTaskRunner: what differs between running
    runs in worker processes, on a Dask cluster, or elsewhere.

    Lifecycle: start(runner) once the engine exists; then, on the
    dispatcher thread, room() / place() / send() in a loop, and from any
    thread take_back(); stop() after the engine has closed (every run
    ended).  `lock` is the backend's own lock: place() runs under it, and
    take_back() must take it."""

    lock: threading.Lock
    broken: Optional[BaseException] = None   # set when no run can run: each ends CRASHED with it
    singles = False         # calls with one argument as the argument alone (see Outbox.calls)

    def start(self, runner):  # noqa: B027 (a hook: most backends need it)
        """Start (the runner's engine and outbox exist now)."""

    def submitted(self, count):  # noqa: B027 (a hint a backend may ignore)
        """`count` runs were submitted (a hint: start more workers, say)."""

    @abc.abstractmethod
    def room(self):
        """Block until runs can be sent; how many at most.  0 once the
        backend is closing or broken (then the dispatcher asks the engine
        once more, to end what is ready)."""

    @abc.abstractmethod
    def place(self, runs):
        """Record where runs (a RunList, just marked sent) go; under
        `lock`.  Returns what send() needs."""

    @abc.abstractmethod
    def send(self, placed):
        """Send what place() recorded (off the lock: pickling, writing)."""

    def send_failed(self, placed, error):
        """send() raised (a bug): end what it did not send, never lose it."""
        raise error

    @abc.abstractmethod
    def take_back(self, runs):
        """Take back runs sent that surely never started: those of `runs`
        (a RunList; runs not sent, or ended, are left alone), or with None
        every such run.  Returns them (a RunList, or None): the engine
        cancels them."""

    @abc.abstractmethod
    def stop(self):
        """The engine has closed: stop the threads and the workers."""

    # Results kept where the runs ran (a cluster): the engine's hooks.
    fetch = None            # fetch(handle, timeout) -> value
    fetch_many = None       # fetch_many(handles, timeout) -> values
    prefetch = None         # prefetch(handles): fetch and keep, for other runners' runs


class RemoteTaskRunner(EngineTaskRunner):
    """A runner whose runs execute elsewhere, through a Backend.
    Subclasses give `_backend()` (a new Backend for each entry) and
    `_max_out()` (how many runs may be out at once: the engine's limit)."""

    _active: Any = None     # the entered Backend
    outbox: Any = None      # the engine's Outbox, while entered

    @abc.abstractmethod
    def _backend(self):
        """A new, unstarted Backend."""

    def _max_out(self, backend):
        return 2**30        # the backend's room() sets the pace

    # -- submitting -----------------------------------------------------------

    def submit(self, task: Callable[..., R], parameters: Optional[Parameters] = None,
               wait_for: Optional[Iterable[Any]] = None,
               dependencies: Optional[Mapping[str, Any]] = None) -> TaskFuture[R]:
        engine = self._started()
        self.wire_of(task)
        if parameters is not None and hasattr(parameters, "items"):
            for name, value in parameters.items():
                check_picklable(value, f"parameter {name!r}")
        future = engine.submit(task, parameters, wait_for, dependencies)
        self._active.submitted(1)
        return future

    def map(self, task: Callable[..., R], parameters: Parameters,
            wait_for: Optional[Iterable[Any]] = None) -> FutureList[R]:
        engine = self._started()
        self.wire_of(task)
        if hasattr(parameters, "items"):
            parameters = {name: checked_map_value(name, value)
                          for name, value in parameters.items()}
        futures = engine.map(task, parameters, wait_for)
        self._active.submitted(len(futures))
        return futures

    def wire_of(self, task):
        """The TaskWire of `task`, made once per runner; TypeError at the
        call if its function cannot be pickled (the engine reports a task
        that is not callable)."""
        spec = self._started().spec_of(task)
        return self.wire_of_spec(spec)

    def wire_of_spec(self, spec):
        wire = spec.wire
        if wire is None:
            blob = dumps_checked(spec.fn, f"task {spec.name!r}")
            wire = spec.wire = TaskWire(next(self._wire_ids), spec.name, blob, spec.fn,
                                        spec.is_async)
        return wire

    # -- entering and exiting ---------------------------------------------------

    def _start(self):
        backend = self._backend()
        self._wire_ids = itertools.count()
        engine = Engine(self._max_out(backend), None, self._recall, backend.fetch,
                        backend.fetch_many, backend.prefetch, callbacks_apart=True,
                        limits=self._limits)
        self._engine = engine       # for start(): a backend may ask for wires
        self.outbox = Outbox(engine)
        self._active = backend
        try:
            backend.start(self)
            self._dispatcher = threading.Thread(
                target=self._dispatch, name="taskrunner-dispatcher", daemon=True)
            self._dispatcher.start()
        except BaseException:
            engine.close()
            self._stop()
            self._engine = None
            raise
        return engine

    def _stop(self):
        # The engine has closed: the dispatcher ends once the backend's
        # stop() wakes it from room() (an engine that closed gives no runs).
        backend, self._active = self._active, None
        dispatcher, self._dispatcher = getattr(self, "_dispatcher", None), None
        if backend is not None:
            backend.stop()
        if dispatcher is not None and dispatcher is not threading.current_thread():
            dispatcher.join()
        self.outbox = None

    def _recall(self, runs):
        backend = self._active
        return backend.take_back(runs) if backend is not None else None

    # -- the dispatch loop --------------------------------------------------------

    def _dispatch(self):
        """Take ready runs as the backend has room, and hand them over."""
        backend, outbox = self._active, self.outbox
        while self._hand_over(backend, outbox, backend.room()):
            pass

    def _hand_over(self, backend, outbox, room):
        """One round of the dispatch loop; False once the engine has closed.
        A round of its own, so that nothing of it outlives it: the runs it
        took hold their futures, and a future dropped by its user must be
        free to go (with, on a cluster, the result it holds)."""
        broken = backend.broken
        runs = outbox.take(room if room > 0 else 1 << 16)
        if runs is None:
            return False            # the engine has closed
        if not len(runs):
            return True
        if broken is not None:
            outbox.finish(runs, [broken] * len(runs), CRASHED)
            return True
        if room <= 0:               # closing: what was taken never starts
            outbox.give_back(runs, True)
            return True
        with backend.lock:
            runs = outbox.mark_sent(runs)
            placed = backend.place(runs) if len(runs) else None
        if placed is None:
            return True
        try:
            backend.send(placed)
        except Exception as error:     # a bug: end the runs, never the dispatcher
            _log.exception("could not send runs to the %s backend", self.name)
            try:
                backend.send_failed(placed, error)
            except Exception:
                _log.exception("could not end the runs that were not sent")
        return True
