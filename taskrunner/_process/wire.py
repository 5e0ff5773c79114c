"""The messages between the parent and a worker process.

Parent to worker, down the worker's task pipe, each pickled:

    Batch(functions, groups, forget)
                                functions it has not had yet (Function),
                                then the runs: a pickled list of Group, apart,
                                so that a worker that cannot load the runs
                                still has the functions; with `forget`, it
                                drops the functions it had first (the cache
                                is bounded: MAX_FUNCTIONS)
    None                        stop

Worker to parent, up its result pipe:

    Ready(pid)                  it ran the initializer and waits for runs
    InitFailed(text)            the initializer raised (the traceback)
    Done(first, n_runs, busy, body, times)
                                the answers to runs first .. first+count-1,
                                in order; `body` pickled apart, so that if it
                                cannot be loaded here the parent still knows
                                which runs it was for; `times` when the
                                runs started and ended, if the parent traces
    BadBatch(text)              it could not unpickle the runs of its next batch
    Logged(run, task_name, record)
                                a record logged there (any logger, at a level
                                the parent's config lets through: see
                                _logging.level_config), sent as it is logged,
                                so before the answer to the run it came from:
                                `run` the number of the run running then
                                (-1 for none), `record` from _logging.shipped

A run's number is its sequence number on that worker: every number sent is
answered once, in order, with a result, an error or "skipped".
"""

from typing import NamedTuple, Optional

__all__ = ["BATCH_SECONDS", "MAX_FUNCTIONS", "Function", "Group", "Batch", "Ready", "InitFailed",
           "Done", "BadBatch",
           "Answers", "Logged", "SKIP"]

# The worker time one batch aims to take (the feeder sizes batches by it),
# and so how often a worker sends the results of a long batch: a message
# costs the parent some 0.2-0.3 ms of CPU, under 1% of this.
BATCH_SECONDS = 0.05

# Functions a worker keeps at most, as many as the engine keeps call plans
# (a task's TaskWire hangs on its plan): past that the parent has it start
# again from the functions of the batch.
MAX_FUNCTIONS = 4096

# The function id of a Group of runs the parent could not send (their
# arguments did not pickle): the worker answers them skipped.
SKIP = -1


class Function(NamedTuple):
    id: int
    name: str
    blob: bytes             # the function, by cloudpickle
    is_async: bool


class Group(NamedTuple):
    """Consecutive runs of one function."""
    function_id: int
    first: int              # the number of its first run
    args: object            # a list of argument tuples, or with `single` of sole arguments (or a range)
    kwargs: Optional[list]  # each run's keywords (a dict or None), or None for none at all
    single: bool
    timed: bool = False     # its task has a timeout: the worker notes when each run starts


class Batch(NamedTuple):
    functions: list
    groups: bytes
    forget: bool = False


class Ready(NamedTuple):
    pid: int


class InitFailed(NamedTuple):
    text: str


class Done(NamedTuple):
    first: int
    n_runs: int             # runs answered, numbered from first
    busy: float             # seconds the worker spent in tasks for these runs
    body: bytes             # a pickled Answers
    # With a run trace: each run's start and end (tr_monotonic() seconds,
    # NaN if skipped), doubles in pairs; else None.
    times: Optional[bytes] = None


class BadBatch(NamedTuple):
    text: str


class Logged(NamedTuple):
    run: int
    task_name: Optional[str]
    record: bytes


class Answers(NamedTuple):
    """The body of a Done: one value per run (None where it failed or was
    skipped, or packed, see _worker.pyx), {run: (exception, traceback
    text)}, and the runs skipped."""
    values: object
    errors: dict
    skipped: list
