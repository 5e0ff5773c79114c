# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Task futures and the paths from a Python call to a run of the graph.

submit() binds the parameters to the task's signature with a plan cached
per callable, finds the futures inside them, builds one TaskFuture and adds
one held run with its edges in a single critical section.  A consumer
thread's loop takes a run, resolves its upstream futures to their results,
calls the task, and completes the run and takes the next one in one more
critical section.  Nothing per run is made that no one asked for: the run id
(a UUID), the State object, the exception of a run that never ran, a waiter's
wake-up, all come on first use.

The engine owns one reference to each unfinished run's future (the run's
payload in the graph); it lets go when the run ends.
"""

cimport cython
from cpython.exc cimport PyErr_CheckSignals
from cpython.list cimport PyList_Append, PyList_GET_ITEM, PyList_GET_SIZE
from cpython.object cimport PyObject
from cpython.pythread cimport PyThread_get_thread_ident
from cpython.ref cimport Py_DECREF, Py_INCREF
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM
from libc.stdint cimport int32_t, uint8_t

from taskrunner._graph cimport (
    CANCELLED, CAUSE_OUTSIDE, COMPLETED, CRASHED, EDGE_BROKEN, FAILED, Graph, NOT_READY,
    PENDING, READY, RUNNING, RunVec, TAKE_NONE, runvec_clear, runvec_free, tr_monotonic,
)

import copy
import inspect
import io
import logging
import threading
import types
import uuid
from collections.abc import Mapping

from taskrunner.annotations import allow_failure, quote, unmapped
from taskrunner.exceptions import (
    CancelledRun, MappingLengthMismatch, MappingMissingIterable, UpstreamTaskError,
)
from taskrunner.states import State, StateType
from taskrunner.tasks import Task, _callable_name

cdef extern from "Python.h":
    bint PyList_Check(object)
    bint PyTuple_Check(object)
    bint PyDict_Check(object)
    bint PyAnySet_Check(object)
    PyObject* PyDict_GetItem(object, object)
    Py_ssize_t PyDict_Size(object)
    bint PyDict_Next(object, Py_ssize_t*, PyObject**, PyObject**)
    void PyObject_GC_Track(object)
    void PyObject_GC_UnTrack(object)
    int PyObject_GC_IsTracked(object)
    bint PyObject_IS_GC(object)

_log = logging.getLogger("taskrunner")

cdef object _MISSING = object()
cdef object _CoroutineType = types.CoroutineType
cdef object _Annotation = allow_failure.__mro__[1]
cdef object _current = threading.local()       # .consumer: this thread's _Consumer, if any
cdef unsigned long _main_thread = threading.main_thread().ident
cdef double _SIGNAL_SLICE = 0.1                 # how often a blocked main thread checks signals
cdef int _MAX_DEPTH = 1000                      # nesting of containers searched for futures
cdef Py_ssize_t _MAX_SPECS = 4096

# TaskFuture._flags
cdef enum:
    NEEDS_RESOLVE = 1     # its arguments hold futures or annotations to replace
    CALLBACKS_FIRED = 2   # done callbacks ran (or are running): later ones run at once
    HAS_OUTSIDE = 4       # waits for a future of another runner

_STATE_TYPES = {
    PENDING: StateType.PENDING, READY: StateType.PENDING, RUNNING: StateType.RUNNING,
    COMPLETED: StateType.COMPLETED, FAILED: StateType.FAILED, NOT_READY: StateType.FAILED,
    CANCELLED: StateType.CANCELLED, CRASHED: StateType.CRASHED,
}


# -- time ---------------------------------------------------------------------

cdef double _deadline(object timeout) except? -3.0:
    """A tr_monotonic() deadline for `timeout` seconds; -1 for None."""
    cdef double t
    if timeout is None:
        return -1.0
    try:
        t = timeout
    except TypeError:
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}") from None
    if t != t:
        raise ValueError("timeout must not be NaN")
    if t < 0:
        t = 0
    return tr_monotonic() + t


cdef bint _wait_final(Graph graph, int32_t run, double deadline) except -1:
    """Block (without the GIL) until `run` is final or the deadline passes.
    On the main thread, wake now and then so Ctrl-C gets through."""
    cdef bint main = PyThread_get_thread_ident() == _main_thread
    cdef double until
    cdef bint final
    while True:
        until = deadline
        if main:
            until = tr_monotonic() + _SIGNAL_SLICE
            if 0 <= deadline < until:
                until = deadline
        with nogil:
            final = graph.wait_final(run, until)
        if final:
            return True
        if deadline >= 0 and tr_monotonic() >= deadline:
            return False
        PyErr_CheckSignals()


@cython.final
cdef class _Consumer:
    """A thread running Engine.work(): its engine, and whether it holds one
    of the engine's running places right now."""
    cdef Engine engine
    cdef bint holding


cdef _Consumer _secede():
    """If this thread holds a consumer's place, give it up while it blocks.
    Returns the consumer to rejoin afterwards, or None."""
    cdef _Consumer consumer = getattr(_current, "consumer", None)
    cdef int32_t wanted
    if consumer is None or not consumer.holding:
        return None
    consumer.holding = False
    wanted = consumer.engine.graph.secede()
    if wanted:
        consumer.engine._spawn(wanted)
    return consumer


cdef void _rejoin(_Consumer consumer):
    if consumer is not None:
        consumer.engine.graph.rejoin()
        consumer.holding = True


# -- binding ------------------------------------------------------------------

