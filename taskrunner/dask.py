"""DaskTaskRunner: runs tasks on a Dask cluster through `distributed`.

The dependency graph stays in this process, in the engine: a run goes to
the cluster only once its upstreams have completed, so NotReady,
allow_failure, wait_for, the map rules and cancellation work as for the
other runners.  Results stay on the cluster: a completed run's future holds
a handle (its `distributed.Future`), a downstream run names that handle as
a dependency, so Dask moves the data worker to worker, and the client
fetches a value only when result() is called.  When the runner exits, the
values of the futures still held anywhere are gathered in one call, so that
result() still works after the client has closed.

Two threads serve an entered runner.  The dispatcher takes ready runs from
the engine and hands each batch to the scheduler in one `update-graph`
message (`Client.map` over the batch).  The watcher reads completions in
batches (`distributed.as_completed`) and ends the runs.

Tasks run wrapped by `_run` on the workers.  The wrapper raises the task's
own exceptions inside a `_TaskRaised`, so that anything else reported as an
error (a worker that kept dying, a task Dask could not load) is known to
come from the cluster.  It also refuses to start a run this runner has
recalled: `cancel()` and `cancel_all()` mark the recalled keys on every
worker, in the worker's event loop, unless the worker reports the run may
have started; a marked run never calls the task (see `_hold_back`).

`distributed` is imported only when a runner is made.
"""

import copyreg
import importlib
import io
import itertools
import logging
import pickle
import threading
import traceback
import types
import uuid
import weakref
from collections.abc import Mapping

import cloudpickle

from taskrunner._calls import TaskLoop, call_spec
from taskrunner._engine import Engine
from taskrunner._futures import consumer_hooks
from taskrunner._graph import STATES
from taskrunner.base import EngineTaskRunner
from taskrunner.exceptions import CrashedRun, TaskRunnerError
from taskrunner._pickling import (
    check_picklable, checked_map_value, dumps, dumps_checked, unsendable_call_error,
    with_remote_traceback,
)
from taskrunner._mapped import join_runs
from taskrunner._remote import Outbox

__all__ = ["DaskTaskRunner"]

_log = logging.getLogger("taskrunner")

_COMPLETED, _FAILED, _CRASHED = STATES["COMPLETED"], STATES["FAILED"], STATES["CRASHED"]

# How many runs are handed to the cluster at once.  Measured on a 4-thread
# LocalCluster: throughput is the same from 16 to 2,000 runs per thread (the
# scheduler sets the pace); many runs per thread make few, large messages,
# and a cancel_all() still asks the workers about all of them in one.
RUNS_PER_THREAD = 512   # runs handed to the cluster at once, per worker thread
MIN_WINDOW = 1_024      # ... at least (a cluster may have no worker yet)
MAX_BATCH = 5_000       # runs in one message to the scheduler at most
SHARED_BYTES = 64 << 10     # a value several runs share goes once from this size
HOLD_BACK_SECONDS = 3.0     # a recall waits this long for the workers to answer

_INSTALL_HINT = "pip install 'taskrunner[dask]'"


def _distributed():
    """The `distributed` module, or an ImportError saying how to get it."""
    try:
        import distributed
    except ImportError as error:
        raise ImportError(
            f"DaskTaskRunner needs the 'distributed' package, an optional extra of "
            f"taskrunner: {_INSTALL_HINT}") from error
    return distributed


