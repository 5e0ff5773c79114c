"""The abstract TaskRunner, and the part every built-in runner shares."""

from __future__ import annotations

import abc
import logging
import os
import threading
import weakref
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Optional, TypeVar, Union

from taskrunner import _logging as _logs
from taskrunner._trace import Trace
from taskrunner.streaming import open_stream

if TYPE_CHECKING:
    from taskrunner.futures import FutureList, TaskFuture

R = TypeVar("R")
_Runner = TypeVar("_Runner", bound="TaskRunner")
_Engined = TypeVar("_Engined", bound="EngineTaskRunner")
Parameters = Mapping[str, Any]

__all__ = ["TaskRunner"]

_log = logging.getLogger("taskrunner.runner")

_streams_lock = threading.Lock()


def checked_max_workers(max_workers, default):
    """`max_workers`, or `default` for None; TypeError or ValueError naming
    it if it is not a positive int."""
    if max_workers is None:
        return default
    if isinstance(max_workers, bool) or not isinstance(max_workers, int):
        raise TypeError(f"max_workers must be an int, not {type(max_workers).__name__}")
    if max_workers < 1:
        raise ValueError(f"max_workers must be at least 1, got {max_workers}")
    return max_workers


def checked_trace(trace):
    """`trace` as an absolute path (str), or None; TypeError naming it if
    it is not a str or os.PathLike, ValueError if it is empty or its
    directory does not exist."""
    if trace is None:
        return None
    if not isinstance(trace, (str, os.PathLike)):
        raise TypeError(f"trace must be a file path (str or os.PathLike) or None, "
                        f"not {type(trace).__name__}")
    path = os.fsdecode(os.fspath(trace))
    if not path:
        raise ValueError("trace must be a file path, not ''")
    path = os.path.abspath(path)
    if not os.path.isdir(os.path.dirname(path)):
        raise ValueError(f"trace: the directory of {path!r} does not exist")
    return path


def checked_limits(limits):
    """`limits` (None, or a mapping of tag -> how many runs of tasks with
    that tag may run at once) as a dict; TypeError for a tag that is not a
    str, ValueError for a limit that is not a positive int."""
    if limits is None:
        return {}
    if not isinstance(limits, Mapping):
        raise TypeError(f"limits must be a dict of tag -> int (runs at once), not "
                        f"{type(limits).__name__}")
    checked = {}
    for tag, limit in limits.items():
        if not isinstance(tag, str):
            raise TypeError(f"limits: a tag must be a str, not {type(tag).__name__} ({tag!r:.60})")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise ValueError(f"limits[{tag!r}] must be a positive int (runs at once), "
                             f"got {limit!r:.60}")
        checked[tag] = limit
    if len(checked) > 64:
        raise ValueError(f"limits: at most 64 limited tags, got {len(checked)}")
    return checked


def _shutdown_quietly(engine):
    try:
        engine.shutdown(True)
    except BaseException:  # noqa: B036 (the exit's own wait reports what matters)
        pass


