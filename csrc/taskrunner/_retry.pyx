# cython: language_level=3, boundscheck=False, wraparound=False
"""Retries: whether a failed attempt runs again, after how long, and how.

    consumer: the attempt failed (raised, crashed, timed out): retried()?
        │ spec.retries?  (a field test: nothing more for a task without)
        ▼
    retry_delay(spec, payload, exc)  ── None ──> it ends FAILED / CRASHED
        │ seconds
        ▼
    retry_taken(): count the retry, then in one critical section
        graph.retry_locked(run)      RUNNING -> PENDING, held; its place freed
        delay 0: release_locked(run) READY again at once
        else:    the engine's Timer releases it when the delay has passed

So a run waiting out its delay holds no worker and no thread; cancel() and
cancel_all() end it like any pending run (the timer's release then only
lets its slot go).  The decision reads the task's options from its call
plan (taskrunner.tasks documents them); a run's retry count lives with its
payload (a future, or its map block's `retried` array: _mapped.pxd).
"""

from libc.stdint cimport int32_t

from taskrunner._calls cimport CallSpec
from taskrunner._engine cimport Engine
from taskrunner._graph cimport Graph, RunVec
from taskrunner._mapped cimport count_retry, owner_of, retries_of, run_facts

import random

from taskrunner._logging import runs_log, run_retrying


cdef bint retried(Engine engine, CallSpec spec, void* payload, int32_t run,
                  object exc) except -1:
    """The taken run `payload` stands for failed with `exc`: put it back to
    run again if its task says so (True), else leave it to end (False)."""
    if not spec.retries:
        return False
    delay = retry_delay(spec, payload, exc)
    if delay is None:
        return False
    retry_taken(engine, payload, run, delay, exc)
    return True


cdef object retry_delay(CallSpec spec, void* payload, object exc):
    """The seconds to wait before the next attempt of the run `payload`
    stands for, whose attempt failed with `exc`; None if it is not retried:
    its retries are spent, `exc` is not an Exception (KeyboardInterrupt,
    SystemExit), or the task's retry_condition_fn says no (or raises)."""
    cdef int32_t done = retries_of(payload)
    cdef tuple delays = spec.retry_delays
    cdef double delay, jitter
    if done >= spec.retries or not isinstance(exc, Exception):
        return None
    if spec.retry_condition is not None:
        try:
            wanted = spec.retry_condition(exc)
        except Exception:
            runs_log.warning("retry_condition_fn of task %r raised on %r: not retried",
                             spec.name, exc, exc_info=True)
            return None
        if not wanted:
            return None
    delay = delays[min(done, len(delays) - 1)]
    jitter = spec.retry_jitter
    if jitter and delay:
        delay = max(0.0, delay * (1.0 + random.uniform(-jitter, jitter)))
    return delay


cdef int retry_taken(Engine engine, void* payload, int32_t run, double delay,
                     object exc) except -1:
    """Put a taken run whose attempt failed back, to run again after
    `delay` seconds (see the module docstring)."""
    cdef Graph graph = engine.graph
    cdef RunVec out = RunVec(NULL, 0, 0)
    name, run_id, attempt = run_facts(payload)
    run_retrying(name, run_id, attempt, exc, delay, scope=engine)
    count_retry(payload)
    graph.lock()
    graph.retry_locked(run)
    if delay <= 0:
        graph.release_locked(run, -1, &out)
    engine.unlock_and_settle(&out)
    if delay > 0:
        engine.call_later(delay, engine._end_retry_wait, (<object>owner_of(payload), run))
    return 0