class DaskTaskRunner(EngineTaskRunner):
    """Runs tasks on a Dask cluster.

    With `address=None`, entering starts `cluster_class(**cluster_kwargs)`
    (`distributed.LocalCluster` by default; a class, or its qualified name
    as a string) and exiting closes it.  With `address` ("tcp://host:8786"),
    entering connects to that running scheduler and exiting closes only the
    client.  `client_kwargs` go to `distributed.Client`.

    Task functions and their arguments travel with pickle (cloudpickle for
    lambdas, closures and `__main__`); the workers must be able to import
    `taskrunner` and the modules the tasks come from.
    """

    def __init__(self, address=None, cluster_class=None, cluster_kwargs=None, client_kwargs=None):
        if address is not None and not isinstance(address, str):
            raise TypeError(
                f"address must be a scheduler address string such as 'tcp://host:8786', "
                f"or None, not {type(address).__name__}")
        cluster_kwargs = _mapping_arg(cluster_kwargs, "cluster_kwargs")
        client_kwargs = _mapping_arg(client_kwargs, "client_kwargs")
        if address is not None and (cluster_class is not None or cluster_kwargs):
            raise ValueError(
                "give either address (connect to a running scheduler) or "
                "cluster_class/cluster_kwargs (start a cluster), not both")
        if client_kwargs.get("asynchronous"):
            raise ValueError("client_kwargs: asynchronous=True is not supported; "
                             "the runner drives a synchronous client")
        _distributed()
        if address is not None:
            _check_address(address)
        self._address = address
        self._cluster_class = _resolve_class(cluster_class)
        self._cluster_kwargs = cluster_kwargs
        self._client_kwargs = client_kwargs
        self._functions = {}        # id(task) -> task, checked to pickle
        self._dispatch = None

    # -- settings --------------------------------------------------------------

    @property
    def name(self):
        return "dask"

    @property
    def address(self):
        """The scheduler address given, or None (a cluster is started)."""
        return self._address

    @property
    def cluster_class(self):
        """The class of the cluster started on entering, or None (LocalCluster)."""
        return self._cluster_class

    @property
    def cluster_kwargs(self):
        return dict(self._cluster_kwargs)

    @property
    def client_kwargs(self):
        return dict(self._client_kwargs)

    @property
    def client(self):
        """The `distributed.Client` while entered, else None."""
        dispatch = self._dispatch
        return dispatch.client if dispatch is not None else None

    @property
    def cluster(self):
        """The cluster this runner started, while entered; None if it
        connected to an address, or is not entered."""
        dispatch = self._dispatch
        return dispatch.cluster if dispatch is not None else None

    def duplicate(self):
        return type(self)(address=self._address, cluster_class=self._cluster_class,
                          cluster_kwargs=self.cluster_kwargs, client_kwargs=self.client_kwargs)

    def __eq__(self, other):
        if type(other) is not type(self):
            return NotImplemented
        return self._settings() == other._settings()

    def __hash__(self):
        return hash((type(self), self._address, self._cluster_class))

    def _settings(self):
        return (self._address, self._cluster_class, self._cluster_kwargs, self._client_kwargs)

    def __repr__(self):
        if self._address is not None:
            return f"DaskTaskRunner(address={self._address!r})"
        cls = self._cluster_class.__name__ if self._cluster_class else "LocalCluster"
        return f"DaskTaskRunner(cluster_class={cls}, cluster_kwargs={self._cluster_kwargs!r})"

    # -- submitting --------------------------------------------------------------

    def submit(self, task, parameters=None, wait_for=None, dependencies=None):
        engine = self._started()
        self._check_function(task)
        if parameters is not None and hasattr(parameters, "items"):
            for name, value in parameters.items():
                check_picklable(value, f"parameter {name!r}")
        return engine.submit(task, parameters, wait_for, dependencies)

    def map(self, task, parameters, wait_for=None):
        engine = self._started()
        self._check_function(task)
        if hasattr(parameters, "items"):
            parameters = {name: checked_map_value(name, value)
                          for name, value in parameters.items()}
        return engine.map(task, parameters, wait_for)

    def _check_function(self, task):
        """TypeError at the call if the task cannot go to the cluster; the
        engine reports a non-callable itself."""
        if self._functions.get(id(task)) is task or not callable(task):
            return
        spec = call_spec(task)
        dumps_checked(spec.fn, f"task {spec.name!r}")
        if len(self._functions) >= 4096:
            self._functions.clear()
        self._functions[id(task)] = task

    # -- entering and exiting ----------------------------------------------------------

    def _start(self):
        distributed = _distributed()
        client_kwargs = {"set_as_default": False, **self._client_kwargs}
        cluster = client = None
        try:
            if self._address is None:
                cluster_class = self._cluster_class or distributed.LocalCluster
                cluster = cluster_class(**self._cluster_kwargs)
                client = distributed.Client(cluster, **client_kwargs)
            else:
                client = distributed.Client(self._address, **client_kwargs)
            window = max(MIN_WINDOW, RUNS_PER_THREAD * sum(client.nthreads().values()))
            dispatch = _Dispatch(client, cluster, window)
            engine = Engine(window, None, dispatch.recall, _fetch, dispatch.fetch_many,
                            dispatch.prefetch, callbacks_apart=True)
            try:
                dispatch.start(engine)
            except BaseException:
                engine.close()
                raise
        except BaseException:
            _close_quietly(client, cluster)
            raise
        self._dispatch = dispatch
        return engine

    def _stop(self):
        dispatch, self._dispatch = self._dispatch, None
        self._functions.clear()
        if dispatch is not None:
            dispatch.stop()


