"""Results kept on the Dask cluster.

A completed run's future holds a Handle: the `distributed.Future` of its
result on the cluster.  A downstream run names the handle as a dependency
(see calls.py), so that Dask moves the value worker to worker; the client
fetches it only when result() asks (fetch), or many at once (gather_each).
When the runner exits, the values of the handles still held are fetched in
one gather and kept in them, so that result() works after the client has
closed.

Two rules keep a Ctrl-C from being lost or doing harm on the way:
- results are gathered by `gather`, whose wait is ours, not distributed's
  (a Ctrl-C or a timeout there would cancel every gather in flight);
- no dask future dies on the thread that drops a Handle (see Releaser).
"""

import asyncio
import concurrent.futures
import pickle
import queue
import threading
import weakref

from taskrunner._dask.worker import pickled_items
from taskrunner._timer import deadline_of, remaining
from taskrunner.exceptions import TaskRunnerError

__all__ = ["Handle", "PackValues", "Releaser", "fetch", "gather", "gather_each", "items_alone",
           "within"]


class Handle:
    """What a completed run's future holds: the `distributed.Future` of its
    result on the cluster, until the runner exits and the value fetched
    then (or the error fetching it) takes its place.  A run of a pack (see
    worker.py) has item `index` of its pack's values; the handles of one
    pack share a PackValues, so that the values come over once."""

    __slots__ = ("future", "name", "index", "pack", "value", "error", "kept", "__weakref__")

    def __init__(self, future, name, index=None, pack=None):
        self.future = future
        self.name = name            # the task's, for messages
        self.index = index
        self.pack = pack
        self.value = None
        self.error = None
        self.kept = False           # value (or error) fetched and kept here (see prefetch)

    @classmethod
    def holding(cls, value, name):
        """A handle of a value already here (a pack's run whose value came
        with the others' outcomes)."""
        handle = cls(None, name)
        handle.value, handle.kept = value, True
        return handle

    def pick(self, fetched):
        """This run's value, from what its dask future holds."""
        return fetched if self.pack is None else fetched[self.index]


class Releaser:
    """The dask futures of the live Handles, each let go of on this
    registry's own thread once its Handle dies.

    A Handle dies wherever the last future of its run is dropped, often on
    the user's main thread.  Were its dask future to die with it there,
    distributed's Future.__del__ (Python code) would run on that thread,
    and a Ctrl-C that came meanwhile would be lost: an exception in
    __del__ is only printed.  So the registry holds each dask future too,
    beside a weak reference to its Handle whose callback is
    SimpleQueue.put, a C function that runs no Python code; the releaser
    thread takes the references off the queue and drops their futures.
    """

    def __init__(self):
        self.futures = {}               # weak reference to a Handle -> its dask future
        self.dead = queue.SimpleQueue()     # references whose Handle died; None: stop
        self.releaser = threading.Thread(target=self._release, daemon=True,
                                         name="taskrunner-dask-releaser")
        self.releaser.start()

    def add(self, handle):
        self.futures[weakref.ref(handle, self.dead.put)] = handle.future

    def handles(self):
        """The Handles alive now."""
        return [handle for handle in (ref() for ref in list(self.futures)) if handle is not None]

    def close(self):
        """Let go of every future (on the releaser thread) and stop it.
        The Handles still alive must have let go of theirs."""
        self.dead.put(None)
        self.releaser.join()

    def _release(self):
        while True:
            ref = self.dead.get()
            if ref is None:
                break
            self.futures.pop(ref, None)
        self.futures.clear()


class PackValues:
    """The values of one pack's runs, once fetched (see Handle)."""

    __slots__ = ("values",)

    def __init__(self):
        self.values = None

    def fetched(self, future, deadline=None):
        values = self.values
        if values is None:
            values = self.values = gather(future.client, [future], remaining(deadline))[0]
        return values

    def item(self, future, index, deadline=None):
        """Item `index` of the values: from the whole list, or if that does
        not come, alone (items_alone); TimeoutError at `deadline` (a
        time.monotonic() time, or None)."""
        try:
            return self.fetched(future, deadline)[index]
        except TimeoutError:
            raise
        except Exception as whole:
            try:
                [(value, error)] = items_alone(future, [index], deadline)
            except TimeoutError:
                raise
            except Exception:
                raise whole from None       # not even alone: the pack's error stands
            if error is not None:
                raise error from None
            return value


def fetch(handle, timeout):
    """The value a handle stands for (the engine's fetch hook).  The
    transfer counts against `timeout`, as the wait for the run did."""
    if handle.kept:
        if handle.error is not None:
            raise handle.error
        return handle.value
    future = handle.future
    if future is not None:
        try:
            if handle.pack is None:
                return gather(future.client, [future], timeout)[0]
            return handle.pack.item(future, handle.index, deadline_of(timeout))
        except Exception as error:
            if _is_timeout(error):
                raise TimeoutError(
                    f"the result of task run {handle.name!r} did not arrive from the Dask "
                    f"cluster within {timeout} seconds") from None
            if handle.future is not None:
                if future.status == "cancelled":
                    raise _lost_result(handle) from error
                raise
            # The runner exited meanwhile and fetched the value.
    if handle.error is not None:
        raise TaskRunnerError(
            "this result stayed on the Dask cluster and could not be fetched before the "
            "runner closed its client") from handle.error
    return handle.value


