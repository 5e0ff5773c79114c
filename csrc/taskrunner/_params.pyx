# cython: language_level=3, boundscheck=False, wraparound=False
"""Futures inside parameter values.

At submit, scan() walks a value once and collects the futures in it into a C
buffer (Upstreams): these become the run's upstream edges.  A
value that needs no change (the common case: no futures, no annotations) is
passed to the task as it is.  When the run starts, resolve() rebuilds only
the containers that hold futures or annotations, with their own types.
"""

from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from libc.stdlib cimport malloc, realloc
from libc.string cimport memcpy
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE, PyTuple_New, PyTuple_SET_ITEM

from taskrunner._futures cimport NEEDS_RESOLVE, REMOTE_VALUE, EngineBase, TaskFuture
from taskrunner._graph cimport COMPLETED
from taskrunner._mapped cimport FutureList

import copy
from collections.abc import Mapping

from taskrunner.annotations import allow_failure, quote

cdef extern from "Python.h":
    bint PyList_Check(object)
    bint PyTuple_Check(object)
    bint PyDict_Check(object)
    bint PyAnySet_Check(object)

cdef object _Annotation = allow_failure.__mro__[1]
cdef int _MAX_DEPTH = 1000      # nesting of containers searched for futures


cdef int _push(Upstreams* ups, object future, bint allow) except -1:
    cdef Upstream* items
    if ups.len == ups.cap:
        if ups.items == ups.local:
            items = <Upstream*>malloc(ups.cap * 2 * sizeof(Upstream))
            if items != NULL:
                memcpy(items, ups.local, ups.len * sizeof(Upstream))
        else:
            items = <Upstream*>realloc(ups.items, ups.cap * 2 * sizeof(Upstream))
        if items == NULL:
            raise MemoryError()
        ups.items = items
        ups.cap *= 2
    ups.items[ups.len].future = <PyObject*>future
    ups.items[ups.len].allow = allow
    ups.len += 1
    return 0


cdef int scan(object value, Upstreams* ups, bint allow, int depth) except -1:
    """Add the futures inside `value` to `ups`.  Returns NEEDS_RESOLVE if
    the value must be rebuilt before the call."""
    cdef int found = 0
    if is_plain(value):
        return 0
    if isinstance(value, TaskFuture):
        _push(ups, value, allow)
        return NEEDS_RESOLVE
    if depth >= _MAX_DEPTH:
        raise ValueError(
            f"parameter values nest deeper than {_MAX_DEPTH} levels (does a container hold "
            f"itself?); wrap such a value in quote() to pass it as it is")
    if PyTuple_Check(value) or PyList_Check(value) or PyAnySet_Check(value):
        for item in value:
            if not is_plain(item):
                found |= scan(item, ups, allow, depth + 1)
        if type(value) is FutureList:
            found |= NEEDS_RESOLVE      # a task gets a list of results, even of none
        return found
    if PyDict_Check(value):
        for item in value.values():
            if not is_plain(item):
                found |= scan(item, ups, allow, depth + 1)
        return found
    if isinstance(value, _Annotation):
        if isinstance(value, quote):
            return NEEDS_RESOLVE
        return NEEDS_RESOLVE | scan((<object>value).value, ups,
                                    allow or isinstance(value, allow_failure), depth + 1)
    return 0


cdef int scan_call(TaskFuture fut, Upstreams* ups) except -1:
    """Add the futures in a bound call's arguments to `ups`; flag the
    future if its arguments need resolving."""
    cdef int flags = 0
    cdef tuple args = fut._args
    cdef Py_ssize_t i
    for i in range(PyTuple_GET_SIZE(args)):
        value = <object>PyTuple_GET_ITEM(args, i)
        if not is_plain(value):
            flags |= scan(value, ups, False, 0)
    if fut._kwargs is not None:
        for value in (<dict>fut._kwargs).values():
            if not is_plain(value):
                flags |= scan(value, ups, False, 0)
    fut._flags |= flags
    return 0


