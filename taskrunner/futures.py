"""Task futures, and waiting on many of them.

TaskFuture and FutureList are implemented in the compiled core; this module
is where they are documented and imported from.
"""

from __future__ import annotations

import queue
from typing import Iterable, Iterator, NamedTuple, Optional, Set, TypeVar

from taskrunner._futures import TaskFuture, blocking
from taskrunner._mapped import FutureList
from taskrunner._timer import deadline_of, remaining

__all__ = ["TaskFuture", "FutureList", "wait", "as_completed", "DoneAndNotDoneFutures"]

F = TypeVar("F", bound=TaskFuture)


class DoneAndNotDoneFutures(NamedTuple):
    """What wait() returns: the futures final, and the others."""
    done: Set[TaskFuture]
    not_done: Set[TaskFuture]


def wait(futures: Iterable[TaskFuture], timeout: Optional[float] = None) -> DoneAndNotDoneFutures:
    """Wait until every future is final or `timeout` seconds pass.

    Returns a named tuple of two sets, (done, not_done).
    """
    futures = set(futures)
    deadline = deadline_of(timeout)
    for future in futures:
        future.wait(remaining(deadline))
        if deadline is not None and remaining(deadline) == 0:
            break
    done = {f for f in futures if f.done()}
    return DoneAndNotDoneFutures(done, futures - done)


def as_completed(futures: Iterable[F], timeout: Optional[float] = None) -> Iterator[F]:
    """Yield each future once, as it becomes final.

    Raises TimeoutError if some are still unfinished after `timeout` seconds
    from the call.
    """
    deadline = deadline_of(timeout)
    futures = list(dict.fromkeys(futures))
    finished: queue.SimpleQueue = queue.SimpleQueue()
    for future in futures:
        future.add_done_callback(finished.put)
    for count in range(len(futures)):
        try:
            # A task of a runner iterating over its own runner's futures
            # makes room while it waits, as result() does.
            with blocking():
                future = finished.get(timeout=remaining(deadline))
        except queue.Empty:
            raise TimeoutError(
                f"{len(futures) - count} (of {len(futures)}) futures unfinished") from None
        yield future
