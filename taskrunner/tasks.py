"""The `task` decorator, and the options a task carries to every runner.

A Task is a function plus how its runs behave: how often a failed run is
tried again (`retries`, with delays, jitter and a condition), how long a
run may run (`timeout_seconds`), and its `tags` (which a runner's `limits`
count).  Options are checked here, when the task is made, so a bad one is
an error at the decorator, not at the first run.  A runner reads them once
per task (its call plan, taskrunner._calls), never per run.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any, Callable, Generic, Iterable, Optional, Sequence, TypeVar, Union, overload

__all__ = ["Task", "task"]

R = TypeVar("R")

Delay = Union[float, Sequence[float]]

# The options of task() and Task.with_options(), with their defaults.
_DEFAULTS = {
    "name": None,
    "retries": 0,
    "retry_delay_seconds": 0,
    "retry_jitter_factor": None,
    "retry_condition_fn": None,
    "timeout_seconds": None,
    "tags": (),
}


def _callable_name(fn):
    name = getattr(fn, "__name__", None)
    return name if isinstance(name, str) else type(fn).__name__


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _checked_seconds(value, option: str, *, zero_ok: bool) -> float:
    if not _is_number(value):
        raise TypeError(f"{option} must be a number of seconds, not {type(value).__name__}"
                        f" ({value!r:.60})")
    seconds = float(value)
    if math.isnan(seconds) or seconds < 0 or (seconds == 0 and not zero_ok):
        bound = "at least 0" if zero_ok else "more than 0"
        raise ValueError(f"{option} must be {bound} seconds, got {value!r}")
    return seconds


def _checked_retries(value) -> int:
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"retries must be an int, not {type(value).__name__} ({value!r:.60})")
    if value < 0:
        raise ValueError(f"retries must be at least 0, got {value!r}")
    return int(value)


def _checked_delays(value):
    """retry_delay_seconds as given (a number, or a list of numbers: one per
    retry, the last repeated for retries beyond it), checked."""
    if _is_number(value):
        _checked_seconds(value, "retry_delay_seconds", zero_ok=True)
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError("retry_delay_seconds must be a number of seconds or a list of them,"
                        f" not {type(value).__name__} ({value!r:.60})")
    delays = list(value)
    if not delays:
        raise ValueError("retry_delay_seconds must not be an empty list")
    for i, delay in enumerate(delays):
        _checked_seconds(delay, f"retry_delay_seconds[{i}]", zero_ok=True)
    return delays


def retry_delays(task: "Task") -> tuple:
    """A task's retry delays as a non-empty tuple of seconds."""
    value = task.retry_delay_seconds
    if isinstance(value, Sequence):
        return tuple(float(d) for d in value)
    return (float(value),)


def _checked_jitter(value) -> Optional[float]:
    if value is None:
        return None
    return _checked_seconds(value, "retry_jitter_factor", zero_ok=True)


def _checked_condition(value):
    if value is not None and not callable(value):
        raise TypeError(f"retry_condition_fn must be callable (exception -> bool), not "
                        f"{type(value).__name__} ({value!r:.60})")
    return value


def _checked_timeout(value) -> Optional[float]:
    if value is None:
        return None
    return _checked_seconds(value, "timeout_seconds", zero_ok=False)


def _checked_tags(value) -> frozenset:
    if isinstance(value, (str, bytes)):
        raise TypeError(f"tags must be an iterable of strings, not a single {type(value).__name__}"
                        f" (write tags=[{value!r}])")
    if not isinstance(value, Iterable):
        raise TypeError(f"tags must be an iterable of strings, not {type(value).__name__}"
                        f" ({value!r:.60})")
    tags = tuple(value)
    for tag in tags:
        if not isinstance(tag, str):
            raise TypeError(f"tags must be strings, got {type(tag).__name__} ({tag!r:.60})")
    return frozenset(tags)