def _check_address(address):
    """ValueError naming `address` unless it reads as a scheduler address
    ("tcp://host:port", "host:port", or another of Dask's schemes)."""
    from distributed.comm import registry
    from distributed.comm.addressing import parse_address, parse_host_port

    example = "such as 'tcp://10.0.0.5:8786'"
    if not address:
        raise ValueError("address must not be empty; use None to start a local cluster")
    if address != address.strip() or any(c.isspace() for c in address):
        raise ValueError(f"address {address!r} is not a Dask scheduler address {example}")
    try:
        scheme, location = parse_address(address)
        registry.get_backend(scheme)
        if scheme in ("tcp", "tls", "ws", "wss"):
            host, _ = parse_host_port(location, default_port=8786)
            if not host:
                raise ValueError("no host")
    except Exception as error:
        raise ValueError(f"address {address!r} is not a Dask scheduler address {example} "
                         f"({error})") from None


def _mapping_arg(value, what):
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise TypeError(
            f"{what} must be a mapping of keyword arguments, not {type(value).__name__}")
    for key in value:
        if not isinstance(key, str):
            raise TypeError(f"{what} keys must be strings, not {type(key).__name__}")
    return dict(value)


def _resolve_class(cluster_class):
    """A cluster class from a class, a callable or a "module.Class" string."""
    if cluster_class is None:
        return None
    if isinstance(cluster_class, str):
        module_name, _, attribute = cluster_class.rpartition(".")
        if not module_name:
            raise ValueError(
                f"cluster_class {cluster_class!r} must be a qualified name, such as "
                f"'distributed.LocalCluster'")
        try:
            module = importlib.import_module(module_name)
        except ImportError as error:
            raise ClusterClassNotFound(
                f"cluster_class {cluster_class!r}: cannot import module {module_name!r} "
                f"({error})", name=module_name) from error
        try:
            cluster_class = getattr(module, attribute)
        except AttributeError:
            raise ValueError(f"cluster_class {cluster_class!r}: module {module_name!r} "
                             f"has no attribute {attribute!r}") from None
    if not callable(cluster_class):
        raise TypeError(f"cluster_class must be a class, a callable or a 'module.Class' "
                        f"string, not {type(cluster_class).__name__}")
    return cluster_class


class ClusterClassNotFound(ModuleNotFoundError, ValueError):
    """cluster_class names a module that cannot be imported: a bad setting
    (ValueError) as much as a missing module."""


def _close_quietly(client, cluster):
    for closable in (client, cluster):
        if closable is not None:
            try:
                closable.close()
            except Exception:
                _log.exception("could not close %r", closable)


# -- results kept on the cluster ----------------------------------------------------

class _Handle:
    """What a completed run's future holds: the `distributed.Future` of its
    result on the cluster, until the runner exits and the value fetched
    then (or the error fetching it) takes its place."""

    __slots__ = ("future", "name", "value", "error", "kept", "__weakref__")

    def __init__(self, future, name):
        self.future = future
        self.name = name            # the task's, for messages
        self.value = None
        self.error = None
        self.kept = False           # value (or error) fetched and kept here (see prefetch)


def _fetch(handle, timeout):
    """The value a handle stands for (the engine's fetch hook).  The
    transfer counts against `timeout`, as the wait for the run did."""
    if handle.kept:
        if handle.error is not None:
            raise handle.error
        return handle.value
    future = handle.future
    if future is not None:
        try:
            return future.result(timeout=timeout)
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
    import asyncio

    return isinstance(error, (TimeoutError, asyncio.TimeoutError))


def _within(timeout, fn, *args, **kwargs):
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


# -- what runs on the workers ------------------------------------------------------------

class _TaskRaised(Exception):
    """Carries the exception a task raised, and its traceback text, back
    from a worker.  Its str stays short: Dask truncates long ones."""

    def __init__(self, error, text):
        super().__init__(error, text)
        self.error = error
        self.text = text

    def __str__(self):
        return f"the task raised {type(self.error).__name__}"


