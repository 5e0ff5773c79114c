"""What taskrunner logs, and through which loggers: every record goes
through "taskrunner" or one of its children, never print().

    taskrunner.runs     how runs end badly: failed, crashed, timed out,
                        retrying (WARNING); never run (NotReady, cancelled:
                        DEBUG)
    taskrunner.runner   a runner entered and exited (DEBUG); the exit's
                        notice after a Ctrl-C (WARNING)
    taskrunner.worker   worker processes started, ready, died, replaced
                        (DEBUG); bugs of the process backend (ERROR)
    taskrunner.dask     the Dask client connected and closed (DEBUG); the
                        cluster not answering (WARNING)
    taskrunner.engine   a done callback that raised, a consumer that could
                        not start (ERROR)

A successful run logs nothing at INFO or above.  A record about a run
carries `run_id` (the uuid.UUID its future's `task_run_id` shows, see
item_run_id for a mapped item with no future yet), `task_name` and
`attempt` as attributes (passed as `extra=`), so that handlers can filter
on them.

Many failures of one task (a map of 100,000 items that all raise) do not
make as many lines at WARNING: per runner and task, at most WARN_LIMIT
failures, crashes, time-outs and retries are logged at WARNING in any
WINDOW seconds; the others go to DEBUG, each with its run's fields, and
the next WARNING (or the runner's exit) says how many were.

Records a task logs in a worker process reach this process's handlers
(install_forwarder there, reemit here).  On a Dask cluster they stay in
the worker's log (`runner.client.forward_logging()` forwards them).
"""

from __future__ import annotations

import functools
import itertools
import logging
import pickle
import threading
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple, TypeVar, cast

__all__ = [
    "WARN_LIMIT", "WINDOW", "Verdict", "charge", "run_failed", "run_crashed", "run_retrying",
    "run_timed_out", "run_never_ran", "runner_entered", "runner_exited", "exit_waits",
    "worker_started", "worker_ready", "worker_died", "worker_replaced", "cluster_connected",
    "cluster_closed", "level_config", "apply_level_config", "shipped", "Forwarder",
    "install_forwarder", "reemit",
]

log = logging.getLogger("taskrunner")
runs_log = logging.getLogger("taskrunner.runs")
runner_log = logging.getLogger("taskrunner.runner")
worker_log = logging.getLogger("taskrunner.worker")
dask_log = logging.getLogger("taskrunner.dask")
# ("taskrunner.engine" is _engine's and _futures' own.)

WARN_LIMIT = 10         # bad ends of one task logged at WARNING per window, per runner
WINDOW = 60.0           # seconds
_MAX_SCOPES = 64        # runners whose counts are kept; an exit drops its own


# -- how runs end --------------------------------------------------------------


class _Tally:
    """The WARNING budget of one task in one runner.  Its bad ends are
    numbered from 1 by `ends`: next() on it is atomic under the GIL, so
    counting needs no lock (with many threads failing at once, a lock here
    made each failure cost ten times more, queued on it)."""

    __slots__ = ("ends", "window_start", "window_first", "last_loud")

    def __init__(self, now):
        self.ends = itertools.count(1)
        self.window_start = now
        self.window_first = 1       # the number of the window's first bad end
        self.last_loud = 0          # the number of the last one logged at WARNING


_tallies: Dict[Any, Dict[str, _Tally]] = {}     # scope (an engine) -> task name -> tally
_scopes_lock = threading.Lock()                 # for adding and dropping scopes; counting needs none


def _tally(scope, task_name) -> _Tally:
    by_task = _tallies.get(scope)
    if by_task is None:
        with _scopes_lock:
            by_task = _tallies.get(scope)
            if by_task is None:
                while len(_tallies) >= _MAX_SCOPES:
                    _tallies.pop(next(iter(_tallies)), None)
                by_task = _tallies[scope] = {}
    tally = by_task.get(task_name)
    if tally is None:
        tally = by_task.setdefault(task_name, _Tally(time.monotonic()))
    return tally


class Verdict(NamedTuple):
    """How one bad end is logged (see charge)."""
    loud: bool          # at WARNING, else at DEBUG
    quiet: int          # bad ends of the task logged at DEBUG since its last WARNING
    last: bool          # this WARNING spends the window's budget


def charge(scope: Any, task_name: str) -> Optional[Verdict]:
    """Count one bad end of `task_name` in `scope` (its runner's engine)
    against the budget: how to log it, or None if it would not be (past
    the budget, with DEBUG off): then nothing about the run need be made.
    Two threads racing at a window's turn may both start it: one WARNING
    more, at most once a window."""
    tally = _tally(scope, task_name)
    n = next(tally.ends)
    now = time.monotonic()
    if now - tally.window_start >= WINDOW:
        tally.window_start, tally.window_first = now, n
    if n - tally.window_first >= WARN_LIMIT:
        return _QUIET if runs_log.isEnabledFor(logging.DEBUG) else None
    quiet = max(0, n - tally.last_loud - 1)
    tally.last_loud = max(tally.last_loud, n)
    return Verdict(True, quiet, n - tally.window_first == WARN_LIMIT - 1)