cdef list wait_for_upstreams(object wait_for, Upstreams* ups):
    """Add the `wait_for` futures to `ups`; a TypeError for anything else.
    Returns the list that holds them: keep it until the run is added."""
    if isinstance(wait_for, TaskFuture):
        wait_for = (wait_for,)
    try:
        items = list(wait_for)
    except TypeError:
        raise TypeError(
            f"wait_for must be an iterable of futures, not {type(wait_for).__name__}") from None
    for item in items:
        future = (<object>item).value if isinstance(item, allow_failure) else item
        if not isinstance(future, TaskFuture):
            raise TypeError(
                f"wait_for items must be futures returned by submit or map, "
                f"not {type(future).__name__} ({future!r:.60})")
    for item in items:
        if isinstance(item, allow_failure):
            _push(ups, (<object>item).value, True)
        else:
            _push(ups, item, False)
    return items


cdef dict checked_dependencies(object dependencies):
    """`dependencies` as {name: set of futures}; a TypeError if it is not that."""
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


cdef int find_kept_elsewhere(object value, EngineBase consumer, dict found,
                             int depth) except -1:
    """Add to `found` (engine -> {id: value}) the results kept elsewhere
    (REMOTE_VALUE) of the completed futures inside `value` that resolve()
    will fetch for a run of `consumer`: futures of another engine that can
    prefetch."""
    cdef TaskFuture fut
    if is_plain(value) or depth >= _MAX_DEPTH:
        return 0
    if isinstance(value, TaskFuture):
        fut = <TaskFuture>value
        if (fut._flags & REMOTE_VALUE and fut._engine is not consumer
                and fut._engine.prefetch is not None and fut._state() == COMPLETED):
            found.setdefault(fut._engine, {})[id(fut._value)] = fut._value
        return 0
    if PyList_Check(value) or PyTuple_Check(value) or PyAnySet_Check(value):
        for item in value:
            if not is_plain(item):
                find_kept_elsewhere(item, consumer, found, depth + 1)
    elif PyDict_Check(value):
        for item in value.values():
            if not is_plain(item):
                find_kept_elsewhere(item, consumer, found, depth + 1)
    elif isinstance(value, _Annotation) and not isinstance(value, quote):
        find_kept_elsewhere((<object>value).value, consumer, found, depth + 1)
    return 0


cdef int prefetch_found(dict found) except -1:
    """Fetch what find_kept_elsewhere() found, one call per engine."""
    for engine, values in found.items():
        (<EngineBase>engine).prefetch(list(values.values()))
    return 0


cdef object resolve(object value, bint allow, int depth, EngineBase consumer):
    """`value` with each future replaced by its result (under allow_failure,
    by its exception if it failed), as `consumer`, the engine running the
    downstream run, takes it, and annotations unwrapped.  Containers
    are rebuilt with their own type, and only if something inside changed."""
    cdef bint changed = False
    cdef list items
    cdef type t
    if is_plain(value):
        return value
    if isinstance(value, TaskFuture):
        return (<TaskFuture>value)._input_value(allow, consumer)
    if depth >= _MAX_DEPTH:
        return value
    t = type(value)
    if PyList_Check(value) or PyTuple_Check(value) or PyAnySet_Check(value):
        items = []
        for item in value:
            new = resolve(item, allow, depth + 1, consumer)
            changed |= new is not item
            items.append(new)
        if t is FutureList:     # a list of results, no longer of futures
            return items
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
            new = resolve(item, allow, depth + 1, consumer)
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
        return resolve((<object>value).value, allow or isinstance(value, allow_failure), depth + 1,
                       consumer)
    return value


cdef tuple resolve_args(tuple args, EngineBase consumer):
    cdef Py_ssize_t i, n = PyTuple_GET_SIZE(args)
    cdef tuple out = PyTuple_New(n)
    for i in range(n):
        value = resolve(<object>PyTuple_GET_ITEM(args, i), False, 0, consumer)
        Py_INCREF(value)
        PyTuple_SET_ITEM(out, i, value)
    return out


def all_plain(list values):
    """Whether every item of `values` is of a plain type (int, str, float,
    bool, bytes, None): such a list pickles, with no need to try."""
    cdef object value
    for value in values:
        if not is_plain(value):
            return False
    return True
