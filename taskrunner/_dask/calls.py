"""A call pickled with its upstream results left out.

What goes to a Dask worker for one run is the task function, and the
call's (args, kwargs) pickled by CallDumper, in which the values that
travel as Dask dependencies, worker to worker, are references to their
place in the run's `deps`: the handles of this runner's results (see
results.py), `distributed` futures of its client (a value the user
scattered, say), and the batch's shared values.  A shared value is one that
several calls of a batch pass (an unmapped parameter, say), large enough to
be worth sending once: SharedValues scatters it to the cluster the first
time and keeps it for the runner's life.  A handle of another runner's
result goes as its value (prefetched with the others of the batch: see
Engine.calls_of).
"""

import copyreg
import io
import pickle

import cloudpickle
import distributed

from taskrunner._dask.results import Handle, fetch
from taskrunner._dask.worker import dep, dep_item
from taskrunner._pickling import PLAIN_TYPES

__all__ = ["CallDumper", "SharedValues", "SHARED_BYTES"]

SHARED_BYTES = 64 << 10     # a value several runs share goes once from this size


class _Dependencies:
    """What a call's pickler puts in place of the values that go as Dask
    dependencies (see the module docstring)."""

    def _reduce_handle(self, handle):
        future = handle.future
        if future is not None and future.client is self.client:
            if handle.pack is None:
                return self._reduce_dep(future)
            _, (index,) = self._reduce_dep(future)
            return dep_item, (index, handle.index)
        return _identity, (fetch(handle, None),)

    def _reduce_dask_future(self, future):
        if future.client is self.client:
            return self._reduce_dep(future)
        return _identity, (future.result(),)

    def _reduce_dep(self, future):
        self.deps.append(future)
        return dep, (len(self.deps) - 1,)


class _CallPickler(_Dependencies, pickle.Pickler):
    """Pickles calls' (args, kwargs) with their dependencies left out."""

    def __init__(self, file, client):
        # The C pickler reads its dispatch table when it is made.
        self.dispatch_table = _dispatch_table(copyreg.dispatch_table, self)
        self.client = client
        self.deps = []
        super().__init__(file, pickle.HIGHEST_PROTOCOL)


class _CloudCallPickler(_Dependencies, cloudpickle.CloudPickler):
    """The same, by value where plain pickle cannot (lambdas, __main__)."""

    def __init__(self, file, client):
        self.dispatch_table = _dispatch_table(cloudpickle.CloudPickler.dispatch_table, self)
        self.client = client
        self.deps = []
        super().__init__(file, pickle.HIGHEST_PROTOCOL)


def _dispatch_table(base, pickler):
    table = dict(base)
    table[Handle] = pickler._reduce_handle
    table[distributed.Future] = pickler._reduce_dask_future
    return table


def _identity(value):
    return value


class _SharedRef:
    """Stands for a shared value in a call: it goes as dependency `index`."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index

    def __reduce__(self):
        return dep, (self.index,)


class CallDumper:
    """Pickles the calls of one batch: dump(call) -> (blob, deps).
    `shared` maps id(value) to the dask future of each shared value
    scattered (see SharedValues)."""

    def __init__(self, client, shared):
        self.client = client
        self.shared = shared
        self.buffer = io.BytesIO()
        self.pickler = _CallPickler(self.buffer, client)

    def dump(self, call):
        call, deps = self._with_shared(call)
        buffer, pickler = self.buffer, self.pickler
        buffer.seek(0)
        buffer.truncate()
        pickler.clear_memo()
        pickler.deps = list(deps)
        try:
            pickler.dump(call)
            blob = buffer.getvalue()
            if b"__main__" not in blob:
                return blob, pickler.deps
        except Exception:
            pass
        other = io.BytesIO()
        cloud = _CloudCallPickler(other, self.client)
        cloud.deps = list(deps)
        cloud.dump(call)
        return other.getvalue(), cloud.deps

    def _with_shared(self, call):
        """The call with its shared values (top-level arguments) replaced
        by references, and their futures, the first of its deps."""
        args, kwargs = call
        shared = self.shared
        if not shared:
            return call, ()
        deps = []
        if any(id(value) in shared for value in args):
            args = tuple(self._ref(value, deps) for value in args)
        if kwargs and any(id(value) in shared for value in kwargs.values()):
            kwargs = {name: self._ref(value, deps) for name, value in kwargs.items()}
        return (args, kwargs), deps

    def _ref(self, value, deps):
        future = self.shared.get(id(value))
        if future is None:
            return value
        deps.append(future)
        return _SharedRef(len(deps) - 1)


class SharedValues:
    """The values scattered to the cluster to be shared by calls, kept for
    the runner's life with the value, so that the id stays the value's."""

    def __init__(self, client):
        self.client = client
        self.scattered = {}         # id(value) -> (value, dask future)

    def of(self, calls):
        """{id(value): dask future} of the values several of `calls` (a
        list of (args, kwargs)) share that are worth sending once; each
        is scattered the first time."""
        scattered = self.scattered
        counts = {}
        for args, kwargs in calls:
            for value in args:
                if _may_share(value):
                    counts[id(value)] = counts.get(id(value), 0) + 1
            if kwargs:
                for value in kwargs.values():
                    if _may_share(value):
                        counts[id(value)] = counts.get(id(value), 0) + 1
        if not counts:
            return {}
        shared = {}
        values = {}
        for args, kwargs in calls:
            for value in (*args, *(kwargs or {}).values()):
                if counts.get(id(value), 0) > 1 or id(value) in scattered:
                    values[id(value)] = value
        for key, value in values.items():
            found = scattered.get(key)
            if found is None:
                if _size_of(value) < SHARED_BYTES:
                    continue
                found = scattered[key] = (value, self.client.scatter([value], hash=False)[0])
            shared[key] = found[1]
        return shared

    def clear(self):
        self.scattered.clear()


def _may_share(value):
    """Whether a call's argument could be worth sharing: not a small scalar
    or string, not a result handle (those go as dependencies anyway)."""
    kind = type(value)
    if kind in (str, bytes):
        return len(value) >= SHARED_BYTES
    return kind not in PLAIN_TYPES and kind is not Handle


def _size_of(value):
    """About how many bytes `value` takes to send (its buffers counted, not
    copied)."""
    if type(value) in (str, bytes):
        return len(value)
    buffers = []
    try:
        size = len(pickle.dumps(value, protocol=5, buffer_callback=buffers.append))
    except Exception:
        return 0        # left in the calls: pickling them tells what is wrong
    return size + sum(buffer.raw().nbytes for buffer in buffers)
