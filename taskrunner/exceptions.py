"""Exceptions raised by taskrunner."""

__all__ = [
    "TaskRunnerError",
    "UpstreamTaskError",
    "MappingLengthMismatch",
    "MappingMissingIterable",
    "CancelledRun",
    "CrashedRun",
]


class TaskRunnerError(Exception):
    """Base class of the errors taskrunner raises."""


class UpstreamTaskError(TaskRunnerError):
    """A run never started because an upstream run did not complete.

    `upstream` is the future of that upstream run, when known.
    """

    def __init__(self, message, upstream=None):
        super().__init__(message)
        self.upstream = upstream

    def __reduce__(self):
        # A future stays in its process: pickled, the error keeps its message.
        return type(self), (str(self),)


class MappingLengthMismatch(TaskRunnerError, ValueError):
    """The iterables given to `map` have different lengths."""


class MappingMissingIterable(TaskRunnerError, ValueError):
    """`map` was given no iterable parameter to map over."""


class CancelledRun(TaskRunnerError):
    """The run was cancelled before it started."""


class CrashedRun(TaskRunnerError):
    """Whatever was running the run died before it finished."""


# A run that ran past its task's timeout_seconds ends FAILED with a built-in
# TimeoutError (what users catch), marked by this attribute so its state can
# be named "TimedOut": the mark survives pickling, a subclass would not be
# the built-in type.
_TIMEOUT_MARK = "taskrunner_timeout_seconds"


def run_timed_out(task_name: str, limit: float) -> TimeoutError:
    """The error of a run of `task_name` that ran past `limit` seconds."""
    exc = TimeoutError(f"task run {task_name!r} timed out after {limit:g} s "
                       f"(timeout_seconds={limit:g})")
    setattr(exc, _TIMEOUT_MARK, limit)
    return exc


def is_timeout(exc) -> bool:
    """Whether `exc` is the error of a run that timed out."""
    return isinstance(exc, TimeoutError) and getattr(exc, _TIMEOUT_MARK, None) is not None
