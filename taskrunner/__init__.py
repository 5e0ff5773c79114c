"""taskrunner: the task-runner API of prefect.task_runners, on a compiled
scheduling core.

The public names are imported on first use (PEP 562): a worker process
imports this package on its way to taskrunner._worker, and starts sooner
without the runners and futures it never uses.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# Each public name and the module it lives in, in the order of __all__.
_HOMES = {
    "TaskRunner": "taskrunner.base",
    "ThreadPoolTaskRunner": "taskrunner.threads",
    "ProcessPoolTaskRunner": "taskrunner.processes",
    "DaskTaskRunner": "taskrunner.dask",
    "TaskFuture": "taskrunner.futures",
    "FutureList": "taskrunner.futures",
    "wait": "taskrunner.futures",
    "as_completed": "taskrunner.futures",
    "State": "taskrunner.states",
    "StateType": "taskrunner.states",
    "Task": "taskrunner.tasks",
    "task": "taskrunner.tasks",
    "unmapped": "taskrunner.annotations",
    "allow_failure": "taskrunner.annotations",
    "quote": "taskrunner.annotations",
    "TaskRunnerError": "taskrunner.exceptions",
    "UpstreamTaskError": "taskrunner.exceptions",
    "MappingLengthMismatch": "taskrunner.exceptions",
    "MappingMissingIterable": "taskrunner.exceptions",
    "CancelledRun": "taskrunner.exceptions",
    "CrashedRun": "taskrunner.exceptions",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'taskrunner' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:
    # (Explicit re-exports, for type checkers.)
    from taskrunner.annotations import allow_failure as allow_failure
    from taskrunner.annotations import quote as quote
    from taskrunner.annotations import unmapped as unmapped
    from taskrunner.base import TaskRunner as TaskRunner
    from taskrunner.dask import DaskTaskRunner as DaskTaskRunner
    from taskrunner.exceptions import CancelledRun as CancelledRun
    from taskrunner.exceptions import CrashedRun as CrashedRun
    from taskrunner.exceptions import MappingLengthMismatch as MappingLengthMismatch
    from taskrunner.exceptions import MappingMissingIterable as MappingMissingIterable
    from taskrunner.exceptions import TaskRunnerError as TaskRunnerError
    from taskrunner.exceptions import UpstreamTaskError as UpstreamTaskError
    from taskrunner.futures import FutureList as FutureList
    from taskrunner.futures import TaskFuture as TaskFuture
    from taskrunner.futures import as_completed as as_completed
    from taskrunner.futures import wait as wait
    from taskrunner.processes import ProcessPoolTaskRunner as ProcessPoolTaskRunner
    from taskrunner.states import State as State
    from taskrunner.states import StateType as StateType
    from taskrunner.tasks import Task as Task
    from taskrunner.tasks import task as task
    from taskrunner.threads import ThreadPoolTaskRunner as ThreadPoolTaskRunner
