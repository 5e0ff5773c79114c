# How a task is called: the callable, its name, and a plan that binds a
# parameters mapping to its signature once per callable, not once per call.

from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_GET_ITEM, PyTuple_GET_SIZE

cdef extern from "Python.h":
    bint PyTuple_CheckExact(object)
    bint PyObject_IS_GC(object)
    int PyObject_GC_IsTracked(object)
    void PyObject_GC_UnTrack(object)


cdef inline tuple untracked_if_atomic(tuple args):
    """`args`, out of the cyclic GC's sight if it holds only values that
    cannot refer to anything (ints, strings, ...).  The GC would untrack such
    a tuple itself, but only after visiting it once; a million pending runs
    make that visit the bulk of its work."""
    cdef Py_ssize_t i
    cdef object item
    for i in range(PyTuple_GET_SIZE(args)):
        item = <object>PyTuple_GET_ITEM(args, i)
        if PyObject_IS_GC(item) and (not PyTuple_CheckExact(item) or PyObject_GC_IsTracked(item)):
            return args
    PyObject_GC_UnTrack(args)
    return args


cdef class CallSpec:
    cdef readonly object task   # what the user passed: a Task or the callable
    cdef readonly object fn     # what is called
    cdef readonly str name
    cdef readonly bint is_async
    cdef readonly bint may_cycle    # the callable can refer back to futures
    cdef tuple pos_names        # bound by position, in order
    cdef tuple pos_defaults     # a default per positional name, or _MISSING
    cdef tuple kw_names         # keyword-only
    cdef tuple kw_defaults
    cdef object var_pos_name    # the name of *args, or None
    cdef bint var_kw            # takes **kwargs
    cdef bint checked           # False when the signature is unknown
    cdef frozenset declared     # every named parameter
    # What a runner that sends calls elsewhere keeps for this task (its
    # pickled function, see taskrunner.remote): specs are cached per engine,
    # so this is once per runner.
    cdef public object wire
    # The task's options (taskrunner.tasks): read per failure, never per run.
    cdef readonly int retries
    cdef readonly tuple retry_delays    # one per retry, the last repeats
    cdef readonly double retry_jitter   # 0: none
    cdef readonly object retry_condition
    cdef readonly double timeout        # seconds; 0: none
    cdef readonly frozenset tags
    cdef readonly int lim           # its tags' limit set in the engine's graph (0: none)

    cdef tuple bind(self, dict params, PyObject** kwargs)


cdef CallSpec spec_of(object task)
cdef dict as_params(object parameters)
cdef object awaited(object value, bint is_async, object loop)


cdef class TaskLoop:
    cdef object loop
    cdef object current     # the asyncio Task of the coroutine running now, if any
