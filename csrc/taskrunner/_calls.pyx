# cython: language_level=3, boundscheck=False, wraparound=False
"""Call plans: how to call a task with a parameters mapping.

inspect.signature costs microseconds, so it runs once per callable: the plan
records the positional names in order, their defaults, the keyword-only
names, and whether the callable takes *args or **kwargs.  Binding a call is
then a walk over the plan that fills a tuple (and, rarely, a dict).
"""

cimport cython
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from cpython.tuple cimport PyTuple_New, PyTuple_SET_ITEM

import inspect
import types
from collections.abc import Mapping

from taskrunner.tasks import Task, _callable_name, retry_delays

cdef extern from "Python.h":
    PyObject* PyDict_GetItem(object, object)
    Py_ssize_t PyDict_Size(object)
    bint PyDict_Next(object, Py_ssize_t*, PyObject**, PyObject**)

cdef object _MISSING = object()


cdef bint _is_async_callable(fn):
    return inspect.iscoroutinefunction(fn) or (
        not inspect.isroutine(fn) and inspect.iscoroutinefunction(getattr(fn, "__call__", None)))


cdef CallSpec spec_of(object task):
    """The plan for `task`, a Task or any callable; TypeError for anything else."""
    cdef CallSpec spec = CallSpec.__new__(CallSpec)
    spec.task = task
    spec.retry_delays = (0.0,)
    spec.tags = frozenset()
    if isinstance(task, Task):
        spec.fn = task.fn
        spec.name = task.name
        spec.retries = task.retries
        spec.retry_delays = retry_delays(task)
        spec.retry_jitter = task.retry_jitter_factor or 0.0
        spec.retry_condition = task.retry_condition_fn
        spec.timeout = task.timeout_seconds or 0.0
        spec.tags = task.tags
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


cdef object _CoroutineType = types.CoroutineType


cdef object awaited(object value, bint is_async, object loop):
    """A task's return value: if it is a coroutine (an async task), what
    it returns, run on `loop` (a TaskLoop)."""
    if is_async or type(value) is _CoroutineType:
        return loop.run_coroutine(value)
    return value


@cython.final
cdef class TaskLoop:
    """The event loop async tasks run on, one per consumer thread (or worker
    process), made for the first of them and kept until close()."""

    def run_coroutine(self, coro):
        # asyncio is imported by the first async task: a worker process
        # that runs none starts without it (a tenth of a second).
        import asyncio
        if self.loop is None:
            self.loop = asyncio.new_event_loop()
        # As a Task of its own, so that another thread can cancel it (a
        # run's timeout: cancel_task).
        self.current = asyncio.ensure_future(coro, loop=self.loop)
        try:
            return self.loop.run_until_complete(self.current)
        finally:
            self.current = None

    def close(self):
        if self.loop is not None:
            try:
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            finally:
                self.loop.close()
                self.loop = None


def cancel_task(task):
    """Cancel an asyncio Task from any thread."""
    try:
        task.get_loop().call_soon_threadsafe(task.cancel)
    except RuntimeError:
        pass        # its loop has closed: it is over


def call_task(fn, bint is_async, args, kwargs, loop):
    """Call `fn(*args, **kwargs)` (kwargs may be None), and if it returns a
    coroutine, run it on `loop`: what a task's call means, wherever it
    runs."""
    value = fn(*args) if not kwargs else fn(*args, **kwargs)
    return awaited(value, is_async, loop)


def call_spec(task):
    """The call plan of `task`, a Task or any callable; TypeError for
    anything else."""
    return spec_of(task)


cdef dict as_params(object parameters):
    """`parameters` as a dict; a TypeError if it is not a mapping."""
    if parameters is None:
        return {}
    if type(parameters) is dict:
        return <dict>parameters
    if isinstance(parameters, Mapping):
        return dict(parameters)
    raise TypeError(
        f"parameters must be a mapping of parameter names to values, not {type(parameters).__name__}")


cdef _check_names(dict params, str task_name):
    for name in params:
        if type(name) is not str:
            raise TypeError(f"task {task_name!r}: parameter names must be strings, not {name!r}")


@cython.final
cdef class CallSpec:

    cdef tuple bind(self, dict params, PyObject** kwargs_out):
        """The positional arguments for `params`, bound as fn(**params) would
        bind them; *kwargs_out receives a new reference to the keyword
        arguments, or stays NULL.  A TypeError names any missing or unknown
        parameter.  A value for the *args parameter is spread, as Prefect
        does."""
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
            if params:
                kwargs = dict(params)
                Py_INCREF(kwargs)
                kwargs_out[0] = <PyObject*>kwargs
            return ()
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
        if kwargs is not None:
            Py_INCREF(kwargs)
            kwargs_out[0] = <PyObject*>kwargs
        return untracked_if_atomic(args)

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

    def name_of_position(self, Py_ssize_t i):
        """The name of the parameter a call's i-th positional argument
        binds to."""
        if self.checked and i < len(self.pos_names):
            return self.pos_names[i]
        if self.var_pos_name is not None:
            return f"*{self.var_pos_name}"
        return f"positional argument {i}"

    def __repr__(self):
        return f"<CallSpec {self.name}>"