cdef bint _is_async_callable(fn):
    return inspect.iscoroutinefunction(fn) or (
        not inspect.isroutine(fn) and inspect.iscoroutinefunction(getattr(fn, "__call__", None)))


@cython.final
cdef class CallSpec:

    @staticmethod
    def of(task):
        """Build the plan for `task`, a Task or any callable."""
        cdef CallSpec spec = CallSpec.__new__(CallSpec)
        spec.task = task
        if isinstance(task, Task):
            spec.fn = task.fn
            spec.name = task.name
        elif callable(task):
            spec.fn = task
            spec.name = _callable_name(task)
        else:
            raise TypeError(
                f"task must be a callable or a Task, not {type(task).__name__} ({task!r:.60})")
        spec.is_async = _is_async_callable(spec.fn)
        # A function with no closure reaches nothing but its module (alive
        # anyway) and its defaults; anything else may hold a future.
        spec.may_cycle = not (
            isinstance(spec.fn, types.BuiltinFunctionType)
            or (type(spec.fn) is types.FunctionType and spec.fn.__closure__ is None))
        try:
            signature = inspect.signature(spec.fn)
        except (TypeError, ValueError):
            # No signature to check against (some builtins): pass the
            # parameters through as keywords and let the call decide.
            spec.checked = False
            spec.declared = frozenset()
            return spec
        spec.checked = True
        pos_names, pos_defaults, kw_names, kw_defaults = [], [], [], []
        for p in signature.parameters.values():
            default = _MISSING if p.default is p.empty else p.default
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
                pos_names.append(p.name)
                pos_defaults.append(default)
            elif p.kind is p.KEYWORD_ONLY:
                kw_names.append(p.name)
                kw_defaults.append(default)
            elif p.kind is p.VAR_POSITIONAL:
                spec.var_pos_name = p.name
            else:
                spec.var_kw = True
        spec.pos_names = tuple(pos_names)
        spec.pos_defaults = tuple(pos_defaults)
        spec.kw_names = tuple(kw_names)
        spec.kw_defaults = tuple(kw_defaults)
        spec.declared = frozenset(pos_names + kw_names
                                  + ([spec.var_pos_name] if spec.var_pos_name else []))
        return spec

    cdef int bind(self, dict params, TaskFuture fut) except -1:
        """Set fut._args and fut._kwargs from `params`, as fn(**params)
        would bind them; a TypeError names any missing or unknown one.  A
        value for the *args parameter is spread, as Prefect does."""
        cdef Py_ssize_t n = len(self.pos_names) if self.checked else 0
        cdef Py_ssize_t i, matched = 0, pos = 0
        cdef PyObject* found
        cdef PyObject* key
        cdef PyObject* item
        cdef tuple args, spread = ()
        cdef dict kwargs = None
        cdef object value
        if not self.checked:
            _check_names(params, self.name)
            fut._args = ()
            fut._kwargs = dict(params) if params else None
            return 0
        if self.var_pos_name is not None:
            found = PyDict_GetItem(params, self.var_pos_name)
            if found != NULL:
                matched += 1
                try:
                    spread = tuple(<object>found)
                except TypeError:
                    raise TypeError(
                        f"task {self.name!r}: parameter {self.var_pos_name!r} collects extra "
                        f"positional arguments and must be iterable, "
                        f"not {type(<object>found).__name__}") from None
        args = PyTuple_New(n + len(spread))
        for i in range(n):
            name = <object>PyTuple_GET_ITEM(self.pos_names, i)
            # Parameters usually come in signature order, with interned
            # names: match the dict's next key by identity before hashing.
            if PyDict_Next(params, &pos, &key, &item) and key == <PyObject*>name:
                found = item
            else:
                pos = PyDict_Size(params)      # out of order: hash from here on
                found = PyDict_GetItem(params, name)
            if found == NULL:
                value = <object>PyTuple_GET_ITEM(self.pos_defaults, i)
                if value is _MISSING:
                    self._raise_binding_error(params)
            else:
                matched += 1
                value = <object>found
            Py_INCREF(value)
            PyTuple_SET_ITEM(args, i, value)
        for i in range(len(spread)):
            value = spread[i]
            Py_INCREF(value)
            PyTuple_SET_ITEM(args, n + i, value)
        for i in range(len(self.kw_names)):
            name = self.kw_names[i]
            found = PyDict_GetItem(params, name)
            if found == NULL:
                value = self.kw_defaults[i]
                if value is _MISSING:
                    self._raise_binding_error(params)
            else:
                matched += 1
                value = <object>found
            if kwargs is None:
                kwargs = {}
            kwargs[name] = value
        if matched != PyDict_Size(params):
            if not self.var_kw:
                self._raise_binding_error(params)
            _check_names(params, self.name)
            for name, value in params.items():
                if name not in self.declared:
                    if kwargs is None:
                        kwargs = {}
                    kwargs[name] = value
        fut._args = args
        fut._kwargs = kwargs
        return 0

    def _raise_binding_error(self, dict params):
        _check_names(params, self.name)
        missing = [name for name, default in zip(self.pos_names + self.kw_names,
                                                 self.pos_defaults + self.kw_defaults)
                   if default is _MISSING and name not in params]
        unknown = [] if self.var_kw else [name for name in params if name not in self.declared]
        problems = []
        if missing:
            problems.append("missing required parameter" + ("s " if len(missing) > 1 else " ")
                            + ", ".join(repr(m) for m in missing))
        if unknown:
            problems.append("unknown parameter" + ("s " if len(unknown) > 1 else " ")
                            + ", ".join(repr(u) for u in unknown))
        raise TypeError(f"task {self.name!r}: " + "; ".join(problems))

    def __repr__(self):
        return f"<CallSpec {self.name}>"