class _Recalled(Exception):
    """A recalled run reached a worker: it was not run."""


_NOT_STARTED = frozenset(("waiting", "ready", "constrained", "released"))
_marks_lock = threading.Lock()
_held_back = set()              # keys this worker process must not run
_loading = threading.local()    # the dependencies of the arguments being unpickled


def _run(fn, is_async, key, blob, deps):
    """Run one task call on a worker; its arguments are `blob`, pickled
    with the upstream results left out: those are `deps`."""
    with _marks_lock:
        if key in _held_back:
            _held_back.discard(key)
            raise _Recalled(key)
    failure = text = None
    try:
        _loading.deps = deps
        try:
            args, kwargs = pickle.loads(blob)
        finally:
            _loading.deps = None
    except BaseException as error:
        failure = TaskRunnerError(f"the arguments of this run could not be unpickled on the "
                                  f"Dask worker: {type(error).__name__}: {error}")
        text = traceback.format_exc()
    else:
        try:
            with consumer_hooks(_Seceder()):
                value = fn(*args, **kwargs) if kwargs else fn(*args)
            if is_async or type(value) is types.CoroutineType:
                loop = TaskLoop()
                try:
                    value = loop.run_coroutine(value)
                finally:
                    loop.close()
        except BaseException as error:
            failure, text = error, traceback.format_exc()
        else:
            failure = _unsendable_result(value, key)
            if failure is None:
                return value
    # Raised outside the except blocks, so it carries no context of its own.
    raise _TaskRaised(_portable(failure), text)


class _Seceder:
    """The consumer hooks of a task running on a Dask worker: the first
    time it blocks on a future (of its own runner, say), it secedes from
    the worker's thread pool, so that the run it waits for can start.  It
    does not rejoin: Dask lets a task secede only once, and one that has
    seceded may finish outside the pool."""

    __slots__ = ("seceded",)

    def __init__(self):
        self.seceded = False

    def blocking(self):
        if not self.seceded:
            self.seceded = True
            _distributed().secede()

    def resumed(self):
        pass


_PLAIN = frozenset((int, float, str, bytes, bool, type(None)))


def _unsendable_result(value, key):
    """None if Dask can move `value` off this worker (to a downstream run on
    another worker, or to the client); else the TypeError that fails the
    run.  Dask would find out only when a transfer fails, and keep the run
    that needs the value waiting for ever.  Serializing out of band (as
    Dask does) does not copy the buffers of large arrays."""
    if type(value) in _PLAIN:
        return None
    try:
        pickle.dumps(value, protocol=5, buffer_callback=_out_of_band)
    except Exception:
        try:
            cloudpickle.dumps(value, protocol=5, buffer_callback=_out_of_band)
        except Exception as error:
            name = key.rsplit("-", 2)[0]
            return TypeError(f"the result of task {name!r}, a {type(value).__name__}, cannot "
                             f"be pickled to leave the Dask worker: {error}")
    return None


def _out_of_band(buffer):
    return None     # leave the buffer out of the pickle: no copy


def _portable(error):
    """`error` if it survives pickling, else a TaskRunnerError describing it."""
    try:
        pickle.loads(cloudpickle.dumps(error))
        return error
    except Exception as why:
        return TaskRunnerError(f"{type(error).__name__}: {error} (the task's exception could "
                               f"not be pickled to leave the worker: {why})")


def _dep(index):
    """Unpickling an upstream result: the value Dask delivered for it."""
    return _loading.deps[index]


def _hold_back(keys, dask_worker):
    """On a worker, in its event loop (where runs start): mark the runs of
    `keys` not to be run, except those that may have started here.  Returns
    those."""
    tasks = dask_worker.state.tasks
    maybe_started = []
    with _marks_lock:
        for key in keys:
            state = tasks.get(key)
            if state is None or state.state in _NOT_STARTED:
                _held_back.add(key)
            else:
                maybe_started.append(key)
    return maybe_started


def _forget_marks(session):
    """On a worker: drop the marks of one runner session's keys."""
    tag = f"-{session}-"
    with _marks_lock:
        _held_back.difference_update([key for key in _held_back if tag in key])


