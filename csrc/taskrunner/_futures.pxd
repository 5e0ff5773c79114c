# Task futures, and the engine interface they rely on.
#
# A TaskFuture is the bound call of one run plus what the run produced.  It
# reads its state from the graph (the core), and asks its engine only to
# cancel it or, when a consumer thread blocks on it, for another consumer.

from cpython.ref cimport Py_DECREF, Py_INCREF
from libc.stdint cimport int32_t, uint8_t, uintptr_t

from cpython.object cimport PyObject, PyTypeObject

from taskrunner._calls cimport CallSpec
from taskrunner._graph cimport Graph

cdef extern from "Python.h":
    void PyObject_GC_Track(object)
    void PyObject_GC_UnTrack(object)
    int PyObject_GC_IsTracked(object)
    bint PyObject_IS_GC(object)

# TaskFuture._flags
cdef enum:
    NEEDS_RESOLVE = 1     # its arguments hold futures or annotations to replace
    CALLBACKS_FIRED = 2   # done callbacks ran (or are running): later ones run at once
    HAS_OUTSIDE = 4       # waits for a future of another runner
    REMOTE_VALUE = 8      # _value stands for a result kept elsewhere: engine.fetch gets it
    ONE_ARG = 16          # _args is the call's only positional argument, not a 1-tuple

# A run's payload in the graph is its TaskFuture, or with this bit set a
# mapped item that has none (see _mapped.pxd).
cdef enum:
    ITEM_TAG = 1

cdef inline bint is_item(void* payload) noexcept nogil:
    return (<uintptr_t>payload) & ITEM_TAG


cdef class TaskFuture


cdef class EngineBase:
    """What futures need of the engine that made them."""
    cdef readonly Graph graph
    # fetch(value, timeout): the result a REMOTE_VALUE stands for (None if
    # this engine's runners keep every result here)
    cdef object fetch
    cdef object fetch_many      # fetch_many(values, timeout): fetch of many at once, or None
    # prefetch(values): fetch many at once and keep them, so that fetch(value,
    # None) finds them without a round trip (or None): for the upstreams of
    # another engine's runs
    cdef object prefetch

    cdef void _spawn(self, int32_t n)
    cdef bint _cancel(self, TaskFuture fut) except -1
    cdef void _run_callbacks(self, TaskFuture fut, list callbacks)


cdef class _Extra:
    cdef list callbacks
    cdef dict dependencies


cdef class TaskFuture:
    cdef EngineBase _engine
    cdef CallSpec _spec
    cdef object _args           # a tuple (or see ONE_ARG); None once the run started or ended
    cdef object _kwargs         # a dict, or None
    cdef object _value          # result; exception; for NOT_READY the cause
    cdef object _uuid           # its task_run_id once made; an int: its key in the run trace
    cdef _Extra _extra
    cdef int32_t _run           # its run in the graph; -1 before it is one, and once detached
    cdef int32_t _retried       # attempts that failed and were retried (attempt = _retried + 1)
    cdef uint8_t _flags
    cdef uint8_t _final         # its final state, once detached from the graph (see Engine.release)

    cdef uint8_t _state(self)
    cdef bint _wait(self, object timeout) except -1
    cdef uint8_t _final_state(self, object timeout) except 255
    cdef object _error(self, uint8_t state)
    cdef object _cause(self)
    cdef object _input_value(self, bint allow, EngineBase consumer)
    cdef _Extra _get_extra(self)
    cdef void _fire_callbacks(self)


cdef class Consumer:
    """A thread that must make room when it blocks on a future: one running
    an engine's work loop (its engine; whether it holds one of the engine's
    running places right now, or runs done callbacks and holds none), or
    one with hooks of its own to call (a thread running done callbacks for
    a runner elsewhere, a Dask worker's thread)."""
    cdef EngineBase engine
    cdef bint holding
    cdef bint in_callbacks
    cdef object hooks           # hooks.blocking() before it blocks, hooks.resumed() after
    # Leaving a consumer behind (a timeout, a second Ctrl-C: see
    # _consume.pyx).  The run it runs now (`current_payload` NULL: none) and,
    # for a timed attempt, its deadline: what the engine's timer and
    # abandon_running() read, under the graph's lock, before they leave it
    # behind (`stale`).  The consumer writes them with the GIL held and no
    # Python code in between, and `holding` changes only with the lock or
    # in such a step (see _secede), so they read them consistently.
    cdef void* current_payload
    cdef int32_t current_run
    cdef bint timing            # the current run is a timed attempt, due at `deadline`
    cdef double deadline
    cdef bint armed             # an entry of the engine's timer will look at this consumer
    cdef bint stale
    cdef object loop            # its TaskLoop (async tasks), for cancelling one left behind
    cdef unsigned long thread_ident


cdef Consumer consumer_begin(EngineBase engine)
cdef void consumer_end()
cdef double until_signal_check(double deadline)
cdef double deadline_of(object timeout) except? -3.0
cdef object remaining(double deadline)
cdef bint wait_run(Graph graph, int32_t run, double deadline) except -1


cdef inline TaskFuture blank_future(EngineBase engine, CallSpec spec):
    """A new future of `spec`, not yet a run, its arguments still to be set;
    made by the type's tp_new directly (TaskFuture.__new__ goes through a
    generic call), and out of the GC's sight (see hold(): nothing can refer
    to it yet)."""
    cdef tuple no_args = ()
    cdef TaskFuture fut = <TaskFuture>(<PyTypeObject*>TaskFuture).tp_new(
        TaskFuture, <PyObject*>no_args, NULL)
    PyObject_GC_UnTrack(fut)
    fut._engine = engine
    fut._spec = spec
    fut._run = -1
    return fut


cdef inline TaskFuture new_future(EngineBase engine, CallSpec spec, dict params):
    """A future for a call of `spec` with `params`, not yet a run."""
    cdef TaskFuture fut = blank_future(engine, spec)
    cdef PyObject* kwargs = NULL
    fut._args = spec.bind(params, &kwargs)
    if kwargs != NULL:
        fut._kwargs = <object>kwargs
        Py_DECREF(<object>kwargs)
    return fut


cdef inline void forget_call(TaskFuture fut) noexcept:
    """Drop a run's call once it started or ended.  Its flag goes too: with
    ONE_ARG, None is an argument, not the mark of a dropped call."""
    fut._args = None
    fut._kwargs = None
    fut._flags &= ~ONE_ARG


cdef inline void hold(TaskFuture fut) noexcept:
    """Take the engine's reference to an unfinished run's future.

    The engine keeps it alive until the run ends, so the cyclic GC has no
    reason to visit it meanwhile (with a million runs pending that is most
    of the GC's work); any cycle through its arguments or callbacks is
    broken when the run ends, and it is tracked again then if need be."""
    Py_INCREF(fut)
    PyObject_GC_UnTrack(fut)


cdef inline void let_go(TaskFuture fut) noexcept:
    """Drop the engine's reference when the run has ended.

    An ended future refers only to its engine (which lets go of callables
    and the runner when it closes), its call spec, its value, its run id
    and its extras.  If none of those can lead back to a future, it cannot
    be on a reference cycle and the GC need never visit it."""
    if not PyObject_GC_IsTracked(fut) and (
            fut._spec.may_cycle or PyObject_IS_GC(fut._value)
            or (fut._extra is not None and fut._extra.dependencies is not None)):
        PyObject_GC_Track(fut)
    Py_DECREF(fut)