_QUIET = Verdict(False, 0, False)


def _report(verdict, task_name, run_id, attempt, text, args, exc=None) -> None:
    """One bad end at WARNING, or at DEBUG once the budget is spent."""
    if verdict is None:
        return
    extra = {"run_id": run_id, "task_name": task_name, "attempt": attempt}
    args = (task_name, run_id, attempt, *args)
    if exc is not None:
        # One line, no traceback: the exception and its traceback are the
        # future's (exception(), result()), and with logging not set up
        # this goes to stderr, for runs whose failure may be expected.
        text += ": %s"
        args = (*args, _describe(exc))
    if not verdict.loud:
        runs_log.debug(text, *args, extra=extra)
        return
    if verdict.quiet:
        text += " (%d more bad ends of this task were logged at DEBUG since the last warning)"
        args = (*args, verdict.quiet)
    if verdict.last:
        text += (" (the next ones of this task in this runner go to DEBUG, counted, until "
                 "its %g s window turns)")
        args = (*args, WINDOW)
    runs_log.warning(text, *args, extra=extra)


# The functions below log one bad end of a run.  `scope` is what the
# budget is kept per (the run's engine: one per runner entered);
# `verdict`, if given, is charge()'s for it (the caller charged first, to
# skip making the run's id when nothing is logged).


def run_failed(task_name: str, run_id: Any, attempt: int, exc: BaseException,
               scope: Any = None, verdict: Optional[Verdict] = None) -> None:
    """A run ended FAILED: its task raised `exc` on its last attempt."""
    _report(verdict or charge(scope, task_name), task_name, run_id, attempt,
            "task run %r (%s) failed on attempt %d", (), exc)


def run_crashed(task_name: str, run_id: Any, attempt: int, exc: BaseException,
                scope: Any = None, verdict: Optional[Verdict] = None) -> None:
    """A run ended CRASHED: what ran it died (`exc`, a CrashedRun, says how)."""
    _report(verdict or charge(scope, task_name), task_name, run_id, attempt,
            "task run %r (%s) crashed on attempt %d", (), exc)


def run_retrying(task_name: str, run_id: Any, attempt: int, exc: BaseException, delay: float,
                 scope: Any = None, verdict: Optional[Verdict] = None) -> None:
    """Attempt `attempt` of a run failed with `exc`; the next starts in
    `delay` seconds."""
    _report(verdict or charge(scope, task_name), task_name, run_id, attempt,
            "task run %r (%s) failed on attempt %d, retrying in %g s", (delay,), exc)


def run_timed_out(task_name: str, run_id: Any, attempt: int, limit: float,
                  scope: Any = None, verdict: Optional[Verdict] = None) -> None:
    """Attempt `attempt` of a run outlasted its time limit of `limit` s."""
    _report(verdict or charge(scope, task_name), task_name, run_id, attempt,
            "task run %r (%s) timed out on attempt %d after %g s", (limit,))


def run_never_ran(task_name: str, run_id: Any, why: str) -> None:
    """A run ended without running (NotReady, cancelled): DEBUG only."""
    runs_log.debug("task run %r (%s) never ran: %s", task_name, run_id, why,
                   extra={"run_id": run_id, "task_name": task_name, "attempt": 0})


def _describe(exc) -> str:
    try:
        if isinstance(exc, BaseException):
            return f"{type(exc).__name__}: {exc}"
        return str(exc)
    except Exception:       # a broken __str__ must not lose the record
        return f"{type(exc).__name__} (its text could not be made)"


# -- runners -------------------------------------------------------------------------
#
# These run inside the runner's own steps (its entry and exit, the receiver
# handling a dead worker under the pool's lock): a filter or handler that
# raises loses its record, never the step.

_F = TypeVar("_F", bound=Callable[..., None])


def _never_raises(fn: _F) -> _F:
    @functools.wraps(fn)
    def logged(*args, **kwargs):
        try:
            fn(*args, **kwargs)
        except Exception:
            pass
    return cast(_F, logged)


@_never_raises
def runner_entered(runner) -> None:
    runner_log.debug("%s runner entered: %r", runner.name, runner)


@_never_raises
def runner_exited(runner, scope: Any, by: Optional[type]) -> None:
    """The runner exited (`by` the exception type that made it, or None):
    the bad ends its budget sent to DEBUG are counted once more at WARNING,
    and the runner's counts dropped."""
    with _scopes_lock:
        by_task = _tallies.pop(scope, None)
    for task_name, tally in list((by_task or {}).items()):
        quiet = next(tally.ends) - 1 - tally.last_loud
        if quiet > 0:
            runs_log.warning(
                "task %r: %d more runs failed, crashed, timed out or retried after the last "
                "one logged at WARNING; each was logged at DEBUG on %r", task_name, quiet,
                runs_log.name, extra={"task_name": task_name})
    runner_log.debug("%s runner exited%s", runner.name,
                     "" if by is None else f" by {by.__name__}")