cdef _check_names(dict params, str task_name):
    for name in params:
        if type(name) is not str:
            raise TypeError(f"task {task_name!r}: parameter names must be strings, not {name!r}")


cdef dict _as_params(object parameters):
    if parameters is None:
        return {}
    if type(parameters) is dict:
        return <dict>parameters
    if isinstance(parameters, Mapping):
        return dict(parameters)
    raise TypeError(
        f"parameters must be a mapping of parameter names to values, not {type(parameters).__name__}")


# -- finding and resolving futures in parameters ------------------------------

cdef inline bint _is_plain(object value):
    # The common case, ruled out with a few pointer comparisons.
    cdef type t = type(value)
    return t is int or t is str or t is float or value is None or t is bool or t is bytes


cdef int _scan(object value, list ups, bint allow, int depth) except -1:
    """Append the futures inside `value` to `ups` as [future, allow, ...].
    Returns NEEDS_RESOLVE if the value must be rebuilt before the call."""
    cdef int found = 0
    if _is_plain(value):
        return 0
    if isinstance(value, TaskFuture):
        ups.append(value)
        ups.append(allow)
        return NEEDS_RESOLVE
    if depth >= _MAX_DEPTH:
        raise ValueError(
            f"parameter values nest deeper than {_MAX_DEPTH} levels (does a container hold "
            f"itself?); wrap such a value in quote() to pass it as it is")
    if PyTuple_Check(value) or PyList_Check(value) or PyAnySet_Check(value):
        for item in value:
            if not _is_plain(item):
                found |= _scan(item, ups, allow, depth + 1)
        return found
    if PyDict_Check(value):
        for item in value.values():
            if not _is_plain(item):
                found |= _scan(item, ups, allow, depth + 1)
        return found
    if isinstance(value, _Annotation):
        if isinstance(value, quote):
            return NEEDS_RESOLVE
        return NEEDS_RESOLVE | _scan((<object>value).value, ups,
                                     allow or isinstance(value, allow_failure), depth + 1)
    return 0


cdef list _scan_call(TaskFuture fut):
    """The futures in a bound call's arguments, or None; flags the future
    if its arguments need resolving."""
    cdef list ups = None
    cdef int flags = 0
    cdef tuple args = fut._args
    cdef Py_ssize_t i
    for i in range(PyTuple_GET_SIZE(args)):
        value = <object>PyTuple_GET_ITEM(args, i)
        if not _is_plain(value):
            if ups is None:
                ups = []
            flags |= _scan(value, ups, False, 0)
    if fut._kwargs is not None:
        for value in (<dict>fut._kwargs).values():
            if not _is_plain(value):
                if ups is None:
                    ups = []
                flags |= _scan(value, ups, False, 0)
    fut._flags |= flags
    return ups if ups else None


cdef list _wait_for_ups(object wait_for, list ups):
    """Add the `wait_for` futures to `ups`; a TypeError for anything else."""
    if isinstance(wait_for, TaskFuture):
        wait_for = (wait_for,)
    try:
        items = list(wait_for)
    except TypeError:
        raise TypeError(
            f"wait_for must be an iterable of futures, not {type(wait_for).__name__}") from None
    for item in items:
        allow = False
        if isinstance(item, allow_failure):
            item = (<object>item).value
            allow = True
        if not isinstance(item, TaskFuture):
            raise TypeError(
                f"wait_for items must be futures returned by submit or map, "
                f"not {type(item).__name__} ({item!r:.60})")
        if ups is None:
            ups = []
        ups.append(item)
        ups.append(allow)
    return ups


cdef dict _check_dependencies(object dependencies):
    if not isinstance(dependencies, Mapping):
        raise TypeError(
            f"dependencies must be a mapping of names to sets of futures, "
            f"not {type(dependencies).__name__}")
    checked = {}
    for name, futures in dependencies.items():
        if not isinstance(name, str):
            raise TypeError(f"dependencies keys must be parameter names (str), not {name!r}")
        if isinstance(futures, TaskFuture):
            futures = (futures,)
        try:
            futures = set(futures)
        except TypeError:
            raise TypeError(
                f"dependencies[{name!r}] must be a set of futures, "
                f"not {type(futures).__name__}") from None
        for f in futures:
            if not isinstance(f, TaskFuture):
                raise TypeError(
                    f"dependencies[{name!r}] must hold futures, not {type(f).__name__} ({f!r:.60})")
        checked[name] = futures
    return checked


cdef object _resolve(object value, bint allow, int depth):
    """`value` with each future replaced by its result (under allow_failure,
    by its exception if it failed) and annotations unwrapped.  Containers
    are rebuilt with their own type, and only if something inside changed."""
    cdef bint changed = False
    cdef list items
    cdef type t
    if _is_plain(value):
        return value
    if isinstance(value, TaskFuture):
        return (<TaskFuture>value)._input_value(allow)
    if depth >= _MAX_DEPTH:
        return value
    t = type(value)
    if PyList_Check(value) or PyTuple_Check(value) or PyAnySet_Check(value):
        items = []
        for item in value:
            new = _resolve(item, allow, depth + 1)
            changed |= new is not item
            items.append(new)
        if not changed:
            return value
        if t is list:
            return items
        if t is tuple:
            return tuple(items)
        if PyTuple_Check(value) and hasattr(t, "_make"):
            return t._make(items)       # a namedtuple
        return t(items)
    if PyDict_Check(value):
        resolved = {}
        for key, item in value.items():
            new = _resolve(item, allow, depth + 1)
            changed |= new is not item
            resolved[key] = new
        if not changed:
            return value
        if t is dict:
            return resolved
        rebuilt = copy.copy(value)
        rebuilt.update(resolved)
        return rebuilt
    if isinstance(value, _Annotation):
        if isinstance(value, quote):
            return (<object>value).value
        return _resolve((<object>value).value, allow or isinstance(value, allow_failure), depth + 1)
    return value


