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
import time
import traceback
import types
import uuid
import weakref
from collections.abc import Mapping

import cloudpickle

from taskrunner._calls import call_spec
from taskrunner._engine import Engine
from taskrunner._graph import STATES
from taskrunner.base import EngineTaskRunner
from taskrunner.exceptions import CrashedRun, TaskRunnerError
from taskrunner._pickling import (
    check_picklable, checked_map_value, dumps_checked, with_remote_traceback,
)
from taskrunner.threads import _WorkerLoop

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
IN_HAND_TIMEOUT = 10.0  # seconds a recall waits for the dispatcher to register runs

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
        if address is not None and not address:
            raise ValueError("address must not be empty; use None to start a local cluster")
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
            engine = Engine(window, None, dispatch.recall, _fetch, dispatch.fetch_many)
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
        module = importlib.import_module(module_name)
        try:
            cluster_class = getattr(module, attribute)
        except AttributeError:
            raise ValueError(f"cluster_class {cluster_class!r}: module {module_name!r} "
                             f"has no attribute {attribute!r}") from None
    if not callable(cluster_class):
        raise TypeError(f"cluster_class must be a class, a callable or a 'module.Class' "
                        f"string, not {type(cluster_class).__name__}")
    return cluster_class


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

    __slots__ = ("future", "value", "error", "__weakref__")

    def __init__(self, future):
        self.future = future
        self.value = None
        self.error = None


def _fetch(handle, timeout):
    """The value a handle stands for (the engine's fetch hook)."""
    future = handle.future
    if future is not None:
        try:
            return future.result(timeout=timeout)
        except Exception:
            if handle.future is not None:
                raise
            # The runner exited meanwhile and fetched the value.
    if handle.error is not None:
        raise TaskRunnerError(
            "this result stayed on the Dask cluster and could not be fetched before the "
            "runner closed its client") from handle.error
    return handle.value


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
            value = fn(*args, **kwargs) if kwargs else fn(*args)
            if is_async or type(value) is types.CoroutineType:
                loop = _WorkerLoop()
                try:
                    value = loop.run_coroutine(value)
                finally:
                    loop.close()
            return value
        except BaseException as error:
            failure, text = error, traceback.format_exc()
    # Raised outside the except blocks, so it carries no context of its own.
    raise _TaskRaised(_portable(failure), text)


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

class _CallPickler(pickle.Pickler):
    """Pickles calls' (args, kwargs), each handle replaced by a reference
    to its place in `deps`, the dask futures the call depends on."""

    def __init__(self, file, client):
        # The C pickler reads its dispatch table when it is made.
        self.dispatch_table = _dispatch_table(copyreg.dispatch_table, self._reduce_handle)
        self.client = client
        self.deps = []
        super().__init__(file, pickle.HIGHEST_PROTOCOL)

    def _reduce_handle(self, handle):
        future = handle.future
        if future is None or future.client is not self.client:
            # Fetched when its runner exited, or kept by another runner's
            # client: the value itself goes.
            return _identity, (_fetch(handle, None),)
        self.deps.append(future)
        return _dep, (len(self.deps) - 1,)


class _CloudCallPickler(cloudpickle.CloudPickler):
    """The same, by value where plain pickle cannot (lambdas, __main__)."""

    def __init__(self, file, client):
        self.dispatch_table = _dispatch_table(cloudpickle.CloudPickler.dispatch_table,
                                              self._reduce_handle)
        self.client = client
        self.deps = []
        super().__init__(file, pickle.HIGHEST_PROTOCOL)

    _reduce_handle = _CallPickler._reduce_handle


def _dispatch_table(base, reduce_handle):
    table = dict(base)
    table[_Handle] = reduce_handle
    return table


def _identity(value):
    return value


class _CallDumper:
    """Pickles the calls of one batch: dump(call) -> (blob, deps)."""

    def __init__(self, client):
        self.client = client
        self.buffer = io.BytesIO()
        self.pickler = _CallPickler(self.buffer, client)

    def dump(self, call):
        buffer, pickler = self.buffer, self.pickler
        buffer.seek(0)
        buffer.truncate()
        pickler.clear_memo()
        pickler.deps = []
        try:
            pickler.dump(call)
            blob = buffer.getvalue()
            if b"__main__" not in blob:
                return blob, pickler.deps
        except Exception:
            pass
        other = io.BytesIO()
        cloud = _CloudCallPickler(other, self.client)
        cloud.dump(call)
        return other.getvalue(), cloud.deps