class TaskRunner(abc.ABC):
    """Runs tasks and returns futures of their results.

    A runner is used as a context manager: `submit` and `map` work only
    inside the `with` block.  A normal exit waits for every run; an exit by
    exception cancels the runs not yet started and waits for the others.
    """

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """A short name for the kind of runner: "threadpool", ..."""

    @abc.abstractmethod
    def duplicate(self) -> TaskRunner:
        """A new, unstarted runner with the same configuration."""

    @abc.abstractmethod
    def submit(self, task: Callable[..., R], parameters: Optional[Parameters] = None,
               wait_for: Optional[Iterable[Any]] = None,
               dependencies: Optional[Mapping[str, Any]] = None) -> TaskFuture[R]:
        """Run `task` with `parameters` once the futures among them and in
        `wait_for` have completed; returns a TaskFuture."""

    @abc.abstractmethod
    def map(self, task: Callable[..., R], parameters: Parameters,
            wait_for: Optional[Iterable[Any]] = None) -> FutureList[R]:
        """Submit `task` once per item of the iterable parameters; returns a
        FutureList in input order."""

    @abc.abstractmethod
    def cancel_all(self) -> None:
        """Cancel every run that has not started.  (A subclass calls
        `_end_streams` too, as the built-in runners do.)"""

    def imap(self, task: Callable[..., R], parameters: Parameters, *, ordered: bool = True,
             buffer: Optional[int] = None, wait_for: Optional[Iterable[Any]] = None,
             raise_on_failure: bool = True, progress: Union[bool, str] = False) -> Iterator[Any]:
        """Run `task` once per item of the iterable parameters, reading them
        lazily, and return an iterator of the results (not futures).

        Parameters follow map()'s rules: iterables are zipped item by item,
        `unmapped()` values and non-iterables go whole to every call, and a
        TaskFuture is waited for and its result used.  At most `buffer`
        items are read and not yet yielded at any moment, so an input of
        any length streams in bounded memory.  `buffer=None` chooses the
        size from the worker count and the observed task duration: it
        starts at 8 items a worker (at least 16) and doubles each time the
        consumer has to wait for a result while workers could run more,
        until it holds about a second of results at the rate they come
        (slow tasks: the workers are then the limit) or 131,072 items:
        enough to keep every worker busy.  Give `buffer` for items that are
        large.

        `ordered=True` yields in input order; `ordered=False` as runs end.
        A failed run: with `raise_on_failure` the iterator raises its
        exception when it reaches it, and cancels the runs not started;
        else the exception is yielded in its place.  Iterables of different
        lengths raise MappingLengthMismatch once the shortest ends (after
        the results before that point).  Leaving early (break, close(), an
        exception) reads no more and cancels the runs not started; the
        runner's exit and cancel_all() end the iterator (CancelledRun).

        `progress=True` draws a progress bar on stderr, if it is a terminal
        (`"always"`: whatever it is), of the results given out and the
        failures among them, against the input's length if every iterable
        has a len(); the bar ends when the iterator stops.
        """
        results = open_stream(self, task, parameters, ordered, buffer, wait_for,
                              raise_on_failure, progress)
        with _streams_lock:
            streams = self.__dict__.setdefault("_streams", set())
            # Not a WeakSet: its callback is Python code, and run on the
            # main thread as the iterator dies it would lose a Ctrl-C that
            # came meanwhile (see _stream.pyx).  set.discard runs none.
            streams.add(weakref.ref(results, streams.discard))
        return results

    def _end_streams(self, reason: str) -> None:
        """End every imap() iterator of this runner: each raises
        CancelledRun at its next step."""
        with _streams_lock:
            streams = [ref() for ref in list(self.__dict__.get("_streams", ()))]
        for results in streams:
            if results is not None:
                results.end(reason)

    def _parallelism(self) -> int:
        """How many runs can run at once (imap sizes its window by it): a
        runner's `max_workers`, if it has one."""
        return getattr(self, "max_workers", None) or os.cpu_count() or 1

    def __enter__(self: _Runner) -> _Runner:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        return None

    def __repr__(self):
        return f"{type(self).__name__}()"