cdef tuple _resolve_args(tuple args):
    cdef Py_ssize_t i, n = PyTuple_GET_SIZE(args)
    cdef tuple out = PyTuple_New(n)
    for i in range(n):
        value = _resolve(<object>PyTuple_GET_ITEM(args, i), False, 0)
        Py_INCREF(value)
        PyTuple_SET_ITEM(out, i, value)
    return out


# -- futures ------------------------------------------------------------------

@cython.final
cdef class _Extra:
    """What few futures need: done callbacks and recorded dependencies."""

    def __cinit__(self):
        self.callbacks = []


@cython.final
@cython.freelist(256)
@cython.auto_pickle(False)
@cython.no_gc_clear     # __dealloc__ needs _engine to give the run's slot back
cdef class TaskFuture:
    """The future result of one task run.

    Futures are hashable by identity.  `result()` blocks until the run is
    final; a run that never ran because an upstream did not complete ends
    FAILED with the state name "NotReady".
    """

    def __init__(self):
        raise TypeError("TaskFuture objects are made by a runner's submit() and map()")

    def __dealloc__(self):
        if self._run >= 0 and self._engine is not None and self._engine.graph is not None:
            self._engine.graph.drop(self._run)

    cdef uint8_t _state(self):
        return self._engine.graph.state_of(self._run)

    cdef bint _wait(self, object timeout) except -1:
        cdef double deadline
        if self._engine.graph.state_of(self._run) >= COMPLETED:
            return True
        deadline = _deadline(timeout)
        consumer = _secede()
        try:
            return _wait_final(self._engine.graph, self._run, deadline)
        finally:
            _rejoin(consumer)

    cdef object _error(self, uint8_t state):
        """The exception that stands for a run ending in `state`, made on
        first use and kept, so every caller sees the same object."""
        cdef object value = self._value
        if state == FAILED or state == CRASHED:
            return value
        if isinstance(value, BaseException):
            return value
        if state == NOT_READY:
            cause = value if value is not None else self._cause()
            if isinstance(cause, TaskFuture):
                error = UpstreamTaskError(
                    f"Upstream task run {cause.task_name!r} ({cause.task_run_id}) did not "
                    f"reach a 'COMPLETED' state (it ended {cause.state.name}), "
                    f"so task run {self.task_name!r} ({self.task_run_id}) never ran.",
                    cause)
            else:
                error = UpstreamTaskError(
                    f"An upstream of task run {self.task_name!r} ({self.task_run_id}) did not "
                    f"reach a 'COMPLETED' state, so it never ran.")
        else:
            error = CancelledRun(
                f"Task run {self.task_name!r} ({self.task_run_id}) was cancelled before it started.")
        if not isinstance(self._value, BaseException):
            self._value = error
        return self._value

    cdef object _cause(self):
        # Between the core ending a run NOT_READY and the engine keeping a
        # reference to the cause, the core's record still names it.
        cdef Graph graph = self._engine.graph
        cdef void* payload
        graph.lock()
        payload = graph.cause_payload_locked(self._run)
        graph.unlock()
        return <object>payload if payload != NULL else None

    cdef object _input_value(self, bint allow):
        """This future as a downstream run's argument."""
        cdef uint8_t state = self._state()
        if state == COMPLETED:
            return self._value
        if allow and state >= COMPLETED:
            return self._error(state)
        raise UpstreamTaskError(
            f"Upstream task run {self.task_name!r} ({self.task_run_id}) is not completed", self)

    cdef _Extra _get_extra(self):
        if self._extra is None:
            self._extra = _Extra()
        return self._extra

    cdef void _fire_callbacks(self):
        cdef list callbacks
        self._flags |= CALLBACKS_FIRED
        if self._extra is None or not self._extra.callbacks:
            return
        callbacks = self._extra.callbacks
        self._extra.callbacks = None
        for fn in callbacks:
            _call_callback(fn, self)

    @property
    def task_run_id(self):
        """A uuid.UUID, unique to this run, made when first read."""
        if self._uuid is None:
            run_id = uuid.uuid4()
            if self._uuid is None:
                self._uuid = run_id
        return self._uuid

    @property
    def task_name(self):
        return self._spec.name

    @property
    def state(self):
        """A State snapshot of this run."""
        cdef uint8_t state = self._state()
        kind = _STATE_TYPES[state]
        if state == COMPLETED:
            return State(kind)
        if state == FAILED:
            return State(kind, message=repr(self._value))
        if state == NOT_READY:
            return State(kind, "NotReady", str(self._error(state)))
        if state >= COMPLETED:
            return State(kind, message=str(self._error(state)))
        return State(kind)

    @property
    def dependencies(self):
        """The lineage given to submit(dependencies=...): name -> set of futures."""
        if self._extra is None or self._extra.dependencies is None:
            return {}
        return self._extra.dependencies

    def done(self):
        """True once the run is final."""
        return self._state() >= COMPLETED

    def wait(self, timeout=None):
        """Block until the run is final or `timeout` seconds pass."""
        self._wait(timeout)

    def result(self, timeout=None, raise_on_failure=True):
        """The task's return value.  If the run did not complete, raise its
        exception (with raise_on_failure=False, return it).  TimeoutError if
        the run is not final within `timeout` seconds."""
        cdef uint8_t state = self._state()
        if state == COMPLETED:
            return self._value
        if state < COMPLETED:
            if not self._wait(timeout):
                raise TimeoutError(
                    f"task run {self.task_name!r} did not finish within {timeout} seconds")
            state = self._state()
            if state == COMPLETED:
                return self._value
        error = self._error(state)
        if raise_on_failure:
            raise error
        return error

    def exception(self, timeout=None):
        """The run's exception, or None if it completed."""
        cdef uint8_t state = self._state()
        if state < COMPLETED:
            if not self._wait(timeout):
                raise TimeoutError(
                    f"task run {self.task_name!r} did not finish within {timeout} seconds")
            state = self._state()
        if state == COMPLETED:
            return None
        return self._error(state)

    def add_done_callback(self, fn):
        """Call fn(future) once the run is final; at once if it is."""
        if not callable(fn):
            raise TypeError(f"fn must be callable, not {type(fn).__name__}")
        extra = self._get_extra()
        # No Python code may run between this test and the append: the
        # consumer sets the flag and takes the list as one step too.
        if self._flags & CALLBACKS_FIRED:
            _call_callback(fn, self)
        else:
            extra.callbacks.append(fn)

    def cancel(self):
        """Cancel the run if it has not started.  True if it is now CANCELLED."""
        return self._engine._cancel(self)

    def __repr__(self):
        return f"<TaskFuture {self._spec.name} {self.state.name}>"


