"""What runs on the Dask workers.

Each run is a call of `run`, which unpickles the call's arguments (their
upstream results arrive as Dask dependencies, see calls.py), calls the task
(awaiting it if it is a coroutine), and returns its value.  It raises the
task's own exceptions inside a TaskRaised, so that anything else Dask
reports as an error (a worker that kept dying, a task it could not load) is
known to come from the cluster.

Holding runs back.  A run this runner has recalled must never call its
task, though the scheduler may still hand it to a worker before the
cancellation reaches it.  A recall therefore marks the run's key, in this
order: (1) in the scheduler's metadata, under the runner's session; (2) on
every worker the scheduler knows, in the worker's event loop (hold_back),
which answers the keys that may have started there; then the client
cancels the others.  A worker that joins later reads the marks of step 1
when it registers, before it takes any run (the MarksPlugin, installed on
the first recall); one that joined before step 2 is asked in it.  `run`
checks the marks of this process before it calls a task.  The marks of a
session go when the runner exits (end_session, then the plugin's teardown);
the session is then remembered as ended, and no run of it starts here any more: its
engine has closed, so a run of it that a worker is handed now was recalled
(or is a leftover).  The recall's Client.cancel is not awaited by the
scheduler (it travels on the client's batched stream, some milliseconds
late), so the scheduler may still hand such a run to a worker after the
runner has exited: without this, it would find no mark, and run.

A run whose Dask task is executing here but has claimed nothing yet (its
thread is starting, or the task has just ended) may or may not have
started: the recall is told it may have, so the runner keeps the run, but
it is marked too.  If its thread had not reached the check, the mark
stops it, and the run's outcome, WITHHELD, tells the runner that it never
started: it ends CANCELLED, as its recall asked, instead of running later.

Packs.  Runs of one task whose calls need no Dask dependency (the items of
a map over plain values, most often) go several to a Dask task, a pack,
run by `run_pack`: the scheduler's cost is per Dask task, and it is most
of what a short run costs on a cluster.  A pack's runs keep their own keys
and marks: it claims each run in turn, under the marks lock, skipping one
that is marked, and records how far it got (`_progress`), so that a recall
holds back exactly the runs it has not claimed.  A pack returns its
values, a list, when every run completed; otherwise it raises PackEnded
with each run's outcome.  Its runs' outcomes reach the client together,
when it ends: a run must not wait for another run of its own runner, which
only workers in the client's process can (see DaskBackend.packing).
"""

import asyncio
import ctypes
import os
import pickle
import threading
import time
import traceback

import cloudpickle
import distributed
from distributed.diagnostics.plugin import WorkerPlugin

from taskrunner._calls import TaskLoop, call_task
from taskrunner._futures import consumer_hooks
from taskrunner._pickling import PLAIN_TYPES, with_remote_traceback
from taskrunner._timer import Timer
from taskrunner.exceptions import TaskRunnerError, run_timed_out

__all__ = ["COMPLETED", "FAILED", "RECALLED", "WITHHELD", "MarksPlugin", "PackEnded", "Recalled",
           "TaskRaised", "collect_times", "dep", "dep_item", "end_session", "forget_marks", "hold_back",
           "marks_key", "pickled_items", "run", "run_key", "run_pack"]

# Dask's worker states of a run that has not started.
_NOT_STARTED = frozenset(("waiting", "ready", "constrained", "released"))
_marks_lock = threading.Lock()
# Keys this worker process must not run -> whether the recall that marked
# the key was told the run may have started (see the module docstring).
_held_back: dict = {}
_progress: dict = {}            # pack key -> index of the last run it claimed, while it runs
# The sessions whose runner exited (end_session), oldest first, the last
# MAX_ENDED_SESSIONS of them: no run of theirs starts here.
_ended_sessions: dict = {}
MAX_ENDED_SESSIONS = 1024
_loading = threading.local()    # the dependencies of the arguments being unpickled