class EngineTaskRunner(TaskRunner):
    """A runner scheduled by the compiled engine.  Subclasses say how runs
    are executed: `_start()` returns the Engine, `_stop()` tears down."""

    _limits: dict = {}          # tag -> runs at once (checked_limits)
    _engine = None

    @property
    def limits(self) -> dict:
        """tag -> how many runs of tasks with that tag may run at once."""
        return dict(self._limits)
    _abandoned = False      # a second Ctrl-C stopped the exit's wait (see _wait_for_runs)
    _exited = False         # it was entered and has exited (for the error of a late submit)
    _trace_path: Optional[str] = None   # where the exit writes the run trace (trace=), or None
    _trace: Any = None      # the entered runner's recorder (taskrunner._trace.Trace), or None

    def _start(self):
        raise NotImplementedError

    def _stop(self):
        """Called after the engine has shut down (no run is unfinished)."""

    def _started(self):
        engine = self._engine
        if engine is None:
            if self._exited:
                raise RuntimeError(
                    f"{type(self).__name__} has exited: submit and map work only inside "
                    f"its `with` block (enter it again, or use duplicate())")
            raise RuntimeError(
                f"{type(self).__name__} is not started: use it in a `with` block "
                f"before calling submit or map")
        return engine

    def __enter__(self: _Engined) -> _Engined:
        if self._engine is not None:
            raise RuntimeError(f"{type(self).__name__} is already started")
        # Made first: a backend's start() hands it to what records.
        self._trace = Trace() if self._trace_path is not None else None
        self._engine = self._start()
        self._engine.trace = self._trace
        _logs.runner_entered(self)
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        engine = self._engine
        if engine is None:
            return None
        self._end_streams("the runner exited")
        self._abandoned = False
        try:
            self._wait_for_runs(engine, exc_type)
        finally:
            engine.close()
            self._engine = None
            self._exited = True
            self._stop()
            if not self._abandoned:
                # The futures that outlive the runner keep their own states.
                engine.free_graph()
            _logs.runner_exited(self, engine, exc_type)
            trace, self._trace = self._trace, None
            if trace is not None:
                self._write_trace(trace, exc_type)
        return None

    def _write_trace(self, trace, exc_type):
        """Write the run trace; if that fails, raise, unless the exit is by
        exception: then log it, and let that exception go on."""
        try:
            trace.write(self._trace_path)
        except Exception:
            if exc_type is None:
                raise
            _log.exception("could not write the run trace %r", self._trace_path)

    def _wait_for_runs(self, engine, exc_type):
        """The exit's wait: for every run, or (`cancel`: an exit by
        exception) for the runs already running, those not started being
        cancelled.  A Ctrl-C during a normal exit cancels as an exception
        would, and is raised once the running runs end.  While it waits
        for running runs after a Ctrl-C or an exception, the exit says so
        once, at WARNING on "taskrunner.runner" (on stderr when logging is
        not set up); a further Ctrl-C stops the wait: `_abandon()`
        ends what it can, and the exit raises that KeyboardInterrupt."""
        interrupted = None
        if exc_type is None:
            try:
                engine._wait_quiet()
                return False
            except KeyboardInterrupt as error:
                interrupted = error
        # Cancel here, then once more with the engine told to cancel runs
        # submitted from now on (by running tasks): shutdown(True) does
        # both, and waits; on a thread of its own, so that this wait alone
        # answers a Ctrl-C (shutdown answers one by waiting once more).
        closer = threading.Thread(target=_shutdown_quietly, args=(engine,),
                                  name="taskrunner-exit", daemon=True)
        try:
            # From here a Ctrl-C, wherever it lands, stops the wait.
            engine.cancel_all()
            closer.start()
            running = engine.unfinished
            if running and (interrupted is not None or issubclass(exc_type, KeyboardInterrupt)):
                _logs.exit_waits(self, running)
            engine._wait_quiet()
        except KeyboardInterrupt:
            self._abandoned = True
            self._abandon()
            raise
        closer.join()
        if interrupted is not None:
            raise interrupted

    def _abandon(self):
        """A second Ctrl-C stopped the exit's wait for the running runs:
        end them as this runner can (kill its workers, cancel them where
        they run), or leave them to finish in the background.  A runner
        elsewhere hands it to its backend's `abandon()`, if it has one."""
        abandon = getattr(getattr(self, "_active", None), "abandon", None)
        if abandon is not None:
            abandon()

    def submit(self, task: Callable[..., R], parameters: Optional[Parameters] = None,
               wait_for: Optional[Iterable[Any]] = None,
               dependencies: Optional[Mapping[str, Any]] = None) -> TaskFuture[R]:
        return self._started().submit(task, parameters, wait_for, dependencies)

    def map(self, task: Callable[..., R], parameters: Parameters,
            wait_for: Optional[Iterable[Any]] = None) -> FutureList[R]:
        return self._started().map(task, parameters, wait_for)

    def cancel_all(self) -> None:
        engine = self._engine
        self._end_streams("cancel_all() was called")
        if engine is not None:
            engine.cancel_all()
