"""taskrunner: the task-runner API of prefect.task_runners, on a compiled
scheduling core."""

from taskrunner.annotations import allow_failure, quote, unmapped
from taskrunner.base import TaskRunner
from taskrunner.dask import DaskTaskRunner
from taskrunner.exceptions import (
    CancelledRun,
    CrashedRun,
    MappingLengthMismatch,
    MappingMissingIterable,
    TaskRunnerError,
    UpstreamTaskError,
)
from taskrunner.futures import FutureList, TaskFuture, as_completed, wait
from taskrunner.processes import ProcessPoolTaskRunner
from taskrunner.states import State, StateType
from taskrunner.tasks import Task, task
from taskrunner.threads import ThreadPoolTaskRunner

__all__ = [
    "TaskRunner",
    "ThreadPoolTaskRunner",
    "ProcessPoolTaskRunner",
    "DaskTaskRunner",
    "TaskFuture",
    "FutureList",
    "wait",
    "as_completed",
    "State",
    "StateType",
    "Task",
    "task",
    "unmapped",
    "allow_failure",
    "quote",
    "TaskRunnerError",
    "UpstreamTaskError",
    "MappingLengthMismatch",
    "MappingMissingIterable",
    "CancelledRun",
    "CrashedRun",
]

__version__ = "0.1.0"
