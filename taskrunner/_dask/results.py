"""Results kept on the Dask cluster.

A completed run's future holds a Handle: the `distributed.Future` of its
result on the cluster.  A downstream run names the handle as a dependency
(see calls.py), so that Dask moves the value worker to worker; the client
fetches it only when result() asks (fetch), or many at once (gather_each).
When the runner exits, the values of the handles still held are fetched in
one gather and kept in them, so that result() works after the client has
closed.
"""

import asyncio
import pickle
import threading

from taskrunner._dask.worker import pickled_items
from taskrunner.exceptions import TaskRunnerError

__all__ = ["Handle", "PackValues", "fetch", "gather_each", "items_alone", "within"]


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


class PackValues:
    """The values of one pack's runs, once fetched (see Handle)."""

    __slots__ = ("values",)

    def __init__(self):
        self.values = None

    def fetched(self, future):
        values = self.values
        if values is None:
            values = self.values = future.result()
        return values

    def item(self, future, index):
        """Item `index` of the values: from the whole list, or if that does
        not come, alone (items_alone)."""
        try:
            return self.fetched(future)[index]
        except Exception as whole:
            try:
                [(value, error)] = items_alone(future, [index])
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
            # Not future.result(timeout=...): at its timeout Dask cancels the
            # gather it shares with every fetch in flight at that moment
            # (Client._gather batches them), and those then fail with a
            # bare CancelledError.  Left to finish on its own, it is harmless.
            if handle.pack is None:
                return within(timeout, future.result)
            return within(timeout, handle.pack.item, future, handle.index)
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


def within(timeout, fn, *args, **kwargs):
    """fn(*args), or TimeoutError after `timeout` seconds (None: no limit):
    a gather has no timeout of its own.  One that outlasts it is left to
    finish on its own."""
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


def items_alone(future, indexes):
    """(value, error) of items `indexes` of a pack's values, each unpickled
    here on its own: for when the whole list does not come (one of its
    values cannot be unpickled here, say), so that one bad value does not
    fail its pack's others.  One Dask task and one gather."""
    client = future.client
    picked = client.submit(pickled_items, future, list(indexes), pure=False)
    try:
        blobs = client.gather(picked)
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


def gather_each(client, futures):
    """(value, error) for each dask future: one gather for all; if that
    fails, each half again, so that each bad one gets its own error at a
    cost of a few gathers, not one per future."""
    if not futures:
        return []
    try:
        return [(value, None) for value in client.gather(futures)]
    except Exception as error:
        if len(futures) == 1:
            return [(None, error)]
    middle = len(futures) // 2
    return gather_each(client, futures[:middle]) + gather_each(client, futures[middle:])