# -- pickling a call with its upstream handles left out -----------------------------------

class _Dependencies:
    """What a call's pickler puts in place of the values that go as Dask
    dependencies, worker to worker, and not inside the call: the handles of
    this runner's results, `distributed` futures of its client (a value
    the user scattered, say), and the batch's shared values (scattered
    once, see _Dispatch._shared_values).  Each is a reference to its place
    in `deps`.  A handle of another runner's result goes as its value
    (prefetched with the others of the batch: see Engine.calls_of)."""

    def _reduce_handle(self, handle):
        future = handle.future
        if future is not None and future.client is self.client:
            return self._reduce_dep(future)
        return _identity, (_fetch(handle, None),)

    def _reduce_dask_future(self, future):
        if future.client is self.client:
            return self._reduce_dep(future)
        return _identity, (future.result(),)

    def _reduce_dep(self, future):
        self.deps.append(future)
        return _dep, (len(self.deps) - 1,)


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
    table[_Handle] = pickler._reduce_handle
    table[_distributed().Future] = pickler._reduce_dask_future
    return table


def _identity(value):
    return value


def _may_share(value):
    """Whether a call's argument could be worth sharing: not a small scalar
    or string, not a result handle (those go as dependencies anyway)."""
    kind = type(value)
    if kind in (str, bytes):
        return len(value) >= SHARED_BYTES
    return kind not in _PLAIN and kind is not _Handle


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


class _SharedRef:
    """Stands for a shared value in a call: it goes as dependency `index`."""

    __slots__ = ("index",)

    def __init__(self, index):
        self.index = index

    def __reduce__(self):
        return _dep, (self.index,)


class _CallDumper:
    """Pickles the calls of one batch: dump(call) -> (blob, deps).
    `shared` maps id(value) to the dask future of each shared value
    scattered (see _Dispatch._shared_values)."""

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


def _gather_each(client, futures):
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
    return _gather_each(client, futures[:middle]) + _gather_each(client, futures[middle:])


# -- the dispatcher and the watcher ---------------------------------------------------------

class _Sent:
    """A run handed to Dask: the run (a RunList of one) and its task's name."""

    __slots__ = ("runs", "name")

    def __init__(self, runs, name):
        self.runs = runs
        self.name = name