class TaskRaised(Exception):
    """Carries the exception a task raised, and its traceback text, back
    from a worker.  Its str stays short: Dask truncates long ones."""

    def __init__(self, error, text):
        super().__init__(error, text)
        self.error = error
        self.text = text

    def __str__(self):
        return f"the task raised {type(self.error).__name__}"

    def reraised(self):
        """The task's exception, with the worker's traceback attached."""
        return with_remote_traceback(self.error, self.text)


class Recalled(Exception):
    """A recalled run reached a worker: it was not run.  `withheld`: the
    recall was told that it may have started (see the module docstring)."""

    def __init__(self, key, withheld=False):
        super().__init__(key, withheld)
        self.withheld = withheld


# A pack's outcome for each of its runs (PackEnded.outcomes).  RECALLED and
# WITHHELD runs were not called: held back by a recall's mark, WITHHELD when
# that recall was told the run may have started here.
COMPLETED, FAILED, RECALLED, WITHHELD = "completed", "failed", "recalled", "withheld"


class PackEnded(Exception):
    """Not every run of a pack completed: `outcomes[i]` is run i's, a pair
    (COMPLETED, its value), (FAILED, a TaskRaised), (RECALLED, None) or
    (WITHHELD, None)."""

    def __init__(self, outcomes):
        super().__init__(outcomes)
        self.outcomes = outcomes

    def __str__(self):
        failed = sum(1 for state, _ in self.outcomes if state == FAILED)
        return f"{failed} of the {len(self.outcomes)} runs of this pack failed"


def run(fn, is_async, key, blob, deps, traced=False):
    """Run one task call on a worker; its arguments are `blob`, pickled
    with the upstream results left out: those are `deps`.  `traced`: the
    client keeps a run trace (see collect_times)."""
    with _marks_lock:
        if key in _held_back:
            raise Recalled(key, _held_back.pop(key))
        if _ended_sessions and _session_of(key) in _ended_sessions:
            raise Recalled(key)
    return (_timed if traced else _call)(fn, is_async, key, blob, deps, _Seceder())


def run_pack(fn, is_async, pack_key, keys, blobs, traced=False):
    """Run a pack: the calls `blobs` of one task, runs `keys` (see the
    module docstring)."""
    return _Pack(fn, is_async, pack_key, keys, blobs, traced).run()


# -- the run trace's times -----------------------------------------------------------
# A traced run's start and end stay on its worker, in this list, until the
# client collects them when it exits (collect_times): they never travel
# with the results, which may never leave the cluster.

_times: list = []               # (run key, start, end, thread ident, COMPLETED or FAILED)
_times_lock = threading.Lock()


def _timed(fn, is_async, key, blob, deps, hooks):
    """_call, its start and end (wall-clock seconds: the client may be on
    another machine) kept in _times."""
    state = FAILED
    start = time.time()
    try:
        value = _call(fn, is_async, key, blob, deps, hooks)
        state = COMPLETED
        return value
    finally:
        end = time.time()
        with _times_lock:
            _times.append((key, start, end, threading.get_ident(), state))


def collect_times(session, dask_worker=None):
    """On a worker (Client.run): (this process's pid, the names of its
    threads by ident, the times kept of the runs of one runner session),
    which are dropped here."""
    tag = f"-{session}-"
    with _times_lock:
        ours = [record for record in _times if tag in record[0]]
        _times[:] = [record for record in _times if tag not in record[0]]
    return os.getpid(), {thread.ident: thread.name for thread in threading.enumerate()}, ours


def _call(fn, is_async, key, blob, deps, hooks):
    """The value of one call, or TaskRaised."""
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
        loop = TaskLoop()           # an event loop only if the task is async
        try:
            with consumer_hooks(hooks):
                value = call_task(fn, is_async, args, kwargs, loop)
        except BaseException as error:
            failure, text = error, traceback.format_exc()
        else:
            failure = _unsendable_result(value, key)
            if failure is None:
                return value
        finally:
            loop.close()
    # Raised outside the except blocks, so it carries no context of its own.
    raise TaskRaised(_portable(failure), text)