cdef void _call_callback(fn, TaskFuture fut):
    try:
        fn(fut)
    except BaseException:
        _log.exception("done callback %r of task run %r raised", fn, fut.task_name)


@cython.final
cdef class FutureList(list):
    """A list of futures, as map() returns them, in input order."""

    def wait(self, timeout=None):
        """Block until every future is final or `timeout` seconds pass."""
        cdef double deadline = _deadline(timeout)
        for fut in self:
            fut.wait(_remaining(deadline) if deadline >= 0 else None)
            if deadline >= 0 and tr_monotonic() >= deadline:
                return

    def result(self, timeout=None, raise_on_failure=True):
        """The results, in input order.  Raises the first failure met (unless
        raise_on_failure=False), or TimeoutError after `timeout` seconds."""
        cdef double deadline = _deadline(timeout)
        cdef Py_ssize_t i, n = PyList_GET_SIZE(self)
        cdef list results = [None] * n
        cdef TaskFuture tf
        for i in range(n):
            fut = <object>PyList_GET_ITEM(self, i)
            if type(fut) is TaskFuture:
                tf = <TaskFuture>fut
                if tf._state() == COMPLETED:
                    results[i] = tf._value
                    continue
            results[i] = fut.result(_remaining(deadline) if deadline >= 0 else None,
                                    raise_on_failure)
        return results

    def __repr__(self):
        return f"FutureList({list.__repr__(self)})"


cdef inline void _hold(TaskFuture fut) noexcept:
    """Take the engine's reference to an unfinished run's future.

    The engine keeps it alive until the run ends, so the cyclic GC has no
    reason to visit it meanwhile (with a million runs pending that is most
    of the GC's work); any cycle through its arguments or callbacks is
    broken when the run ends, and it is tracked again then."""
    Py_INCREF(fut)
    PyObject_GC_UnTrack(fut)


cdef inline void _let_go(TaskFuture fut) noexcept:
    """Drop the engine's reference when the run has ended.

    An ended future refers only to its engine (which lets go of callables
    and the runner when it closes), its call spec, its value, its run id
    and its extras.  If none of those can lead back to a future, it cannot
    be on a reference cycle and the GC need never visit it; otherwise it is
    tracked again."""
    if not PyObject_GC_IsTracked(fut) and (
            fut._spec.may_cycle or PyObject_IS_GC(fut._value)
            or (fut._extra is not None and fut._extra.dependencies is not None)):
        PyObject_GC_Track(fut)
    Py_DECREF(fut)


cdef object _remaining(double deadline):
    cdef double left = deadline - tr_monotonic()
    return left if left > 0 else 0.0


# -- the engine ---------------------------------------------------------------