class _Dispatch:
    """The client side of one entered runner: hands runs to the scheduler,
    ends them as Dask reports them done, takes back recalled ones."""

    def __init__(self, client, cluster, window):
        self.client = client
        self.cluster = cluster          # ours to close, or None
        self.window = window            # runs handed over at most (the engine's limit)
        self.engine = None
        self.session = uuid.uuid4().hex
        self.numbers = itertools.count()
        self.lock = threading.Lock()
        self.wake = threading.Condition(self.lock)
        self.keys = {}                  # run id -> key, for runs handed over
        self.runs = {}                  # key -> _Sent
        self.dask_futures = {}          # key -> distributed.Future, once sent
        self.recalling = set()          # keys being recalled now
        self.recalled_any = False
        self.handles = weakref.WeakSet()    # of completed runs, to fetch at exit
        self.scattered = {}             # id(value) -> (value, dask future): see _shared_values
        self.completions = None
        self.closing = False
        self.threads = []

    def start(self, engine):
        from distributed import as_completed

        self.engine = engine
        self.outbox = Outbox(engine)
        self.completions = as_completed(loop=self.client.loop)
        for target, name in ((self._dispatch, "dispatcher"), (self._watch, "watcher")):
            thread = threading.Thread(target=target, name=f"taskrunner-dask-{name}", daemon=True)
            thread.start()
            self.threads.append(thread)

    def stop(self):
        """After the engine closed: stop the threads, fetch the results
        still held, close the client (and the cluster if ours)."""
        with self.lock:
            self.closing = True
            self.wake.notify_all()
        self.completions.clear()
        self.scattered.clear()
        for thread in self.threads:
            thread.join()
        try:
            self._fetch_held()
            if self.recalled_any and self.client.status == "running":
                # Bounded, as the marks were: a lost scheduler must not hold
                # the exit (the marks then go with the workers).
                _within(HOLD_BACK_SECONDS, self.client.run, _forget_marks, self.session,
                        on_error="ignore")
        except TimeoutError:
            _log.warning("the Dask workers did not answer within %s s on exit",
                         HOLD_BACK_SECONDS)
        except Exception:
            _log.exception("could not settle the Dask results on exit")
        finally:
            _close_quietly(self.client, self.cluster)

    def prefetch(self, handles):
        """Fetch the values of `handles` not yet here in one gather, and
        keep them in the handles (the engine's prefetch hook: for runs of
        other runners that take many of them)."""
        todo = [h for h in handles if h.future is not None and not h.kept]
        for handle, (value, error) in zip(todo, self._gather(todo)):
            handle.value, handle.error, handle.kept = value, error, True

    def fetch_many(self, handles, timeout):
        """The values `handles` stand for, those still on the cluster
        fetched in one gather (the engine's fetch_many hook)."""
        on_cluster = [h for h in handles if h.future is not None]
        try:
            gathered = _within(timeout, self._gather, on_cluster) if on_cluster else []
        except TimeoutError:
            raise TimeoutError(
                f"the results of {len(on_cluster)} task runs ({on_cluster[0].name!r}, ...) "
                f"did not arrive from the Dask cluster within {timeout} seconds") from None
        fetched = dict(zip(map(id, on_cluster), gathered))
        values = []
        for handle in handles:
            value, error = fetched.get(id(handle)) or (_fetch(handle, timeout), None)
            if error is not None:
                raise error
            values.append(value)
        return values

    def _fetch_held(self):
        handles = [h for h in list(self.handles) if h.future is not None and not h.kept]
        if handles and self.client.status != "running":
            lost = TaskRunnerError("the client lost its connection to the Dask scheduler")
            for handle in handles:
                handle.error, handle.future = lost, None
            return
        for handle, (value, error) in zip(handles, self._gather(handles)):
            handle.value, handle.error, handle.future = value, error, None

    def _gather(self, handles):
        """(value, error) for each handle's dask future (see _gather_each)."""
        return _gather_each(self.client, [h.future for h in handles])

    # -- handing runs over ----------------------------------------------------------------

    def _dispatch(self):
        outbox = self.outbox
        low = self.window // 2
        while True:
            # With more than half the window in flight the cluster has work
            # queued: wait for the rest to free up, and send it in one go.
            with self.lock:
                while len(self.runs) > low and not self.closing:
                    self.wake.wait()
            runs = outbox.take(MAX_BATCH)
            if runs is None:
                return
            try:
                self._send(runs)
            except Exception as error:     # a bug, or the cluster is gone: never lose runs
                _log.exception("could not hand runs to the Dask scheduler")
                self._crash_unsent(runs, error)

    def _send(self, runs):
        specs, calls = [], []
        for spec, args_list, kwargs_list, _ in self.outbox.calls(runs):
            for j, args in enumerate(args_list):
                specs.append(spec)
                calls.append((args, kwargs_list[j] if kwargs_list else None))
        session = self.session
        with self.lock:
            # Sent and registered in one critical section of ours: a recall
            # (under this lock) finds every run sent.  Those cancelled since
            # we took them stay behind.
            sent = set(self.outbox.mark_sent(runs).run_ids())
            keys = []
            for i, run_id in enumerate(runs.run_ids()):
                if run_id not in sent:
                    keys.append(None)
                    continue
                key = f"{specs[i].name}-{session}-{next(self.numbers)}"
                self.keys[run_id] = key
                self.runs[key] = _Sent(runs[i:i + 1], specs[i].name)
                keys.append(key)
        fns, asyncs, blobs, deps, sent_keys = [], [], [], [], []
        unpicklable = []
        dumper = _CallDumper(self.client, self._shared_values(calls))
        for key, spec, call in zip(keys, specs, calls):
            if key is None:
                continue
            try:
                blob, dep = dumper.dump(call)
            except Exception as error:
                unpicklable.append((key, spec, call, error))
                continue
            fns.append(spec.fn)
            asyncs.append(spec.is_async)
            blobs.append(blob)
            deps.append(dep)
            sent_keys.append(key)
        if unpicklable:
            self._fail_unpicklable(unpicklable)
        with self.lock:
            kept = [i for i, key in enumerate(sent_keys) if key in self.runs]
        if len(kept) < len(sent_keys):      # some were recalled meanwhile
            fns, asyncs, blobs, deps, sent_keys = (
                [column[i] for i in kept] for column in (fns, asyncs, blobs, deps, sent_keys))
        if not sent_keys:
            return
        dask_futures = self.client.map(_run, fns, asyncs, sent_keys, blobs, deps,
                                       key=sent_keys, pure=False)
        with self.lock:
            for key, dask_future in zip(sent_keys, dask_futures):
                # A run recalled since will refuse to run: its workers have it marked.
                if key in self.runs:
                    self.dask_futures[key] = dask_future
            self.wake.notify_all()
        # Watched once registered: the watcher and recall() find them here.
        self.completions.update(dask_futures)

    def _shared_values(self, calls):
        """{id(value): dask future} of the values several calls of a batch
        share (an unmapped parameter, say) that are large enough to be
        worth sending once: each is scattered to the cluster the first
        time, and goes to the calls as a dependency, not inside each call.
        Kept for the runner's life, with the value, so that the id stays
        the value's."""
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

    def _fail_unpicklable(self, failures):
        ended, errors = [], []
        with self.lock:
            for key, spec, (args, kwargs), error in failures:
                sent = self._forget(key)
                if sent is not None:
                    ended.append(sent.runs)
                    errors.append(unsendable_call_error(
                        spec, args, kwargs, dumps, "the Dask cluster", error))
        if ended:
            self.outbox.finish(join_runs(ended), errors, _FAILED)

    def _crash_unsent(self, runs, error):
        crashed = []
        with self.lock:
            for run_id in runs.run_ids():
                key = self.keys.get(run_id)
                if key is not None and key not in self.dask_futures:
                    crashed.append(self._forget(key).runs)
        if crashed:
            crash = CrashedRun(f"could not hand the run to the Dask scheduler: "
                               f"{type(error).__name__}: {error}")
            self.outbox.finish(join_runs(crashed), [crash] * len(crashed), _CRASHED)

    def _forget(self, key):
        """Drop a run handed over; its _Sent, or None if already dropped.
        The caller ends it in the engine.  Lock held."""
        sent = self.runs.pop(key, None)
        if sent is not None:
            del self.keys[sent.runs.run_ids()[0]]
            self.dask_futures.pop(key, None)
            self.wake.notify_all()
        return sent

    # -- runs ending -----------------------------------------------------------------------

    def _watch(self):
        completions = self.completions
        while True:
            with self.lock:
                while not self.dask_futures and not self.closing:
                    self.wake.wait()
                if self.closing:
                    # The engine has closed: every run has ended, unless the
                    # exit was interrupted, and then none will be waited for.
                    return
            try:
                batch = completions.next_batch(block=True)
            except StopIteration:
                # Empty for now: what is in flight was recalled, or is being added.
                with self.lock:
                    if self.closing:
                        return
                    self.wake.wait(0.05)
                continue
            try:
                self._ended(batch)
            except Exception:               # a bug: log it, never lose the watcher
                _log.exception("error handling Dask results")

    def _ended(self, batch):
        ended, values, states = [], [], []
        requeue, rewatch = [], []
        for dask_future in batch:
            key = dask_future.key
            with self.lock:
                if self.runs.get(key) is None or key in self.recalling:
                    continue            # recalled: the recall ends it
            status = dask_future.status
            if status == "finished":
                outcome = _Handle(dask_future, None), _COMPLETED
            elif status == "cancelled":
                # Not by a recall (that one ends the run itself): the
                # scheduler went, or the cluster restarted.
                outcome = self._lost_reason(), _CRASHED
            elif status not in ("error", "cancelled"):
                # Its result was lost with a worker after it ended, and Dask
                # computes it again: watch for that.
                rewatch.append(dask_future)
                continue
            else:
                error = _error_of(dask_future)
                if isinstance(error, _Recalled):
                    outcome = None
                else:
                    outcome = _outcome_of(error)
            with self.lock:
                sent = self._forget(key)
            if sent is None:
                continue
            if outcome is None:
                # Marks left by a recall that found the run may have started
                # elsewhere; this attempt did not start: run it again.
                requeue.append(sent.runs)
                continue
            value, state = outcome
            if state == _COMPLETED:
                value.name = sent.name
                self.handles.add(value)
            elif state == _CRASHED:
                future = sent.runs[0]
                value = CrashedRun(f"task run {future.task_name!r} ({future.task_run_id}): "
                                   f"{value}")
            ended.append(sent.runs)
            values.append(value)
            states.append(state)
        if rewatch:
            self.completions.update(rewatch)
        if requeue:
            self.outbox.give_back(join_runs(requeue), False)
        if ended:
            self.outbox.finish(join_runs(ended), values, states)

    def _lost_reason(self):
        if self.client.status != "running":
            return ("the Dask scheduler was lost (the client's connection to it closed) "
                    "while this run was on the cluster")
        return "Dask cancelled it (the cluster restarted, or another client cancelled it)"

    # -- taking runs back ---------------------------------------------------------------------

    def recall(self, runs):
        """The engine's recall hook: take back runs handed to Dask that
        surely never started, the one run of `runs` or with None every such
        run, and return them (a RunList) for the engine to cancel.  The
        dispatcher marks runs sent and registers their keys under this
        lock, so a run sent always has its key here.

        The keys are marked on every worker, in its event loop, where runs
        start (see _hold_back); a worker answers which of them may have
        started there.  The others never run: their dask futures are
        cancelled.  A worker that joins after the marks and before the
        scheduler has the cancellation could still run one: the window is
        one message long."""
        with self.lock:
            if runs is None:
                keys = [k for k in self.runs if k not in self.recalling]
            else:
                key = self.keys.get(runs.run_ids()[0])
                keys = [key] if key is not None and key not in self.recalling else []
            if not keys:
                return None         # not ours (any more): it is ending
            self.recalling.update(keys)
            self.recalled_any = True
        maybe_started = self._hold_back(keys)
        cancelled, dask_futures = [], []
        with self.lock:
            self.recalling.difference_update(keys)
            for key in keys:
                if key in maybe_started:
                    continue
                dask_future = self.dask_futures.get(key)
                sent = self._forget(key)
                if sent is not None:
                    cancelled.append(sent.runs)
                    if dask_future is not None:
                        dask_futures.append(dask_future)
        if dask_futures:
            try:
                self.client.cancel(dask_futures)
            except Exception:
                pass        # marked: they cannot run anyway
        self._watch_again([k for k in keys if k in maybe_started])
        return join_runs(cancelled)

    def _hold_back(self, keys):
        """Mark `keys` on every worker; the set that may have started."""
        if self.client.status != "running":
            # No scheduler to reach the workers through (it is lost, or
            # being reconnected to): asking would block until a timeout.
            # The runs end as Dask reports them.
            return set(keys)
        try:
            # Bounded: a scheduler that died a moment ago (the client has not
            # noticed yet) would keep the call waiting for Dask's connect
            # timeout.  Unanswered, every run may have started.
            answers = _within(HOLD_BACK_SECONDS, self.client.run, _hold_back, keys,
                              on_error="return")
        except TimeoutError:
            _log.warning("the Dask workers did not answer a recall within %s s",
                         HOLD_BACK_SECONDS)
            return set(keys)
        except Exception:
            _log.exception("could not recall runs from the Dask workers")
            return set(keys)
        maybe_started = set()
        for answer in answers.values():
            if isinstance(answer, BaseException):
                return set(keys)        # a worker that could not answer
            maybe_started.update(answer)
        return maybe_started

    def _watch_again(self, keys):
        """The watcher skipped the ends of runs being recalled: those not
        recalled after all are watched again (one seen twice is ended once)."""
        with self.lock:
            again = [self.dask_futures[k] for k in keys if k in self.dask_futures]
        if again:
            self.completions.update(again)


def _error_of(dask_future):
    """The exception of an erred or cancelled dask future."""
    try:
        return dask_future.exception()
    except BaseException as error:     # cancelled: exception() raises the reason
        return error


def _outcome_of(error):
    """(value, state) of a run whose dask future did not finish."""
    from distributed import CancelledError, KilledWorker

    if isinstance(error, _TaskRaised):
        return with_remote_traceback(error.error, error.text), _FAILED
    if isinstance(error, KilledWorker):
        return f"the Dask workers running it kept dying (KilledWorker): {error}", _CRASHED
    if isinstance(error, CancelledError):
        return f"Dask cancelled it: {error}", _CRASHED
    return TaskRunnerError(f"Dask could not run this task: {type(error).__name__}: "
                           f"{error}"), _FAILED
