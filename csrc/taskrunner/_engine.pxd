# The engine: task futures, call binding and the submit/map/run paths that
# turn Python calls into runs of the graph (see _graph.pxd).  Runner modules
# speak to it through Engine's Python methods: submit, map, cancel_all,
# shutdown, and work (the loop a consumer thread runs).

from libc.stdint cimport int32_t, uint8_t

from taskrunner._graph cimport Graph, RunVec


cdef class CallSpec:
    """How to call one task: the callable, its name, and a plan for binding
    a parameters mapping to its signature."""
    cdef readonly object task       # what the user passed: a Task or the callable
    cdef readonly object fn
    cdef readonly str name
    cdef readonly bint is_async
    cdef bint may_cycle         # the callable can refer back to futures
    cdef tuple pos_names        # bound by position, in order
    cdef tuple pos_defaults     # a default per positional name, or _MISSING
    cdef tuple kw_names         # keyword-only
    cdef tuple kw_defaults
    cdef object var_pos_name    # the name of *args, or None
    cdef bint var_kw            # takes **kwargs
    cdef bint checked           # False when the signature is unknown
    cdef frozenset declared     # every named parameter

    cdef int bind(self, dict params, TaskFuture fut) except -1


cdef class _Extra:
    cdef list callbacks
    cdef dict dependencies


cdef class TaskFuture:
    cdef Engine _engine
    cdef CallSpec _spec
    cdef object _args           # tuple of arguments; None once run or ended
    cdef object _kwargs         # dict of keyword arguments, or None
    cdef object _value          # result; exception; for NOT_READY the cause
    cdef object _uuid
    cdef _Extra _extra
    cdef int32_t _run
    cdef uint8_t _flags

    cdef uint8_t _state(self)
    cdef bint _wait(self, object timeout) except -1
    cdef object _error(self, uint8_t state)
    cdef object _cause(self)
    cdef object _input_value(self, bint allow)
    cdef _Extra _get_extra(self)
    cdef void _fire_callbacks(self)


cdef class FutureList(list):
    pass


cdef class Engine:
    cdef readonly Graph graph
    cdef dict _specs
    cdef CallSpec _last_spec    # the spec of the last task seen: most calls repeat it
    cdef object _spawn_consumer
    cdef bint _cancel_new

    cdef CallSpec _spec_for(self, object task)
    cdef CallSpec _find_spec(self, object task)
    cdef int _register_one(self, TaskFuture fut, list ups) except -1
    cdef int _register_many(self, list futs, list shared_ups, list parked) except -1
    cdef int32_t _add_edges_locked(self, int32_t run, list ups, int32_t cause,
                                   bint* outside) noexcept
    cdef int _hook_outside(self, TaskFuture fut, list ups) except -1
    cdef uint8_t _execute(self, TaskFuture fut, object context)
    cdef void _ended(self, RunVec* out)
    cdef void _spawn(self, int32_t n)