class _Pack:
    """The runs of one pack on a worker, claimed in order."""

    def __init__(self, fn, is_async, key, keys, blobs, traced=False):
        self.fn, self.is_async, self.key = fn, is_async, key
        self.call = _timed if traced else _call
        self.keys, self.blobs = keys, blobs
        self.outcomes = [None] * len(keys)
        self.next = 0                   # the next run to claim (under _marks_lock)

    def run(self):
        hooks = _Seceder()              # one Dask task: it may secede once
        try:
            while True:
                i = self.claim()
                if i is None:
                    break
                try:
                    value = self.call(self.fn, self.is_async, self.keys[i], self.blobs[i], (),
                                      hooks)
                except TaskRaised as raised:
                    self.outcomes[i] = (FAILED, raised)
                else:
                    self.outcomes[i] = (COMPLETED, value)
        finally:
            with _marks_lock:
                _progress.pop(self.key, None)
        if all(state == COMPLETED for state, _ in self.outcomes):
            return [value for _, value in self.outcomes]
        raise PackEnded(self.outcomes)

    def claim(self):
        """The index of the next run to call, or None: marked runs are
        skipped, as `run` skips a marked key."""
        with _marks_lock:
            while self.next < len(self.keys):
                i = self.next
                self.next += 1
                _progress[self.key] = i
                if self.keys[i] in _held_back:
                    withheld = _held_back.pop(self.keys[i])
                    self.outcomes[i] = (WITHHELD if withheld else RECALLED, None)
                    continue
                if _ended_sessions and _session_of(self.keys[i]) in _ended_sessions:
                    self.outcomes[i] = (RECALLED, None)
                    continue
                return i
            return None


def pickled_items(values, indexes):
    """On a worker: items `indexes` of a pack's values, each pickled on its
    own (see results.items_alone)."""
    blobs = []
    for i in indexes:
        try:
            blobs.append(pickle.dumps(values[i], pickle.HIGHEST_PROTOCOL))
        except Exception:
            blobs.append(cloudpickle.dumps(values[i], pickle.HIGHEST_PROTOCOL))
    return blobs


def dep(index):
    """Unpickling an upstream result: the value Dask delivered for it."""
    return _loading.deps[index]


def dep_item(index, item):
    """Unpickling an upstream result that a pack made: item `item` of the
    values Dask delivered for that pack."""
    return _loading.deps[index][item]


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
            distributed.secede()

    def resumed(self):
        pass


def _unsendable_result(value, key):
    """None if Dask can move `value` off this worker (to a downstream run on
    another worker, or to the client); else the TypeError that fails the
    run.  Dask would find out only when a transfer fails, and keep the run
    that needs the value waiting for ever.  Serializing out of band (as
    Dask does) does not copy the buffers of large arrays."""
    if type(value) in PLAIN_TYPES:
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


# -- timeouts ----------------------------------------------------------------------
#
# A Dask worker's thread cannot be killed either, but Python code in it can
# be interrupted: at a run's deadline the worker's timer raises _Overdue in
# the thread running it (PyThreadState_SetAsyncExc), which the call turns
# into the run's TimeoutError; the Dask task ends, and the thread goes on
# with the next run of its pack.  A task inside a C call stops when it
# returns to Python.  An async task is cancelled on its loop (wait_for).


class _Overdue(BaseException):
    """Raised into a worker thread whose run is past its deadline."""


_deadlines = None           # this worker process's taskrunner._timer.Timer


def _set_async_exc(ident, exc):
    return ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), exc)


class _Watch:
    """One timed call on one thread: fire() at the deadline and finish()
    when the call returns decide under a lock which came first."""

    def __init__(self):
        self.ident = threading.get_ident()
        self.lock = threading.Lock()
        self.done = self.fired = False

    def fire(self):
        with self.lock:
            if not self.done:
                self.fired = True
                _set_async_exc(self.ident, ctypes.py_object(_Overdue))

    def finish(self):
        """The call returned: no interruption from now on, and one sent but
        not yet raised is withdrawn.  Whether the deadline came first."""
        with self.lock:
            self.done = True
            if self.fired:
                _set_async_exc(self.ident, None)
            return self.fired