@cython.final
@cython.no_gc_clear     # futures being collected with it still give slots back
cdef class Engine:
    """Scheduling for one entered runner.

    `max_running` bounds the runs executing at once; `spawn_consumer()`, if
    given, is called (with the GIL) each time the graph wants one more
    consumer thread, which must call work().
    """

    def __cinit__(self, int max_running, spawn_consumer=None):
        self.graph = Graph(max_running)
        self._specs = {}
        self._spawn_consumer = spawn_consumer

    cdef CallSpec _spec_for(self, object task):
        cdef CallSpec spec = self._last_spec
        if spec is not None and spec.task is task:
            return spec
        spec = self._find_spec(task)
        self._last_spec = spec
        return spec

    cdef CallSpec _find_spec(self, object task):
        cdef CallSpec spec
        try:
            found = self._specs.get(task)
        except TypeError:       # an unhashable callable: no caching
            return CallSpec.of(task)
        if found is not None:
            return <CallSpec>found
        spec = CallSpec.of(task)
        if len(self._specs) >= _MAX_SPECS:
            self._specs.clear()
        self._specs[task] = spec
        return spec

    # -- submit -----------------------------------------------------------

    def submit(self, task, parameters=None, wait_for=None, dependencies=None):
        cdef CallSpec spec = self._spec_for(task)
        cdef dict params = _as_params(parameters)
        cdef TaskFuture fut = TaskFuture.__new__(TaskFuture)
        cdef list ups
        fut._engine = self
        fut._spec = spec
        fut._run = -1
        spec.bind(params, fut)
        ups = _scan_call(fut)
        if wait_for is not None:
            ups = _wait_for_ups(wait_for, ups)
        if dependencies is not None:
            fut._get_extra().dependencies = _check_dependencies(dependencies)
        self._register_one(fut, ups)
        return fut

    cdef int32_t _add_edges_locked(self, int32_t run, list ups, int32_t cause,
                                   bint* outside) noexcept:
        """Add run's edges from the flat [future, allow, ...] list.  Returns
        the first upstream that already failed (-1 if none, -3 if out of
        memory); upstreams of other runners become holds."""
        cdef Py_ssize_t i
        cdef TaskFuture up
        cdef int rc
        for i in range(0, PyList_GET_SIZE(ups), 2):
            up = <TaskFuture>PyList_GET_ITEM(ups, i)
            if up._engine is not self:
                self.graph.hold_locked(run)
                outside[0] = True
                continue
            rc = self.graph.add_edge_locked(up._run, run, <object>PyList_GET_ITEM(ups, i + 1) is True)
            if rc == EDGE_BROKEN and cause == -1:
                cause = up._run
            elif rc < 0:
                return -3
        return cause

    cdef int _register_one(self, TaskFuture fut, list ups) except -1:
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef int32_t run, cause = -1, spawn
        cdef bint outside = False
        graph.lock()
        if graph.closed:
            graph.unlock()
            raise RuntimeError("the task runner has shut down; enter it again to submit")
        run = graph.add_run_locked(<void*>fut, 0)
        if run < 0:
            graph.unlock()
            raise MemoryError("the scheduler cannot hold another run")
        _hold(fut)
        fut._run = run
        if ups is not None:
            cause = self._add_edges_locked(run, ups, -1, &outside)
            if cause == -3:
                graph.cancel_locked(run, &out)
                cause = -1
        if self._cancel_new:
            graph.cancel_locked(run, &out)
        graph.release_locked(run, cause, &out)
        spawn = graph.pop_spawn_wanted_locked()
        graph.unlock()
        if outside:
            fut._flags |= HAS_OUTSIDE
            self._hook_outside(fut, ups)
        if out.len:
            self._ended(&out)
        runvec_free(&out)
        if spawn:
            self._spawn(spawn)
        if cause == -3:
            raise MemoryError("the scheduler cannot hold more dependency edges")
        return 0

    cdef int _hook_outside(self, TaskFuture fut, list ups) except -1:
        # Each upstream of another runner holds the run until its own done
        # callback lets go.
        for i in range(0, len(ups), 2):
            up = ups[i]
            if (<TaskFuture>up)._engine is not self:
                up.add_done_callback(_OutsideRelease(self, fut, ups[i + 1]))
        return 0

    def _release_outside(self, TaskFuture fut, TaskFuture up, bint allow):
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef int32_t cause = -1, spawn
        if up._state() != COMPLETED and not allow and fut._state() == PENDING:
            fut._value = up         # the cause, kept before the run can end
            cause = CAUSE_OUTSIDE
        graph.lock()
        graph.release_locked(fut._run, cause, &out)
        spawn = graph.pop_spawn_wanted_locked()
        graph.unlock()
        if out.len:
            self._ended(&out)
        runvec_free(&out)
        if spawn:
            self._spawn(spawn)

    # -- map --------------------------------------------------------------

    def map(self, task, parameters, wait_for=None):
        cdef CallSpec spec = self._spec_for(task)
        cdef TaskFuture template, fut
        cdef list shared = None, names = [], columns = []
        cdef list slot_positions = []
        cdef Py_ssize_t n, i, k, nargs, ncols
        cdef tuple args
        cdef int static_flags
        cdef FutureList futures
        if not isinstance(parameters, Mapping):
            raise TypeError(
                f"parameters must be a mapping of parameter names to values, "
                f"not {type(parameters).__name__}")
        statics = {}
        for name, value in parameters.items():
            if isinstance(value, unmapped):
                statics[name] = (<object>value).value
                continue
            if isinstance(value, TaskFuture):
                value = _mapped_future_result(<TaskFuture>value, name, spec.name)
            if _is_mappable(value):
                names.append(name)
                columns.append(value)
            else:
                statics[name] = value
        if not names:
            raise MappingMissingIterable(
                f"map of task {spec.name!r} got no iterable parameter to map over; give at "
                f"least one list, tuple or other iterable (wrap a value in unmapped() to pass "
                f"it whole to every call)")
        columns = [c if type(c) in (list, tuple, range) else list(c) for c in columns]
        lengths = [len(c) for c in columns]
        if len(set(lengths)) > 1:
            sizes = ", ".join(f"{name!r} has {size}" for name, size in zip(names, lengths))
            raise MappingLengthMismatch(
                f"map of task {spec.name!r}: the iterable parameters differ in length ({sizes})")
        n = lengths[0]
        ncols = len(names)
        if wait_for is not None:
            shared = _wait_for_ups(wait_for, None)

        # Bind once with a marker per mapped name; each call then copies
        # the bound arguments and puts its items where the markers are.
        template = TaskFuture.__new__(TaskFuture)
        markers = {name: _Slot(k) for k, name in enumerate(names)}
        spec.bind({**statics, **markers}, template)
        args = template._args
        nargs = PyTuple_GET_SIZE(args)
        for i in range(nargs):
            if type(args[i]) is _Slot:
                slot_positions.append((i, (<_Slot>args[i]).column))
        kw_slots = [(key, (<_Slot>v).column) for key, v in (template._kwargs or {}).items()
                    if type(v) is _Slot]
        if len(slot_positions) + len(kw_slots) != ncols:
            raise TypeError(f"map of task {spec.name!r}: cannot map over the "
                            f"*{spec.var_pos_name} parameter; pass it whole with unmapped()")
        static_ups = []
        static_flags = 0
        for value in list(args) + list((template._kwargs or {}).values()):
            if type(value) is not _Slot and not _is_plain(value):
                static_flags |= _scan(value, static_ups, False, 0)
        if static_ups:
            shared = static_ups + (shared or [])

        futures = FutureList()
        parked = None           # each run's own upstreams, when its items hold futures
        iterators = [iter(c) for c in columns]
        row = [None] * ncols
        column_at = [-1] * nargs
        for position, column in slot_positions:
            column_at[position] = column
        for i in range(n):
            for k in range(ncols):
                row[k] = next(iterators[k])
            fut = TaskFuture.__new__(TaskFuture)
            fut._engine = self
            fut._spec = spec
            fut._run = -1
            fut._flags = static_flags
            fut._args = _fill_args(args, column_at, row)
            if kw_slots:
                kwargs = dict(template._kwargs)
                for key, k in kw_slots:
                    kwargs[key] = row[k]
                fut._kwargs = kwargs
            else:
                fut._kwargs = template._kwargs
            item_ups = None
            for k in range(ncols):
                if not _is_plain(row[k]):
                    if item_ups is None:
                        item_ups = []
                    fut._flags |= _scan(row[k], item_ups, False, 0)
            if item_ups:
                if parked is None:
                    parked = [None] * n
                parked[i] = item_ups
            PyList_Append(futures, fut)
        self._register_many(futures, shared, parked)
        return futures

    cdef int _register_many(self, list futs, list shared_ups, list parked) except -1:
        """Add every run held, then release them all: so a failure part-way
        schedules nothing.  `shared_ups` are upstreams of every run;
        parked[i], if given, those of run i alone."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef Py_ssize_t i, n = PyList_GET_SIZE(futs), added = 0
        cdef int32_t run, cause, spawn
        cdef TaskFuture fut
        cdef bint outside, any_outside = False, oom = False
        graph.lock()
        if graph.closed:
            graph.unlock()
            raise RuntimeError("the task runner has shut down; enter it again to submit")
        for i in range(n):
            fut = <TaskFuture>PyList_GET_ITEM(futs, i)
            run = graph.add_run_locked(<void*>fut, 0)
            if run < 0:
                oom = True
                break
            _hold(fut)
            fut._run = run
            added += 1
            cause = -1
            outside = False
            if shared_ups is not None:
                cause = self._add_edges_locked(run, shared_ups, cause, &outside)
            if parked is not None and cause != -3:
                own = <object>PyList_GET_ITEM(parked, i)
                if own is not None:
                    cause = self._add_edges_locked(run, <list>own, cause, &outside)
            if cause == -3:
                oom = True
                break
            if outside:
                fut._flags |= HAS_OUTSIDE
                any_outside = True
            graph.runs[run].cause = cause     # kept until the release below
        for i in range(added):
            fut = <TaskFuture>PyList_GET_ITEM(futs, i)
            run = fut._run
            cause = graph.runs[run].cause
            graph.runs[run].cause = -1
            if oom or self._cancel_new:
                graph.cancel_locked(run, &out)
            graph.release_locked(run, cause, &out)
        spawn = graph.pop_spawn_wanted_locked()
        graph.unlock()
        if any_outside and not oom:
            for i in range(n):
                fut = <TaskFuture>PyList_GET_ITEM(futs, i)
                if fut._flags & HAS_OUTSIDE:
                    own = parked[i] if parked is not None and parked[i] is not None else []
                    self._hook_outside(fut, (shared_ups or []) + own)
        if out.len:
            self._ended(&out)
        runvec_free(&out)
        if spawn:
            self._spawn(spawn)
        if oom:
            raise MemoryError("the scheduler cannot hold this many runs")
        return 0

    # -- running ----------------------------------------------------------

    def work(self, context):
        """Run ready runs on this thread until the engine shuts down.
        `context.run_coroutine(coro)` runs the coroutine of an async task."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef void* payload = NULL
        cdef int32_t run = TAKE_NONE, spawn = 0
        cdef uint8_t state
        cdef TaskFuture fut
        cdef _Consumer consumer = _Consumer.__new__(_Consumer)
        consumer.engine = self
        graph.consumer_enter()
        _current.consumer = consumer
        try:
            while True:
                if run < 0:
                    with nogil:
                        run = graph.take(&payload, -1.0)
                    if run < 0:
                        break
                consumer.holding = True
                fut = <TaskFuture>payload
                state = self._execute(fut, context)
                run = graph.complete_and_take(fut._run, state, &out, &payload, &spawn)
                consumer.holding = run >= 0
                if spawn:
                    self._spawn(spawn)
                if out.len:
                    self._ended(&out)
                fut._fire_callbacks()
                _let_go(fut)
                fut = None
        finally:
            _current.consumer = None
            runvec_free(&out)
            graph.consumer_exit()

    cdef uint8_t _execute(self, TaskFuture fut, object context):
        cdef CallSpec spec = fut._spec
        args = fut._args
        kwargs = fut._kwargs
        fut._args = None
        fut._kwargs = None
        try:
            if fut._flags & NEEDS_RESOLVE:
                args = _resolve_args(args)
                if kwargs is not None:
                    kwargs = _resolve(kwargs, False, 0)
            if kwargs is None:
                value = spec.fn(*args)
            else:
                value = spec.fn(*args, **kwargs)
            if spec.is_async or type(value) is _CoroutineType:
                value = context.run_coroutine(value)
        except BaseException as exc:
            fut._value = exc
            return FAILED
        fut._value = value
        return COMPLETED

    cdef void _ended(self, RunVec* out):
        """Let go of runs the graph ended without running them."""
        cdef Py_ssize_t i
        cdef TaskFuture fut
        for i in range(out.len):
            fut = <TaskFuture>out.items[i].payload
            fut._args = None
            fut._kwargs = None
            if out.items[i].cause_payload != NULL and fut._value is None:
                fut._value = <object>out.items[i].cause_payload
        for i in range(out.len):
            fut = <TaskFuture>out.items[i].payload
            fut._fire_callbacks()
            _let_go(fut)
        fut = None
        runvec_clear(out)

    cdef void _spawn(self, int32_t n):
        cdef int32_t i
        if self._spawn_consumer is None:
            return
        for i in range(n):
            try:
                self._spawn_consumer()
            except BaseException:
                # Count the consumer that never came, so the graph asks again.
                self.graph.consumer_enter()
                self.graph.consumer_exit()
                _log.exception("could not start a worker for the task runner")

    # -- cancelling and shutting down --------------------------------------

    def _cancel(self, TaskFuture fut):
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        cdef bint cancelled
        graph.lock()
        cancelled = graph.cancel_locked(fut._run, &out)
        graph.unlock()
        self._ended(&out)
        runvec_free(&out)
        return cancelled

    def cancel_all(self):
        """Cancel every run that has not started."""
        cdef Graph graph = self.graph
        cdef RunVec out = RunVec(NULL, 0, 0)
        graph.lock()
        graph.cancel_all_locked(&out)
        graph.unlock()
        self._ended(&out)
        runvec_free(&out)

    def shutdown(self, bint cancel):
        """Wait until no run is unfinished, then stop the consumers.  With
        `cancel`, first cancel every run not started, and any added later.
        Ctrl-C while waiting cancels too, then keeps waiting for the runs
        already running, and re-raises."""
        if cancel:
            self._cancel_new = True
            self.cancel_all()
        try:
            self._wait_quiet()
        except BaseException:
            self._cancel_new = True
            self.cancel_all()
            self._wait_quiet()
            raise

    def _wait_quiet(self):
        cdef Graph graph = self.graph
        cdef bint main = PyThread_get_thread_ident() == _main_thread
        cdef double until
        cdef bint quiet
        while not graph.close_if_quiet():
            until = tr_monotonic() + _SIGNAL_SLICE if main else -1.0
            with nogil:
                graph.wait_quiet(until)
            PyErr_CheckSignals()

    def close(self):
        """Stop the consumers now, whatever is unfinished, and let go of the
        callables and the runner: ended futures keep the engine alive, and
        must not keep those alive through it."""
        self.graph.close()
        self._specs.clear()
        self._last_spec = None
        self._spawn_consumer = None

    @property
    def unfinished(self):
        return self.graph.n_unfinished


