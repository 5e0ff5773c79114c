# The run trace's recorder: raw records while the runner runs, the Chrome
# trace-event file only when it exits (see _trace.pyx).
#
# Every method runs with the GIL held and makes its record with no Python
# call in between (C arrays, the GIL is the lock): consumer threads, a
# receiving thread and the submitting thread may record at once.

from libc.stdint cimport int32_t, int64_t, uint8_t

from cpython.object cimport PyObject

from taskrunner._futures cimport EngineBase, TaskFuture
from taskrunner._mapped cimport MapBlock
from taskrunner._params cimport Upstream, Upstreams


cdef class Trace:
    cdef readonly double t0             # tr_monotonic() when it started: time 0 of the file
    # Slices, one per attempt: column i of each array is slice i.
    cdef Py_ssize_t n, cap
    cdef double* starts                 # tr_monotonic() seconds
    cdef double* ends
    cdef int64_t* keys                  # the run (see Trace.key_of)
    cdef int32_t* tracks                # index into track_list
    cdef int32_t* names                 # index into task_names
    cdef uint8_t* states                # the attempt's end: COMPLETED, FAILED, CRASHED (_graph)
    # Dependency edges: pairs (upstream key, downstream key).
    cdef Py_ssize_t n_edges, cap_edges
    cdef int64_t* edges
    # Run ids (see key_of).
    cdef object prefix                  # int: a random version-4 UUID, low 48 bits zero
    cdef bytes prefix_text              # its text up to the last group: "xxxxxxxx-xxxx-4xxx-yxxx-"
    cdef int64_t next_id
    cdef dict foreign                   # UUID made before the trace saw the run -> key
    cdef list foreign_text
    # Task names, interned per call spec.
    cdef dict name_of_spec
    cdef list task_names
    cdef object last_spec
    cdef int32_t last_name
    # Tracks and waits (few: plain Python).
    cdef dict track_of
    cdef list track_list
    cdef list waits
    cdef bint closed                    # written: records after this are dropped
    cdef readonly Py_ssize_t dropped    # records lost for want of memory

    cdef int64_t key_of(self, void* payload) except? -1
    cdef int64_t key_of_future(self, TaskFuture fut) except? -1
    cdef void add(self, void* payload, int32_t track, double start, double end,
                  uint8_t state) noexcept
    cdef int add_edge(self, int64_t up, int64_t down) except -1
    cdef int add_edges_from(self, EngineBase engine, int64_t down, Upstream* ups,
                            Py_ssize_t n) except -1
    cdef int add_run_edges(self, EngineBase engine, PyObject** futs, Py_ssize_t n,
                           Upstreams* shared, Upstreams* own, Py_ssize_t* first) except -1
    cdef int add_item_edges(self, EngineBase engine, MapBlock block, Py_ssize_t lo,
                            Py_ssize_t hi, Upstreams* shared) except -1
    cdef int limit_wait_of(self, void* payload, double start, double end, object tag) except -1

    cdef int32_t _name_of(self, object spec) except -1
    cdef int _number_block(self, MapBlock block) except -1
    cdef int _grow(self) except -1
    cdef void _release(self) noexcept
    cdef int _slice(self, int64_t key, int32_t name, int32_t track, double start, double end,
                    uint8_t state) except -1
    cdef long long _ns(self, double t)
    cdef Py_ssize_t _slot(self, int64_t key) noexcept
    cdef str _run_id(self, int64_t key)