@_never_raises
def exit_waits(runner, running: int) -> None:
    """After a Ctrl-C (or an exception), the exit waits for `running` runs
    still running.  At WARNING: with logging not set up, Python's
    last-resort handler writes it to stderr, where the user pressing
    Ctrl-C looks."""
    runner_log.warning(
        "taskrunner: %s runner exiting: waiting for %d task run%s still running; "
        "press Ctrl-C again to stop waiting", runner.name, running, "s" if running != 1 else "")


# -- worker processes and clusters ------------------------------------------------------


@_never_raises
def worker_started(index: int, pid: Optional[int]) -> None:
    worker_log.debug("worker process %d started (pid %s)", index, pid)


@_never_raises
def worker_ready(index: int, pid: int) -> None:
    worker_log.debug("worker process %d ready (pid %s)", index, pid)


@_never_raises
def worker_died(index: int, pid: Optional[int], how: str, running: bool) -> None:
    worker_log.debug("worker process %d (pid %s) %s%s", index, pid, how,
                     " while running a task" if running else "")


@_never_raises
def worker_replaced(index: int, old_pid: Optional[int], new_pid: Optional[int]) -> None:
    worker_log.debug("worker process %d (pid %s) replaced by pid %s", index, old_pid, new_pid)


@_never_raises
def cluster_connected(address: Optional[str], started: bool) -> None:
    dask_log.debug("Dask client connected to %s%s", address,
                   " (a cluster started for this runner)" if started else "")


@_never_raises
def cluster_closed(address: Optional[str], started: bool) -> None:
    dask_log.debug("Dask client closed%s (%s)", " with its cluster" if started else "", address)


# -- records from worker processes ---------------------------------------------------------


class LevelConfig(NamedTuple):
    """The levels of this process's loggers that were set, for a worker to
    copy: a task there then logs what it would log here, and no more."""
    root: int
    levels: Dict[str, int]      # logger name -> level, for those not NOTSET
    disabled: int               # logging.disable()'s level


def level_config() -> LevelConfig:
    levels = {}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return LevelConfig(logging.getLogger().level, levels, logging.root.manager.disable)


def apply_level_config(config: LevelConfig) -> None:
    logging.getLogger().setLevel(config.root)
    for name, level in config.levels.items():
        logging.getLogger(name).setLevel(level)
    logging.disable(config.disabled)


def shipped(record: logging.LogRecord) -> bytes:
    """A record as bytes for another process: its message formatted (its
    arguments need not pickle), its traceback as text, and any attribute
    that does not pickle as its repr."""
    fields = dict(record.__dict__)
    fields["msg"] = record.getMessage()
    fields["args"] = None
    if record.exc_info:
        if not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        fields["exc_text"] = record.exc_text
    fields["exc_info"] = None
    try:
        return pickle.dumps(fields, pickle.HIGHEST_PROTOCOL)
    except Exception:
        pass
    for key, value in list(fields.items()):
        try:
            pickle.dumps(value, pickle.HIGHEST_PROTOCOL)
        except Exception:
            fields[key] = repr(value)
    return pickle.dumps(fields, pickle.HIGHEST_PROTOCOL)


class Forwarder(logging.Handler):
    """The one handler of a worker process: ships each record to the
    parent with `send(run, task_name, shipped record)`, `current()` saying
    which run (its number on the worker, -1 for none) and task run now."""

    def __init__(self, send: Callable[[int, Optional[str], bytes], None],
                 current: Callable[[], Tuple[int, Optional[str]]]) -> None:
        super().__init__()
        self._send = send
        self._current = current

    def emit(self, record: logging.LogRecord) -> None:
        try:
            run, task_name = self._current()
            self._send(run, task_name, shipped(record))
        except Exception:
            self.handleError(record)


def install_forwarder(handler: logging.Handler, config: Optional[LevelConfig]) -> None:
    """In a worker process, before its initializer: `handler` becomes the
    only one, on the root logger, and the parent's levels apply.  The
    handlers a forked worker inherited (or that imports set up) go: the
    parent's own handle what the worker ships, once."""
    root = logging.getLogger()
    loggers = [lg for lg in list(logging.Logger.manager.loggerDict.values())
               if isinstance(lg, logging.Logger)]
    for logger in [root, *loggers]:
        for old in list(logger.handlers):
            logger.removeHandler(old)
    for logger in loggers:
        logger.propagate = True     # to the forwarder; the parent's loggers decide again
    root.addHandler(handler)
    if config is not None:
        apply_level_config(config)


def reemit(data: bytes, run_id: Any, task_name: Optional[str], attempt: Optional[int]) -> None:
    """Hand a shipped record to this process's handlers, as its logger here
    would (if its level here lets it through), with the run it came from
    (attributes a record set itself stay)."""
    try:
        record = logging.makeLogRecord(pickle.loads(data))
    except Exception:
        log.exception("a record from a worker process could not be loaded")
        return
    fields = record.__dict__
    if run_id is not None:
        fields.setdefault("run_id", run_id)
        fields.setdefault("attempt", attempt)
    if task_name is not None:
        fields.setdefault("task_name", task_name)
    logger = logging.getLogger(record.name) if record.name != "root" else logging.getLogger()
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)