def _lost_result(handle):
    """The error for a result Dask no longer has for us (the client lost its
    connection to the scheduler, the cluster restarted): it says why, as
    Dask told the client."""
    cause = getattr(getattr(handle.future, "_state", None), "exception", None)
    reason = getattr(cause, "reason", None) or "Dask cancelled it"
    return TaskRunnerError(
        f"the result of task run {handle.name!r} was lost on the Dask cluster: {reason} "
        f"({cause})")


def _is_timeout(error):
    # distributed raises asyncio's TimeoutError, not the builtin one before 3.11.
    return isinstance(error, (TimeoutError, asyncio.TimeoutError))


def gather(client, futures, timeout=None):
    """client.gather(futures), waited for at most `timeout` seconds (None:
    no limit), else TimeoutError.

    The wait is ours, not distributed's: a Ctrl-C or a timeout in its own
    wait cancels the gather, and with it every gather in flight at that
    moment (the client shares one transfer among them), whose callers then
    fail with an error of distributed's (an UnboundLocalError).  Ours stops
    waiting and leaves the gather to finish on its own, harmlessly."""
    loop = client.loop.asyncio_loop
    if _running_loop() is loop:
        raise RuntimeError("a result kept on the Dask cluster cannot be waited for on the "
                           "Dask client's own event loop thread")
    if loop.is_closed():
        raise _client_closed()
    transfer = asyncio.run_coroutine_threadsafe(_gathered(client, futures), loop)
    deadline = deadline_of(timeout)
    while True:
        left = remaining(deadline)
        try:
            return transfer.result(WAIT_SLICE if left is None else min(left, WAIT_SLICE))
        except concurrent.futures.TimeoutError:     # not the builtin one before 3.11
            if left is not None and remaining(deadline) == 0:
                raise TimeoutError(f"the gather did not end within {timeout} s") from None
            # A client closed meanwhile (by another thread) may never
            # answer: a gather of its stopped loop stays pending.
            if loop.is_closed() or client.status in ("closing", "closed"):
                raise _client_closed() from None
        except concurrent.futures.CancelledError:
            raise _client_closed() from None


WAIT_SLICE = 1.0    # how often a gather's wait looks whether its client is still open


def _client_closed():
    return TaskRunnerError("the Dask client closed (or cancelled the transfer) while results "
                           "kept on the cluster were being fetched")


def _running_loop():
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


async def _gathered(client, futures):
    return await client.gather(futures, asynchronous=True)


def within(timeout, fn, *args, **kwargs):
    """fn(*args), or TimeoutError after `timeout` seconds (None: no limit),
    for calls with no timeout of their own (client.run, say).  One that
    outlasts it is left to finish on its own."""
    if timeout is None:
        return fn(*args, **kwargs)
    outcome = []
    thread = threading.Thread(target=lambda: outcome.append(_outcome(fn, args, kwargs)),
                              daemon=True, name="taskrunner-dask-wait")
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError
    value, error = outcome[0]
    if error is not None:
        raise error
    return value


def _outcome(fn, args, kwargs):
    try:
        return fn(*args, **kwargs), None
    except BaseException as error:
        return None, error


def items_alone(future, indexes, deadline=None):
    """(value, error) of items `indexes` of a pack's values, each unpickled
    here on its own: for when the whole list does not come (one of its
    values cannot be unpickled here, say), so that one bad value does not
    fail its pack's others.  One Dask task and one gather."""
    client = future.client
    picked = client.submit(pickled_items, future, list(indexes), pure=False)
    try:
        [blobs] = gather(client, [picked], remaining(deadline))
    finally:
        picked.release()
    outcomes = []
    for blob in blobs:
        try:
            outcomes.append((pickle.loads(blob), None))
        except Exception as error:
            outcomes.append((None, TaskRunnerError(
                f"the result could not be unpickled here: {type(error).__name__}: {error}")))
    return outcomes


def gather_each(client, futures, deadline=None):
    """(value, error) for each dask future: one gather for all; if that
    fails, each half again, so that each bad one gets its own error at a
    cost of a few gathers, not one per future.  TimeoutError at
    `deadline` (a time.monotonic() time, or None)."""
    if not futures:
        return []
    try:
        return [(value, None) for value in gather(client, futures, remaining(deadline))]
    except TimeoutError:
        raise
    except Exception as error:
        if len(futures) == 1:
            return [(None, error)]
    middle = len(futures) // 2
    return (gather_each(client, futures[:middle], deadline)
            + gather_each(client, futures[middle:], deadline))