# -- the dispatcher and the watcher ---------------------------------------------------------

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
        self.keys = {}                  # TaskFuture -> key, for runs handed over
        self.runs = {}                  # key -> TaskFuture
        self.dask_futures = {}          # key -> distributed.Future, once sent
        self.recalling = set()          # keys being recalled now
        self.settling = 0               # runs dropped here, not yet ended in the engine
        self.recalled_any = False
        self.handles = weakref.WeakSet()    # of completed runs, to fetch at exit
        self.completions = None
        self.closing = False
        self.threads = []

    def start(self, engine):
        from distributed import as_completed

        self.engine = engine
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
        for thread in self.threads:
            thread.join()
        try:
            self._fetch_held()
            if self.recalled_any:
                self.client.run(_forget_marks, self.session, on_error="ignore")
        except Exception:
            _log.exception("could not settle the Dask results on exit")
        finally:
            _close_quietly(self.client, self.cluster)

    def fetch_many(self, handles, timeout):
        """The values `handles` stand for, those still on the cluster
        fetched in one gather (the engine's fetch_many hook)."""
        on_cluster = [h for h in handles if h.future is not None]
        if on_cluster:
            if timeout is not None:
                # A gather does not time out by itself: wait for the data first.
                with self.client.as_current():
                    _distributed().wait([h.future for h in on_cluster], timeout=timeout)
        fetched = dict(zip(map(id, on_cluster), self._gather(on_cluster)))
        values = []
        for handle in handles:
            value, error = fetched.get(id(handle)) or (_fetch(handle, timeout), None)
            if error is not None:
                raise error
            values.append(value)
        return values

    def _fetch_held(self):
        handles = [h for h in list(self.handles) if h.future is not None]
        for handle, (value, error) in zip(handles, self._gather(handles)):
            handle.value, handle.error, handle.future = value, error, None

    def _gather(self, handles):
        """(value, error) for each handle's dask future: one gather for all,
        or, if that fails, one fetch each, so each gets its own error."""
        if not handles:
            return []
        futures = [h.future for h in handles]
        try:
            return [(value, None) for value in self.client.gather(futures)]
        except Exception:
            pass
        outcomes = []
        for future in futures:
            try:
                outcomes.append((future.result(), None))
            except Exception as error:
                outcomes.append((None, error))
        return outcomes

    # -- handing runs over ----------------------------------------------------------------

    def _dispatch(self):
        engine = self.engine
        low = self.window // 2
        while True:
            # With more than half the window in flight the cluster has work
            # queued: wait for the rest to free up, and send it in one go.
            with self.lock:
                while len(self.runs) > low and not self.closing:
                    self.wake.wait()
            futures = engine.take_ready(MAX_BATCH)
            if futures is None:
                return
            try:
                self._send(futures)
            except Exception as error:     # a bug, or the cluster is gone: never lose runs
                _log.exception("could not hand runs to the Dask scheduler")
                self._crash_unsent(futures, error)

    def _send(self, futures):
        numbers = self.numbers
        session = self.session
        with self.lock:
            keys = []
            for future in futures:
                key = f"{future.task_name}-{session}-{next(numbers)}"
                self.keys[future] = key
                self.runs[key] = future
                keys.append(key)
        fns, asyncs, blobs, deps, sent_keys = [], [], [], [], []
        unpicklable = []
        dumper = _CallDumper(self.client)
        i = 0
        for spec, args_list, kwargs_list in self.engine.calls_of(futures):
            for j, args in enumerate(args_list):
                key = keys[i]
                i += 1
                try:
                    blob, dep = dumper.dump((args, kwargs_list[j] if kwargs_list else None))
                except Exception as error:
                    unpicklable.append((key, error))
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

    def _fail_unpicklable(self, failures):
        futures, errors = [], []
        with self.lock:
            for key, error in failures:
                future = self._forget(key)
                if future is not None:
                    futures.append(future)
                    errors.append(TypeError(f"the arguments of this run cannot be pickled to "
                                            f"go to the Dask cluster: {error}"))
        try:
            self.engine.finish(futures, errors, [_FAILED] * len(futures))
        finally:
            self._settled(len(futures))

    def _crash_unsent(self, futures, error):
        crashed = []
        with self.lock:
            for future in futures:
                key = self.keys.get(future)
                if key is not None and key not in self.dask_futures:
                    self._forget(key)
                    crashed.append(future)
        crash = CrashedRun(f"could not hand the run to the Dask scheduler: "
                           f"{type(error).__name__}: {error}")
        try:
            self.engine.finish(crashed, [crash] * len(crashed), [_CRASHED] * len(crashed))
        finally:
            self._settled(len(crashed))

    def _forget(self, key):
        """Drop a run handed over; its future, or None if already dropped.
        The caller ends it in the engine, then calls _settled().  Lock held."""
        future = self.runs.pop(key, None)
        if future is not None:
            del self.keys[future]
            self.dask_futures.pop(key, None)
            self.settling += 1
        return future

    def _settled(self, count):
        """`count` runs dropped by _forget() have ended in the engine."""
        if count:
            with self.lock:
                self.settling -= count
                self.wake.notify_all()

    def _wait_in_hand(self):
        """Wait until every run the engine counts as handed out is known
        here: the dispatcher has taken none it has not yet registered.
        Lock held."""
        deadline = time.monotonic() + IN_HAND_TIMEOUT
        graph = self.engine.graph
        while graph.n_running > len(self.runs) + self.settling and not self.closing:
            if time.monotonic() > deadline:
                _log.warning("runs taken by the Dask dispatcher were not registered in time")
                return
            self.wake.wait(0.01)

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
        futures, values, states = [], [], []
        requeue, rewatch = [], []
        for dask_future in batch:
            key = dask_future.key
            with self.lock:
                if self.runs.get(key) is None or key in self.recalling:
                    continue            # recalled: the recall ends it
            status = dask_future.status
            if status == "finished":
                outcome = _Handle(dask_future), _COMPLETED
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
                future = self._forget(key)
            if future is None:
                continue
            if outcome is None:
                # Marks left by a recall that found the run may have started
                # elsewhere; this attempt did not start: run it again.
                requeue.append(future)
                continue
            value, state = outcome
            if state == _COMPLETED:
                self.handles.add(value)
            elif state == _CRASHED:
                value = CrashedRun(f"task run {future.task_name!r} ({future.task_run_id}): "
                                   f"{value}")
            futures.append(future)
            values.append(value)
            states.append(state)
        if rewatch:
            self.completions.update(rewatch)
        try:
            if requeue:
                self.engine.give_back(requeue, False)
            if futures:
                self.engine.finish(futures, values, states)
        finally:
            self._settled(len(requeue) + len(futures))

    # -- taking runs back ---------------------------------------------------------------------

    def recall(self, future):
        """The engine's recall hook: take back runs handed to Dask that
        surely never started: `future`'s (True if so), or with None every
        such run.

        The keys are marked on every worker, in its event loop, where runs
        start (see _hold_back); a worker answers which of them may have
        started there.  The others never run: they are cancelled here, and
        their dask futures cancelled.  A worker that joins after the marks
        and before the scheduler has the cancellation could still run one:
        the window is one message long."""
        with self.lock:
            self._wait_in_hand()
            if future is None:
                keys = [k for k in self.runs if k not in self.recalling]
            else:
                key = self.keys.get(future)
                keys = [key] if key is not None and key not in self.recalling else []
            if not keys:
                return False        # not ours (any more): it is ending, or not handed out
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
                run = self._forget(key)
                if run is not None:
                    cancelled.append(run)
                    if dask_future is not None:
                        dask_futures.append(dask_future)
        try:
            if dask_futures:
                try:
                    self.client.cancel(dask_futures)
                except Exception:
                    pass        # marked: they cannot run anyway
            if cancelled:
                self.engine.give_back(cancelled, True)
        finally:
            self._settled(len(cancelled))
        self._watch_again([k for k in keys if k in maybe_started])
        return future is not None and bool(cancelled)

    def _hold_back(self, keys):
        """Mark `keys` on every worker; the set that may have started."""
        try:
            answers = self.client.run(_hold_back, keys, on_error="return")
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
