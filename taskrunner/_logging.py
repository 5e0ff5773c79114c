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
(see Forwarder and reemit); on a Dask cluster, `distributed`'s own
forwarding does it (taskrunner.dask).
"""

from __future__ import annotations

import logging
import pickle
import threading
import time
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

__all__ = [
    "WARN_LIMIT", "WINDOW", "run_failed", "run_crashed", "run_retrying", "run_timed_out",
    "run_never_ran", "runner_entered", "runner_exited", "worker_started", "worker_ready",
    "worker_died", "worker_replaced", "cluster_connected", "cluster_closed", "level_config",
    "apply_level_config", "shipped", "Forwarder", "install_forwarder", "reemit",
]

log = logging.getLogger("taskrunner")
runs_log = logging.getLogger("taskrunner.runs")
runner_log = logging.getLogger("taskrunner.runner")
worker_log = logging.getLogger("taskrunner.worker")
dask_log = logging.getLogger("taskrunner.dask")
engine_log = logging.getLogger("taskrunner.engine")

WARN_LIMIT = 10         # bad ends of one task logged at WARNING per window, per runner
WINDOW = 60.0           # seconds
_MAX_SCOPES = 64        # runners whose counts are kept; an exit drops its own


# -- how runs end --------------------------------------------------------------


class _Tally:
    """The WARNING budget of one task in one runner."""

    __slots__ = ("window_start", "warned", "quiet")

    def __init__(self, now):
        self.window_start = now
        self.warned = 0         # logged at WARNING in the current window
        self.quiet = 0          # logged at DEBUG since the last WARNING


_tallies: Dict[Any, Dict[str, _Tally]] = {}     # scope (an engine) -> task name -> tally
_tallies_lock = threading.Lock()


def _loud(scope, task_name) -> Tuple[bool, int, bool]:
    """Whether the next bad end of `task_name` in `scope` goes at WARNING;
    how many went to DEBUG since the last that did; whether this one uses
    up the window's budget."""
    now = time.monotonic()
    with _tallies_lock:
        by_task = _tallies.get(scope)
        if by_task is None:
            while len(_tallies) >= _MAX_SCOPES:
                del _tallies[next(iter(_tallies))]
            by_task = _tallies[scope] = {}
        tally = by_task.get(task_name)
        if tally is None:
            tally = by_task[task_name] = _Tally(now)
        elif now - tally.window_start >= WINDOW:
            tally.window_start, tally.warned = now, 0
        if tally.warned >= WARN_LIMIT:
            tally.quiet += 1
            return False, 0, False
        tally.warned += 1
        quiet, tally.quiet = tally.quiet, 0
        return True, quiet, tally.warned == WARN_LIMIT


def _report(scope, task_name, run_id, attempt, text, args, exc_info=None) -> None:
    """One bad end at WARNING, or at DEBUG once the budget is spent."""
    loud, quiet, last = _loud(scope, task_name)
    extra = {"run_id": run_id, "task_name": task_name, "attempt": attempt}
    if not loud:
        if runs_log.isEnabledFor(logging.DEBUG):
            runs_log.debug(text, *args, exc_info=exc_info, extra=extra)
        return
    if quiet:
        text += " (%d more bad ends of this task were logged at DEBUG since the last warning)"
        args = (*args, quiet)
    if last:
        text += (" (the next ones of this task in this runner go to DEBUG for the rest of "
                 "%g s, counted)")
        args = (*args, WINDOW)
    runs_log.warning(text, *args, exc_info=exc_info, extra=extra)


def _exc_info(exc):
    if isinstance(exc, BaseException):
        return (type(exc), exc, exc.__traceback__)
    return None


def run_failed(task_name: str, run_id: Any, attempt: int, exc: BaseException,
               scope: Any = None) -> None:
    """A run ended FAILED: its task raised `exc` (its last attempt).
    `scope` is what the WARNING budget counts per (its runner's engine)."""
    _report(scope, task_name, run_id, attempt, "task run %r (%s) failed on attempt %d: %s",
            (task_name, run_id, attempt, _describe(exc)), _exc_info(exc))


def run_crashed(task_name: str, run_id: Any, attempt: int, exc: BaseException,
                scope: Any = None) -> None:
    """A run ended CRASHED: what ran it died (`exc` says how)."""
    _report(scope, task_name, run_id, attempt, "task run %r (%s) crashed on attempt %d: %s",
            (task_name, run_id, attempt, _describe(exc)))


def run_retrying(task_name: str, run_id: Any, attempt: int, exc: BaseException, delay: float,
                 scope: Any = None) -> None:
    """Attempt `attempt` of a run failed with `exc`; the next starts in
    `delay` seconds."""
    _report(scope, task_name, run_id, attempt,
            "task run %r (%s) failed on attempt %d, retrying in %g s: %s",
            (task_name, run_id, attempt, delay, _describe(exc)), _exc_info(exc))


def run_timed_out(task_name: str, run_id: Any, attempt: int, limit: float,
                  scope: Any = None) -> None:
    """Attempt `attempt` of a run outlasted its time limit of `limit` s."""
    _report(scope, task_name, run_id, attempt, "task run %r (%s) timed out on attempt %d after %g s",
            (task_name, run_id, attempt, limit))


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


def ended_badly_quietly(report, *args) -> None:
    """Call report(*args) (run_failed, run_crashed), never raising: it runs
    where a run ends, and a broken handler must not lose the run."""
    try:
        report(*args)
    except Exception:
        pass


# -- runners -------------------------------------------------------------------------


def runner_entered(runner) -> None:
    runner_log.debug("%s runner entered: %r", runner.name, runner)


def runner_exited(runner, scope: Any, by: Optional[type]) -> None:
    """The runner exited (`by` the exception type that made it, or None):
    the bad ends its budget sent to DEBUG are counted once more at WARNING,
    and the runner's counts dropped."""
    with _tallies_lock:
        by_task = _tallies.pop(scope, None)
    for task_name, tally in (by_task or {}).items():
        if tally.quiet:
            runs_log.warning(
                "task %r: %d more runs failed, crashed, timed out or retried after the last "
                "one logged at WARNING; each was logged at DEBUG on %r", task_name, tally.quiet,
                runs_log.name, extra={"task_name": task_name})
    runner_log.debug("%s runner exited%s", runner.name,
                     "" if by is None else f" by {by.__name__}")


# -- worker processes and clusters ------------------------------------------------------


def worker_started(index: int, pid: Optional[int]) -> None:
    worker_log.debug("worker process %d started (pid %s)", index, pid)


def worker_ready(index: int, pid: int) -> None:
    worker_log.debug("worker process %d ready (pid %s)", index, pid)


def worker_died(index: int, pid: Optional[int], how: str, running: bool) -> None:
    worker_log.debug("worker process %d (pid %s) %s%s", index, pid, how,
                     " while running a task" if running else "")


def worker_replaced(index: int, old_pid: Optional[int], new_pid: Optional[int]) -> None:
    worker_log.debug("worker process %d (pid %s) replaced by pid %s", index, old_pid, new_pid)


def cluster_connected(address: Optional[str], started: bool) -> None:
    dask_log.debug("Dask client connected to %s%s", address,
                   " (a cluster started for this runner)" if started else "")


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
