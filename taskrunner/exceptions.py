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
