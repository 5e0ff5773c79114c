# The engine: turns submit() and map() calls into runs of the graph, and
# runs ready runs on the threads that call work().  Runner modules speak to
# it through its Python methods: submit, map, cancel_all, shutdown, close,
# and work (the loop of a consumer thread).

from libc.stdint cimport int32_t, int64_t, uint8_t

from taskrunner._calls cimport CallSpec
from taskrunner._futures cimport EngineBase, TaskFuture
from taskrunner._mapped cimport FutureList, MapBlock
from cpython.object cimport PyObject

from taskrunner._graph cimport RunVec
from taskrunner._params cimport Upstream, Upstreams


cdef class Engine(EngineBase):
    cdef dict _specs            # task -> CallSpec
    cdef CallSpec _last_spec    # the spec of the last task seen: most calls repeat it
    cdef object _spawn_consumer
    cdef object _recall         # runner hook: un-start taken runs (see cancel())
    cdef bint _cancel_new       # exiting by exception: new runs end CANCELLED at once
    cdef object _callback_pool  # runs done callbacks apart (see taskrunner._callbacks), or None
    cdef readonly int64_t taken_epoch   # graph.cancel_epoch when take_ready() last took runs

    cdef CallSpec _spec_for(self, object task)
    cdef CallSpec _find_spec(self, object task)
    cdef int _lock_open(self) except -1
    cdef void _release_new_locked(self, int32_t run, bint cancel, RunVec* out)
    cdef void _unlock_and_settle(self, RunVec* out)
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
    cdef uint8_t _execute(self, TaskFuture fut, object context)
    cdef uint8_t _execute_item(self, MapBlock block, Py_ssize_t i, object context)
    cdef object _call(self, CallSpec spec, object args, object kwargs, uint8_t flags,
                      object context)
    cdef void _ended(self, RunVec* out)
    cdef void _run_callbacks(self, TaskFuture fut, list callbacks)
    cdef inline void _settle(self, RunVec* out, int32_t spawn)
