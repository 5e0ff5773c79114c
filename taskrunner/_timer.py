"""One thread per engine that calls functions at given times.

The engine's clocks: a failed run waiting out its retry delay, and a run's
deadline (timeout_seconds).  Neither may hold a worker or a thread of its
own while it waits, so every such wait of one engine is an entry in one
heap, served by one thread that sleeps until the earliest is due.  The
thread starts with the first entry and stops with the engine (stop()).

Times are time.monotonic(), the clock the core's deadlines use
(CLOCK_MONOTONIC).  An entry's function runs on the timer's thread and must
not block for long: it takes a lock, moves a run, and returns.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Tuple

__all__ = ["Timer", "TimerEntry", "deadline_of", "remaining"]

_log = logging.getLogger("taskrunner.timer")


def deadline_of(timeout: Optional[float]) -> Optional[float]:
    """The time.monotonic() time `timeout` seconds from now (None: no limit)."""
    return None if timeout is None else time.monotonic() + max(0.0, float(timeout))


def remaining(deadline: Optional[float]) -> Optional[float]:
    """The seconds left until `deadline` (None: no limit), at least 0."""
    return None if deadline is None else max(0.0, deadline - time.monotonic())


@dataclass(order=True)
class TimerEntry:
    """A call due at `when`; cancel() makes it a no-op."""
    when: float
    seq: int
    fn: Callable[..., Any] = field(compare=False)
    args: Tuple[Any, ...] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


class Timer:
    """Calls fn(*args) at time.monotonic() `when`, on one thread."""

    def __init__(self, name: str = "taskrunner-timer") -> None:
        self._name = name
        self._heap: List[TimerEntry] = []
        self._cond = threading.Condition(threading.Lock())
        self._seq = itertools.count()
        self._thread: Optional[threading.Thread] = None
        self._stopped = False

    def call_at(self, when: float, fn: Callable[..., Any], *args: Any) -> TimerEntry:
        entry = TimerEntry(when, next(self._seq), fn, args)
        with self._cond:
            if self._stopped:
                raise RuntimeError("the timer has stopped (its runner has exited)")
            heapq.heappush(self._heap, entry)
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name=self._name, daemon=True)
                self._thread.start()
            elif self._heap[0] is entry:
                self._cond.notify()
        return entry

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> TimerEntry:
        return self.call_at(time.monotonic() + delay, fn, *args)

    def stop(self) -> None:
        """Drop every entry not yet called, and end the thread."""
        with self._cond:
            self._stopped = True
            self._heap.clear()
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def __len__(self) -> int:
        with self._cond:
            return sum(not e.cancelled for e in self._heap)

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopped:
                    if self._heap and self._heap[0].cancelled:
                        heapq.heappop(self._heap)
                        continue
                    if self._heap:
                        wait = self._heap[0].when - time.monotonic()
                        if wait <= 0:
                            break
                        self._cond.wait(wait)
                    else:
                        self._cond.wait()
                if self._stopped:
                    return
                entry = heapq.heappop(self._heap)
            try:
                entry.fn(*entry.args)
            except BaseException:       # the timer serves every later entry still
                _log.exception("taskrunner: a timer call failed: %r", entry.fn)