class Task(Generic[R]):
    """A function marked as a task.  Calling it calls the function.

    Options (see task()): `retries`, `retry_delay_seconds` (a number or a
    list, as given), `retry_jitter_factor`, `retry_condition_fn`, `timeout_seconds`
    and `tags` (a frozenset).  A Task is immutable in use: with_options()
    makes a changed copy.
    """

    __slots__ = ("fn", "name", "retries", "retry_delay_seconds", "retry_jitter_factor",
                 "retry_condition_fn", "timeout_seconds", "tags", "__dict__")

    fn: Callable[..., R]
    name: str
    retries: int
    retry_delay_seconds: Delay
    retry_jitter_factor: Optional[float]
    retry_condition_fn: Optional[Callable[[BaseException], bool]]
    timeout_seconds: Optional[float]
    tags: frozenset

    def __init__(self, fn: Callable[..., R], name: Optional[str] = None, *, retries: int = 0,
                 retry_delay_seconds: Delay = 0,
                 retry_jitter_factor: Optional[float] = None,
                 retry_condition_fn: Optional[Callable[[BaseException], bool]] = None,
                 timeout_seconds: Optional[float] = None,
                 tags: Iterable[str] = ()) -> None:
        if not callable(fn):
            raise TypeError(f"task() needs a callable, got {type(fn).__name__}")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"task name must be a str, got {type(name).__name__}")
        self.fn = fn
        self.name = name if name is not None else _callable_name(fn)
        self.retries = _checked_retries(retries)
        self.retry_delay_seconds = _checked_delays(retry_delay_seconds)
        self.retry_jitter_factor = _checked_jitter(retry_jitter_factor)
        self.retry_condition_fn = _checked_condition(retry_condition_fn)
        self.timeout_seconds = _checked_timeout(timeout_seconds)
        self.tags = _checked_tags(tags)
        functools.update_wrapper(self, fn, updated=())

    def __call__(self, *args: Any, **kwargs: Any) -> R:
        return self.fn(*args, **kwargs)

    def _options(self) -> dict:
        return {"name": self.name, "retries": self.retries,
                "retry_delay_seconds": self.retry_delay_seconds,
                "retry_jitter_factor": self.retry_jitter_factor,
                "retry_condition_fn": self.retry_condition_fn,
                "timeout_seconds": self.timeout_seconds, "tags": self.tags}

    def with_options(self, **changes: Any) -> "Task[R]":
        """A new Task of the same function with some options changed (any
        of task()'s keywords); this one is unchanged."""
        unknown = sorted(set(changes) - set(_DEFAULTS))
        if unknown:
            raise TypeError(f"with_options() got unknown option(s) {', '.join(unknown)}; "
                            f"the options are {', '.join(_DEFAULTS)}")
        options = self._options()
        options.update(changes)
        return Task(self.fn, **options)

    def __repr__(self):
        return f"<Task {self.name}>"

    def __reduce__(self):
        return _rebuild, (self.fn, self._options())


def _rebuild(fn, options):
    return Task(fn, **options)


@overload
def task(fn: Callable[..., R], *, name: Optional[str] = None, retries: int = 0,
         retry_delay_seconds: Delay = 0, retry_jitter_factor: Optional[float] = None,
         retry_condition_fn: Optional[Callable[[BaseException], bool]] = None,
         timeout_seconds: Optional[float] = None, tags: Iterable[str] = ()) -> Task[R]: ...
@overload
def task(fn: None = None, *, name: Optional[str] = None, retries: int = 0,
         retry_delay_seconds: Delay = 0, retry_jitter_factor: Optional[float] = None,
         retry_condition_fn: Optional[Callable[[BaseException], bool]] = None,
         timeout_seconds: Optional[float] = None,
         tags: Iterable[str] = ()) -> Callable[[Callable[..., R]], Task[R]]: ...
def task(fn=None, *, name=None, retries=0, retry_delay_seconds=0, retry_jitter_factor=None,
         retry_condition_fn=None, timeout_seconds=None, tags=()):
    """Mark `fn` as a task: `@task`, `@task(name=..., retries=...)` or `task(fn)`.

    retries              how many more times a run whose task raises (or
                         whose worker crashed, or that timed out) is run
                         before it ends FAILED with the last exception
    retry_delay_seconds  seconds to wait before each retry: a number, or a
                         list with one delay per retry (the last repeats)
    retry_jitter_factor  spread each delay randomly by up to this fraction
                         (0.5: between half and one and a half times it)
    retry_condition_fn   fn(exception) -> bool: retry this failure or not
    timeout_seconds      a run still running after this long ends FAILED
                         ("TimedOut"; result() raises TimeoutError)
    tags                 strings; a runner's limits={tag: n} lets at most
                         n runs of tasks with that tag run at once
    """
    options = dict(name=name, retries=retries, retry_delay_seconds=retry_delay_seconds,
                   retry_jitter_factor=retry_jitter_factor,
                   retry_condition_fn=retry_condition_fn, timeout_seconds=timeout_seconds,
                   tags=tags)
    if fn is None:
        # Checked now, at the decorator's call, not when it is applied.
        Task(_callable_name, **options)
        return functools.partial(Task, **options)
    return Task(fn, **options)