class Deadlined:
    """A task function with a deadline per call (timeout_seconds), as sent
    to the workers in place of the function."""

    def __init__(self, fn, limit, name, is_async):
        self.fn, self.limit, self.name, self.is_async = fn, limit, name, is_async

    def __call__(self, *args, **kwargs):
        if self.is_async:
            return self._call_async(*args, **kwargs)
        global _deadlines
        if _deadlines is None:
            _deadlines = Timer("taskrunner-deadlines")
        watch = _Watch()
        entry = _deadlines.call_later(self.limit, watch.fire)
        try:
            try:
                value = self.fn(*args, **kwargs)
            finally:
                entry.cancel()
                overdue = watch.finish()
        except _Overdue:
            overdue = True
        if overdue:
            raise run_timed_out(self.name, self.limit)
        return value

    async def _call_async(self, *args, **kwargs):
        try:
            return await asyncio.wait_for(self.fn(*args, **kwargs), self.limit)
        except asyncio.TimeoutError:
            raise run_timed_out(self.name, self.limit) from None


def sent_function(spec):
    """What a worker calls for a run of `spec`'s task."""
    if spec.timeout:
        return Deadlined(spec.fn, spec.timeout, spec.name, spec.is_async)
    return spec.fn


def _portable(error):
    """`error` if it survives pickling, else a TaskRunnerError describing it."""
    try:
        pickle.loads(cloudpickle.dumps(error))
        return error
    except Exception as why:
        return TaskRunnerError(f"{type(error).__name__}: {error} (the task's exception could "
                               f"not be pickled to leave the worker: {why})")


# -- holding runs back ---------------------------------------------------------------

def marks_key(session):
    """The scheduler metadata key under which a session's marks are kept."""
    return f"taskrunner-marks-{session}"


def hold_back(runs, dask_worker):
    """On a worker, in its event loop (where Dask tasks start): mark the
    runs not to be run, and return the keys of those that may have started
    here (marked too if their Dask task has claimed nothing yet: see the
    module docstring).  `runs` are (Dask task key, index in its pack, run
    key) triples; a run alone is its own Dask task, index 0."""
    tasks = dask_worker.state.tasks
    maybe_started = []
    with _marks_lock:
        for task_key, index, key in runs:
            state = tasks.get(task_key)
            claimed = _progress.get(task_key)     # None unless a pack runs here now
            if (state is None or state.state in _NOT_STARTED
                    or (claimed is not None and index > claimed)):
                _held_back[key] = False
                continue
            if state.state == "executing" and claimed is None:
                _held_back[key] = True
            maybe_started.append(key)
    return maybe_started


def run_key(name, session, number):
    """The Dask key of a run (or, with number "pack<n>", of a pack) of task
    `name` in a runner session."""
    return f"{name}-{session}-{number}"


def _session_of(key):
    """The session of a run_key()."""
    return key.rsplit("-", 2)[-2]


def forget_marks(session):
    """On a worker: drop the marks of one runner session's keys."""
    tag = f"-{session}-"
    with _marks_lock:
        for key in [key for key in _held_back if tag in key]:
            del _held_back[key]


def end_session(session):
    """On a worker, asked by the runner's exit once its engine has closed:
    the session's marks go, and no run of it starts here from now on.
    Only the exit says so: the marks plugin's teardown also comes when a
    worker closes, or when the plugin is registered again, mid-session."""
    forget_marks(session)
    with _marks_lock:
        _ended_sessions[session] = None
        while len(_ended_sessions) > MAX_ENDED_SESSIONS:
            del _ended_sessions[next(iter(_ended_sessions))]


class MarksPlugin(WorkerPlugin):
    """Brings a session's marks to each worker that joins, before it takes
    a run (Dask sets a worker's plugins up before it reads the scheduler's
    messages), and drops them when the runner exits."""

    def __init__(self, session):
        self.session = session
        self.name = marks_key(session)

    async def setup(self, worker):
        batches = await worker.scheduler.get_metadata(keys=[self.name], default=None)
        with _marks_lock:
            for keys in (batches or {}).values():
                _held_back.update(dict.fromkeys(keys, False))

    def teardown(self, worker):
        forget_marks(self.session)
