# The engine: turns submit() and map() calls into runs of the graph, and
# ends runs from outside (cancel, shutdown).  Runner modules speak to it
# through its Python methods (submit, map, cancel_all, shutdown, close,
# free_graph); the consumer loop (_consume.pyx) and the interface of a runner
# elsewhere (_remote.pyx) through the cdef methods below.

from cpython.object cimport PyObject
from libc.stdint cimport int32_t, uint8_t

from taskrunner._calls cimport CallSpec
from taskrunner._futures cimport EngineBase, TaskFuture
from taskrunner._graph cimport RunVec
from taskrunner._mapped cimport FutureList, MapBlock, RunList
from taskrunner._params cimport Upstream, Upstreams
from taskrunner._trace cimport Trace


cdef class Engine(EngineBase):
    cdef dict _specs            # task -> CallSpec
    cdef CallSpec _last_spec    # the spec of the last task seen: most calls repeat it
    cdef object _spawn_consumer
    cdef object _recall         # runner hook: take back runs sent on (see the class docstring)
    cdef bint _cancel_new       # exiting by exception: new runs end CANCELLED at once
    cdef object _callback_pool  # runs done callbacks apart (see taskrunner._callbacks), or None
    cdef object _timer          # retry delays and run deadlines (taskrunner._timer), made on first use
    # The thread idents of consumers left behind on a timed-out attempt
    # (_consume): the runner's exit does not wait for them.
    cdef readonly set left_behind
    cdef readonly set consumers   # the Consumers of this engine's consumer threads (_consume)
    cdef dict _limit_index      # tag -> its limit's number in the graph (the runner's limits)
    cdef public Trace trace     # the run trace's recorder (_trace.pyx), or None: not tracing

    # For the consumer loop and the remote interface.
    cdef void unlock_and_settle(self, RunVec* out)
    cdef void settle(self, RunVec* out, int32_t spawn)
    cdef int unstart(self, RunList runs, bint cancel) except -1
    cdef object call_later(self, double delay, object fn, tuple args)

    cdef CallSpec _spec_for(self, object task)
    cdef CallSpec _find_spec(self, object task)
    cdef CallSpec _limited(self, CallSpec spec)
    cdef int _lock_open(self) except -1
    cdef void _release_new_locked(self, int32_t run, bint cancel, RunVec* out) noexcept
    cdef int _register(self, PyObject** futs, Py_ssize_t n, Upstreams* shared,
                       Upstreams* own, Py_ssize_t* first) except -1
    cdef int32_t _add_edges_locked(self, int32_t run, Upstream* ups, Py_ssize_t n,
                                   int32_t cause, bint* outside) noexcept
    cdef int _hook_outside(self, TaskFuture fut, Upstream* ups, Py_ssize_t n) except -1
    cdef FutureList _map_block(self, CallSpec spec, Py_ssize_t n, list columns, tuple args,
                               list column_at, list kw_slots, object static_kwargs, int flags,
                               bint one_column, Upstreams* shared)
    cdef int _register_items(self, MapBlock block, Py_ssize_t lo, Py_ssize_t hi,
                             Upstreams* shared) except -1
    cdef void _cancel_items(self, MapBlock block)
    cdef void _run_callbacks(self, TaskFuture fut, list callbacks)