@cython.final
cdef class _Slot:
    """Marks where a mapped parameter's items go in the bound arguments."""
    cdef readonly Py_ssize_t column

    def __cinit__(self, Py_ssize_t column):
        self.column = column


@cython.final
cdef class _OutsideRelease:
    """A done callback on another runner's future that lets a run go on."""
    cdef Engine engine
    cdef TaskFuture fut
    cdef bint allow

    def __cinit__(self, Engine engine, TaskFuture fut, allow):
        self.engine = engine
        self.fut = fut
        self.allow = bool(allow)

    def __call__(self, TaskFuture up):
        self.engine._release_outside(self.fut, up, self.allow)


cdef tuple _fill_args(tuple template, list column_at, list row):
    """The template's arguments with each mapped position taken from `row`."""
    cdef Py_ssize_t i, column, n = PyTuple_GET_SIZE(template)
    cdef tuple args = PyTuple_New(n)
    cdef object value
    for i in range(n):
        column = column_at[i]
        if column < 0:
            value = <object>PyTuple_GET_ITEM(template, i)
        else:
            value = <object>PyList_GET_ITEM(row, column)
        Py_INCREF(value)
        PyTuple_SET_ITEM(args, i, value)
    return args


cdef bint _is_mappable(object value):
    if isinstance(value, (str, bytes, io.IOBase)):
        return False
    try:
        iter(value)
    except TypeError:
        return False
    return True


cdef object _mapped_future_result(TaskFuture fut, str name, str task_name):
    try:
        return fut.result()
    except BaseException as exc:
        raise UpstreamTaskError(
            f"map of task {task_name!r}: parameter {name!r} is the future of task run "
            f"{fut.task_name!r} ({fut.task_run_id}), which did not complete", fut) from exc
